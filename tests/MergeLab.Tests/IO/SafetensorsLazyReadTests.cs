using System.Diagnostics;
using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

public class SafetensorsLazyReadTests
{
    [Test]
    public void Opening_reads_only_the_header_and_a_small_tensor_is_read_alone()
    {
        // An 8 GiB tensor followed by a small one, as a sparse file: a reader that buffered the data
        // (or even a 2 GiB span of it) could not open this quickly, if at all.
        const long big = 8L << 30;
        using var dir = new TempDirectory();
        string path = dir.File("sparse.safetensors");
        string header = SafetensorsBytes.Pad(
            $"{{\"big\":{{\"dtype\":\"U8\",\"shape\":[{big}],\"data_offsets\":[0,{big}]}}," +
            $"\"small\":{{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[{big},{big + 16}]}}}}");
        byte[] head = SafetensorsBytes.Build(header, []);
        using (var stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
        {
            stream.Write(head);
            stream.SetLength(head.Length + big + 16);
            stream.Seek(head.Length + big, SeekOrigin.Begin);
            stream.Write(SafetensorsBytes.LittleEndian(1f, -2f, 3f, -4f));
        }

        var clock = Stopwatch.StartNew();
        using var file = SafetensorsFile.Open(path);
        using var small = file.ReadTensor("small");
        clock.Stop();

        Assert.That(file.TensorNames, Is.EqualTo(new[] { "big", "small" }));
        Assert.That(file.GetInfo("big").ByteLength, Is.EqualTo(big));
        Assert.That(file.GetInfo("small").DataOffset, Is.EqualTo(head.Length + big), "offsets beyond 4 GiB are absolute and exact");
        Assert.That(small.data<float>().ToArray(), Is.EqualTo(new[] { 1f, -2f, 3f, -4f }));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)));
    }

    [Test]
    public void Tensors_can_be_read_from_several_threads_at_once()
    {
        using var dir = new TempDirectory();
        var tensors = Enumerable.Range(0, 16).Select(i => (Name: $"t{i}", Tensor: torch.full([1000], i, ScalarType.Int32))).ToList();
        try
        {
            SafetensorsWriter.Write(dir.File("m.safetensors"), tensors.Select(t => new KeyValuePair<string, Tensor>(t.Name, t.Tensor)));
            using var file = SafetensorsFile.Open(dir.File("m.safetensors"));
            Parallel.ForEach(tensors, new ParallelOptions { MaxDegreeOfParallelism = 4 }, t =>
            {
                using var read = file.ReadTensor(t.Name);
                Assert.That(T.RawBytes(read), Is.EqualTo(T.RawBytes(t.Tensor)));
            });
        }
        finally
        {
            tensors.ForEach(t => t.Tensor.Dispose());
        }
    }
}
