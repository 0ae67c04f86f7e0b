using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

public class PlannedCheckpointWriterTests
{
    private static List<KeyValuePair<string, Tensor>> Tensors()
    {
        using var g = new Generator(5);
        return
        [
            new("b.weight", randn([4, 6], generator: g)),
            new("a.bias", randn([6], generator: g).to(ScalarType.BFloat16)),
            new("big", randn([40], generator: g)), // 160 bytes: larger than a shard, alone in its own
            new("ids", arange(5)),
            new("c.weight", randn([3, 3], generator: g).to(ScalarType.Float16)),
        ];
    }

    /// <summary>Writes copies of <paramref name="tensors"/> with the buffering writer into a new folder
    /// <paramref name="folder"/>, and returns its full path.</summary>
    private static string WriteBuffered(string folder, IEnumerable<(string Name, Tensor Tensor)> tensors, long maxShard = ShardedCheckpointWriter.DefaultMaxShardBytes)
    {
        string path = Directory.CreateDirectory(folder).FullName;
        using var writer = new ShardedCheckpointWriter(path, maxShard);
        foreach (var (name, t) in tensors)
        {
            writer.Add(name, t.clone());
        }

        writer.Complete();
        return path;
    }

    /// <summary>The plan of <paramref name="tensors"/>: their names, dtypes and shapes, in order.</summary>
    private static PlannedTensor[] Plan(IEnumerable<(string Name, Tensor Tensor)> tensors) =>
        tensors.Select(p => new PlannedTensor(p.Name, p.Tensor.dtype, p.Tensor.shape)).ToArray();

    [TestCase(100L)]
    [TestCase(10_000L)]
    public void Files_are_byte_identical_to_the_buffering_writer_whatever_the_write_order(long maxShard)
    {
        using var dir = new TempDirectory();
        var tensors = Tensors();
        try
        {
            var pairs = tensors.Select(kv => (kv.Key, kv.Value)).ToArray();
            string buffered = WriteBuffered(dir.File("buffered"), pairs, maxShard);
            string planned = Directory.CreateDirectory(dir.File("planned")).FullName;
            IReadOnlyList<string> files;
            using (var writer = new PlannedCheckpointWriter(planned, Plan(pairs), maxShard))
            {
                foreach (var (name, t) in Enumerable.Reverse(tensors))
                {
                    writer.Write(name, t);
                }

                files = writer.Complete();
            }

            var expected = Directory.GetFiles(buffered).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
            Assert.That(Directory.GetFiles(planned).Select(Path.GetFileName).Order(StringComparer.Ordinal), Is.EqualTo(expected));
            Assert.That(files.Order(StringComparer.Ordinal), Is.EqualTo(expected));
            foreach (var name in expected)
            {
                Assert.That(File.ReadAllBytes(Path.Combine(planned, name!)), Is.EqualTo(File.ReadAllBytes(Path.Combine(buffered, name!))), name);
            }
        }
        finally
        {
            tensors.ForEach(kv => kv.Value.Dispose());
        }
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Tensors_placed_at_their_offsets_remainder_are_written_from_their_own_memory_with_the_same_bytes(bool placed)
    {
        using var dir = new TempDirectory();
        using var g = new Generator(6);
        using var x = randn([5000], generator: g);
        using var yFloat = randn([3, 2500], generator: g);
        using var y = yFloat.to(ScalarType.BFloat16);
        var tensors = new[] { ("x", x), ("y", y) };
        string reference = WriteBuffered(dir.File("reference"), tensors);
        string planned = Directory.CreateDirectory(dir.File("planned")).FullName;
        long before = AlignedFileWriter.InPlaceBytes;
        using (var writer = new PlannedCheckpointWriter(planned, Plan(tensors)))
        {
            foreach (var (name, t) in tensors)
            {
                // Placed: the remainder of the tensor's file offset; not placed: one byte past it.
                int phase = (int)((writer.FileOffset(name) + (placed ? 0 : 1)) % AlignedFileWriter.BlockSize);
                using var copy = MergeLab.Selection.NativeBufferPool.Empty(t.shape, t.dtype, phase);
                copy.copy_(t);
                writer.Write(name, copy);
            }

            writer.Complete();
        }

        long inPlace = AlignedFileWriter.InPlaceBytes - before;
        if (placed)
        {
            // 20,000 and 15,000 bytes: at least 3 and 2 whole blocks, at most 4 and 3.
            Assert.That(inPlace, Is.InRange(5L * AlignedFileWriter.BlockSize, 7L * AlignedFileWriter.BlockSize));
        }
        else
        {
            Assert.That(inPlace, Is.Zero, "memory off the file's block boundaries goes through the staging buffer");
        }

        var file = SafetensorsCheckpoint.SingleFileName;
        Assert.That(File.ReadAllBytes(Path.Combine(planned, file)), Is.EqualTo(File.ReadAllBytes(Path.Combine(reference, file))));
    }

    [Test]
    public void Missing_or_mismatched_tensors_are_refused_and_nothing_is_left()
    {
        using var dir = new TempDirectory();
        using var w = ones(2, 2);
        var writer = new PlannedCheckpointWriter(dir.Path, [new("w", ScalarType.Float32, [2, 2]), new("v", ScalarType.Float32, [3])]);
        using (writer)
        {
            using var wrongShape = ones(2);
            Assert.Throws<ArgumentException>(() => writer.Write("w", wrongShape));
            using var wrongType = ones(2, 2, dtype: ScalarType.Float16);
            Assert.Throws<ArgumentException>(() => writer.Write("w", wrongType));
            Assert.Throws<ArgumentException>(() => writer.Write("unplanned", w));
            writer.Write("w", w);
            Assert.Throws<ArgumentException>(() => writer.Write("w", w));
            var ex = Assert.Throws<InvalidOperationException>(() => writer.Complete());
            Assert.That(ex!.Message, Does.Contain("'v'"));
        }

        Assert.That(dir.FileNames(), Is.Empty);
    }
}
