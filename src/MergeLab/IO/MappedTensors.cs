using System.IO.MemoryMappedFiles;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using MergeLab.Tensors;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// CPU tensors over a private, copy-on-write mapping of a file's bytes: reading a tensor costs no copy,
/// only the page faults of its first touch, and a write into the tensor changes this process's pages,
/// never the file.
/// </summary>
/// <remarks>
/// <para>Each tensor gets its own view (the pages its bytes span), created here and released when
/// libtorch frees the tensor's storage (the deleter of <c>from_blob</c>), so memory stays bounded by
/// the tensors alive, as with copied reads. The views stay valid after the file that made them is
/// closed.</para>
/// <para>A mapped file that shrinks under a live view makes the next touch of a page past its new end
/// fail with a bus error, which stops the process; a copied read reports the same truncation as an
/// exception. Callers choose mapping only where the files are not expected to change.</para>
/// </remarks>
internal static unsafe class MappedTensors
{
    private static readonly object Gate = new();
    private static readonly Dictionary<nint, MemoryMappedViewAccessor> Live = [];
    private static long _mapped;
    private static readonly int PageSize = Environment.SystemPageSize;

    /// <summary>Tensors mapped since the process started (for tests and diagnostics).</summary>
    public static long MappedCount => Interlocked.Read(ref _mapped);

    /// <summary>Mapped tensors whose storage libtorch has not yet freed (for tests and diagnostics).</summary>
    public static int LiveCount
    {
        get
        {
            lock (Gate)
            {
                return Live.Count;
            }
        }
    }

    /// <summary>Whether a tensor at <paramref name="fileOffset"/> with elements of
    /// <paramref name="elementSize"/> bytes can be mapped: its first element is then aligned to its size
    /// (a view starts on a page boundary), as libtorch and the kernels expect.</summary>
    public static bool CanMap(long fileOffset, long byteLength, long elementSize) =>
        byteLength > 0 && fileOffset % elementSize == 0;

    /// <summary>A tensor of <paramref name="shape"/> and <paramref name="dtype"/> over the
    /// <paramref name="byteLength"/> bytes of <paramref name="file"/> at <paramref name="fileOffset"/>;
    /// the caller owns it.</summary>
    public static Tensor Map(MemoryMappedFile file, long fileOffset, long byteLength, ReadOnlySpan<long> shape, ScalarType dtype)
    {
        var view = file.CreateViewAccessor(fileOffset, byteLength, MemoryMappedFileAccess.CopyOnWrite);
        byte* start = null;
        try
        {
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref start);
        }
        catch
        {
            view.Dispose();
            throw;
        }

        var data = (nint)(start + view.PointerOffset);
        lock (Gate)
        {
            Live.Add(data, view);
        }

        Interlocked.Increment(ref _mapped);

        Tensor? tensor;
        try
        {
            tensor = BlobTensor.Create(data, shape, dtype, &ReleaseFromTorch);
        }
        catch
        {
            Unmap(data);
            throw;
        }

        if (tensor is null)
        {
            Unmap(data);
            throw new InvalidOperationException("libtorch could not create a tensor over mapped file memory.");
        }

        return tensor;
    }

    /// <summary>Touches one byte of every page of the contiguous CPU tensor <paramref name="t"/>, a 1 MiB
    /// block at a time in parallel, so its pages are faulted in (read from the disk if need be) here rather
    /// than inside a merge kernel.</summary>
    /// <remarks>Asking the kernel to map the pages instead (<c>MADV_POPULATE_READ</c> per block, where they
    /// are in the page cache) moved about 0.1 s of a warm 4 × 1.1B merge's CPU time from this process to the
    /// kernel and none of its wall time, and was slower from the disk; not kept.</remarks>
    public static void Prefault(Tensor t) =>
        Selection.CpuParallel.ForByteBlocks((byte*)Selection.CpuTensors.Pointer(t), t.numel() * t.element_size(), TouchBlock);

    /// <summary>Reads one byte of each page of one block; compiled optimised from its first call (as a
    /// lambda it ran unoptimised for a merge's first thousand blocks).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TouchBlock(byte* start, int length)
    {
        int sum = 0;
        for (int i = 0; i < length; i += PageSize)
        {
            sum += Volatile.Read(ref start[i]);
        }

        sum += Volatile.Read(ref start[length - 1]); // the block's last page, when the tensor does not start on a page
        GC.KeepAlive(sum);
    }

    private static void Unmap(nint data)
    {
        MemoryMappedViewAccessor? view;
        lock (Gate)
        {
            Live.Remove(data, out view);
        }

        if (view is not null)
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
        }
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void ReleaseFromTorch(IntPtr data) => Unmap(data);
}
