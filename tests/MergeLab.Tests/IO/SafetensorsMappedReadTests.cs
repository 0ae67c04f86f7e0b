using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

/// <summary>Tensors mapped from their file (the merge engine's default read) hold the bytes a copied read
/// gives, never write back to the file, outlive the file, and release their mapping with their storage.</summary>
public class SafetensorsMappedReadTests
{
    private static Tensor Mapped(SafetensorsFile file, string name, bool checkFinite, out bool? finite) =>
        file.ReadTensor(name, null, TensorBytes.DefaultChunkBytes, checkFinite, out finite, map: true);

    private static Tensor Mapped(SafetensorsFile file, string name) => Mapped(file, name, checkFinite: false, out _);

    private static string WriteMixed(TempDirectory dir)
    {
        var tensors = new Dictionary<string, Tensor>
        {
            ["f32"] = torch.randn([5, 7], generator: new Generator(1)),
            ["bf16"] = torch.randn([33], generator: new Generator(2)).to(ScalarType.BFloat16),
            ["f16"] = torch.randn([4, 3], generator: new Generator(3)).to(ScalarType.Float16),
            ["f64"] = torch.randn([2], ScalarType.Float64, generator: new Generator(4)),
            ["i64"] = torch.tensor(new long[] { -3, 1L << 40, 7 }),
            ["u8"] = torch.tensor(new byte[] { 1, 2, 3, 250, 5 }),
        };
        try
        {
            string path = dir.File("mixed.safetensors");
            SafetensorsWriter.Write(path, tensors);
            return path;
        }
        finally
        {
            foreach (var t in tensors.Values)
            {
                t.Dispose();
            }
        }
    }

    [Test]
    public void Every_dtype_maps_to_the_bytes_a_copied_read_gives()
    {
        using var dir = new TempDirectory();
        using var file = SafetensorsFile.Open(WriteMixed(dir));
        long before = MappedTensors.MappedCount;
        foreach (var name in file.TensorNames)
        {
            using var copied = file.ReadTensor(name);
            using var mapped = Mapped(file, name);
            T.BitEqual(mapped, copied, name);
        }

        Assert.That(MappedTensors.MappedCount - before, Is.EqualTo(file.Count), "every tensor was mapped, not copied");
    }

    [Test]
    public void A_tensor_not_aligned_to_its_element_size_is_copied_instead()
    {
        // Three bytes of U8 first put the F32 tensor at an odd offset (the data buffer starts at a multiple
        // of 8): mapped, its first element would be misaligned.
        using var dir = new TempDirectory();
        string path = dir.File("odd.safetensors");
        string header = SafetensorsBytes.Pad(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]}}");
        File.WriteAllBytes(path, SafetensorsBytes.Build(header, [9, 8, 7, .. SafetensorsBytes.LittleEndian(1.5f, -2f)]));
        using var file = SafetensorsFile.Open(path);
        Assert.That(file.GetInfo("b").DataOffset % 4, Is.Not.Zero, "the case this test is about");

        long before = MappedTensors.MappedCount;
        using var b = Mapped(file, "b");
        Assert.That(MappedTensors.MappedCount, Is.EqualTo(before), "copied, not mapped");
        Assert.That(b.data<float>().ToArray(), Is.EqualTo(new[] { 1.5f, -2f }));

        using var a = Mapped(file, "a");
        Assert.That(MappedTensors.MappedCount, Is.EqualTo(before + 1), "a U8 tensor is aligned at any offset");
        Assert.That(a.data<byte>().ToArray(), Is.EqualTo(new byte[] { 9, 8, 7 }));
    }

    [Test]
    public void Writing_into_a_mapped_tensor_changes_neither_the_file_nor_a_later_read()
    {
        using var dir = new TempDirectory();
        string path = WriteMixed(dir);
        byte[] fileBefore = File.ReadAllBytes(path);
        using var file = SafetensorsFile.Open(path);
        using var original = file.ReadTensor("f32");
        using (var mapped = Mapped(file, "f32"))
        {
            mapped.add_(1);
            Assert.That(T.Values(mapped)[0], Is.EqualTo(T.Values(original)[0] + 1), "the write went into the tensor");
            using var again = Mapped(file, "f32");
            T.BitEqual(again, original);
        }

        Assert.That(File.ReadAllBytes(path), Is.EqualTo(fileBefore));
    }

    [Test]
    public void A_mapped_tensor_outlives_its_file_and_releases_its_mapping_when_freed()
    {
        using var dir = new TempDirectory();
        string path = WriteMixed(dir);
        int live = MappedTensors.LiveCount;
        Tensor mapped;
        Tensor copied;
        using (var file = SafetensorsFile.Open(path))
        {
            mapped = Mapped(file, "bf16");
            copied = file.ReadTensor("bf16");
        }

        using (copied)
        {
            using (var view = mapped.narrow(0, 1, 5))
            {
                Assert.That(MappedTensors.LiveCount, Is.EqualTo(live + 1));
                mapped.Dispose();
                Assert.That(MappedTensors.LiveCount, Is.EqualTo(live + 1), "a view keeps the storage, and so the mapping");
                using var expected = copied.narrow(0, 1, 5);
                T.BitEqual(view, expected);
            }

            Assert.That(MappedTensors.LiveCount, Is.EqualTo(live), "freed with the last tensor over it");
        }
    }

    [Test]
    public void Mapped_reads_check_for_non_finite_values_when_asked()
    {
        using var dir = new TempDirectory();
        using var good = torch.ones([1000], ScalarType.BFloat16);
        using var bad = torch.ones([1000], ScalarType.BFloat16);
        using (var infinity = torch.tensor(float.PositiveInfinity))
        {
            bad[777] = infinity;
        }

        string path = dir.File("m.safetensors");
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor> { ["good"] = good, ["bad"] = bad });
        using var file = SafetensorsFile.Open(path);

        using (Mapped(file, "good", checkFinite: true, out var finite))
        {
            Assert.That(finite, Is.True);
        }

        using (Mapped(file, "bad", checkFinite: true, out var finite))
        {
            Assert.That(finite, Is.False);
        }

        using (Mapped(file, "bad", checkFinite: false, out var finite))
        {
            Assert.That(finite, Is.Null);
        }
    }

    [Test]
    public void A_file_that_changed_size_is_refused_before_anything_is_mapped()
    {
        using var dir = new TempDirectory();
        string path = WriteMixed(dir);
        using var file = SafetensorsFile.Open(path);
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete))
        {
            f.SetLength(f.Length - 1);
        }

        long before = MappedTensors.MappedCount;
        Assert.That(() => Mapped(file, "f32").Dispose(), Throws.TypeOf<SafetensorsFormatException>()
            .With.Property(nameof(SafetensorsFormatException.TensorName)).EqualTo("f32")
            .And.Message.Contains("was truncated or rewritten"));
        Assert.That(MappedTensors.MappedCount, Is.EqualTo(before));
    }

    /// <summary>A tensor of 3 MiB + 100 bytes of float32 at a data offset that is not on a page, written to
    /// a file: its prefault spans four 1 MiB blocks and a page shared with the header.</summary>
    private static (string Path, Tensor Written) WriteLarge(TempDirectory dir)
    {
        string path = dir.File("large.safetensors");
        var written = torch.arange(0f, ((3 << 20) + 100) / 4f);
        using var small = torch.ones(5);
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor> { ["a"] = small, ["b"] = written });
        return (path, written);
    }

    /// <summary>The first and last page (numbers of <see cref="Environment.SystemPageSize"/> pages) that
    /// <paramref name="t"/>'s bytes touch.</summary>
    private static unsafe (long First, long Last) PagesOf(Tensor t)
    {
        long page = Environment.SystemPageSize;
        long start = (long)MergeLab.Selection.CpuTensors.Pointer(t);
        return (start / page, (start + (t.numel() * t.element_size()) - 1) / page);
    }

    /// <summary>How many of the pages holding <paramref name="t"/>'s bytes this process has mapped
    /// (the present bit of <c>/proc/self/pagemap</c>).</summary>
    private static int PresentPages(Tensor t)
    {
        var (first, last) = PagesOf(t);
        using var map = new FileStream("/proc/self/pagemap", FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1);
        var entry = new byte[8];
        int present = 0;
        for (long p = first; p <= last; p++)
        {
            map.Position = p * 8;
            map.ReadExactly(entry);
            present += (int)(BitConverter.ToUInt64(entry) >> 63);
        }

        return present;
    }

    [TestCase(true, TestName = "Prefault maps every page of a mapped tensor: from the page cache")]
    [TestCase(false, TestName = "Prefault maps every page of a mapped tensor: from the disk")]
    public unsafe void Prefault_maps_every_page_of_a_mapped_tensor(bool cached)
    {
        Assume.That(OperatingSystem.IsLinux() && File.Exists("/proc/self/pagemap"), "pagemap, mincore and posix_fadvise are Linux's");
        using var dir = new TempDirectory();
        var (path, written) = WriteLarge(dir);
        using var _ = written;
        if (!cached)
        {
            DropFromPageCache(path);
        }

        using var file = SafetensorsFile.Open(path);
        var info = file.GetInfo("b");
        Assert.That(info.DataOffset % Environment.SystemPageSize, Is.Not.Zero, "the case this test is about");
        using var mapping = System.IO.MemoryMappedFiles.MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0,
            System.IO.MemoryMappedFiles.MemoryMappedFileAccess.CopyOnWrite);
        using var mapped = MappedTensors.Map(mapping, info.DataOffset, info.ByteLength, info.Shape, info.DType);
        var (first, last) = PagesOf(mapped);
        Assert.That(PresentPages(mapped), Is.Zero, "nothing touched the mapping yet");

        MappedTensors.Prefault(mapped);

        Assert.That(PresentPages(mapped), Is.EqualTo(last - first + 1), "every page, the first and last partial ones included");
        T.BitEqual(mapped, written);
    }

    /// <summary>
    /// The touch pattern itself, on anonymous memory (no neighbouring pages are mapped along with a touched
    /// one, as file pages are): a tensor starting 200 bytes into a page, 3 MiB + 4 KiB long, so its last
    /// block is 4 KiB that crosses into one more page than its first byte's, which only the block's last
    /// byte reaches.
    /// </summary>
    [Test]
    public unsafe void Prefault_touches_every_page_a_tensor_spans()
    {
        Assume.That(OperatingSystem.IsLinux() && File.Exists("/proc/self/pagemap"), "pagemap is Linux's");
        long page = Environment.SystemPageSize;
        long bytes = (3 << 20) + 4096;
        nuint length = (nuint)(bytes + (2 * page));
        var memory = Mmap(0, length, 3 /* PROT_READ | PROT_WRITE */, 0x22 /* MAP_PRIVATE | MAP_ANONYMOUS */, -1, 0);
        Assert.That(memory, Is.Not.EqualTo((nint)(-1)), "mmap");
        try
        {
            // No huge pages (one touch would then map 2 MiB).
            Assert.That(Madvise(memory, length, 15 /* MADV_NOHUGEPAGE */), Is.Zero, "madvise");
            using var t = MergeLab.Tensors.BlobTensor.Create(memory + 200, [bytes / 4], ScalarType.Float32, &KeepMemory)!;
            Assert.That(PresentPages(t), Is.Zero, "nothing touched yet");

            MappedTensors.Prefault(t);

            var (first, last) = PagesOf(t);
            Assert.That(last - first + 1, Is.EqualTo((bytes / page) + 1), "the last block crosses into one more page");
            Assert.That(PresentPages(t), Is.EqualTo(last - first + 1));
        }
        finally
        {
            _ = Munmap(memory, length);
        }
    }

    [System.Runtime.InteropServices.UnmanagedCallersOnly(CallConvs = [typeof(System.Runtime.CompilerServices.CallConvCdecl)])]
    private static void KeepMemory(IntPtr data)
    {
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "mmap")]
    private static extern nint Mmap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "munmap")]
    private static extern int Munmap(nint address, nuint length);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "madvise")]
    private static extern int Madvise(nint address, nuint length, int advice);

    /// <summary>Writes back <paramref name="path"/>'s pages and asks the kernel to drop them from the page
    /// cache; the test is skipped where they stay (a file system in memory).</summary>
    private static unsafe void DropFromPageCache(string path)
    {
        using (var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read))
        {
            int fd = (int)handle.DangerousGetHandle();
            Assert.That(FDataSync(fd), Is.Zero, "fdatasync");
            Assert.That(FAdvise(fd, 0, 0, 4 /* POSIX_FADV_DONTNEED */), Is.Zero, "posix_fadvise");
        }

        using var mapping = System.IO.MemoryMappedFiles.MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0,
            System.IO.MemoryMappedFiles.MemoryMappedFileAccess.Read);
        using var view = mapping.CreateViewAccessor(0, 0, System.IO.MemoryMappedFiles.MemoryMappedFileAccess.Read);
        byte* p = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        try
        {
            long pageSize = Environment.SystemPageSize;
            long length = new FileInfo(path).Length;
            long pages = (length + pageSize - 1) / pageSize;
            var resident = new byte[pages];
            fixed (byte* v = resident)
            {
                Assert.That(Mincore((nint)(p + view.PointerOffset), (nuint)length, v), Is.Zero, "mincore");
            }

            Assume.That(resident.Count(r => (r & 1) != 0), Is.LessThan(pages / 2), "the file system keeps the file's pages in memory");
        }
        finally
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "fdatasync")]
    private static extern int FDataSync(int fd);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "posix_fadvise")]
    private static extern int FAdvise(int fd, long offset, long length, int advice);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "mincore")]
    private static extern unsafe int Mincore(nint address, nuint length, byte* vector);
}
