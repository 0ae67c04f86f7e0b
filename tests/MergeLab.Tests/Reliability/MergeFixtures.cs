using MergeLab.IO;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>Checkpoints on disk for the merge fault, number and concurrency tests, and the checks that a
/// failed merge left nothing behind.</summary>
internal static class MergeFixtures
{
    /// <summary>A model of <paramref name="tensors"/> float32 [16, 16] tensors (plus an int64 buffer), seeded,
    /// so that a merge makes many reads and a fault can land half-way.</summary>
    public static StateDict Model(long seed, int tensors = 24, ScalarType dtype = ScalarType.Float32)
    {
        using var g = new Generator((ulong)seed);
        var sd = new StateDict();
        for (int i = 0; i < tensors; i++)
        {
            sd.Add($"model.layers.{i}.weight", randn([16, 16], generator: g).to(dtype));
        }

        sd.Add("position_ids", arange(16, ScalarType.Int64));
        return sd;
    }

    /// <summary>Writes <paramref name="model"/> as a checkpoint folder (sharded when
    /// <paramref name="maxShardBytes"/> is small) with a config.json, and returns its path.</summary>
    public static string Save(TempDirectory dir, string name, StateDict model, long maxShardBytes = long.MaxValue)
    {
        string path = Path.Combine(dir.Path, name);
        Directory.CreateDirectory(path);
        using (var writer = new ShardedCheckpointWriter(path, maxShardBytes))
        {
            foreach (var (n, t) in model)
            {
                writer.Add(n, t.clone());
            }

            writer.Complete();
        }

        File.WriteAllText(Path.Combine(path, "config.json"), "{\"model_type\": \"toy\"}");
        return path;
    }

    /// <summary>Asserts the folder holds exactly the input folders: no output, no hidden temporary directory.</summary>
    public static void AssertNothingLeft(TempDirectory dir, params string[] inputs)
    {
        Assert.That(Directory.GetDirectories(dir.Path).Select(Path.GetFileName), Is.EquivalentTo(inputs),
            "a failed merge leaves no output and no temporary directory");
        Assert.That(Directory.GetFiles(dir.Path), Is.Empty);
    }

    /// <summary>The number of live TorchSharp tensors in the process (tests run one at a time).</summary>
    public static long LiveTensors => Tensor.TotalCount;

    /// <summary><see cref="LiveTensors"/> once the garbage of earlier tests is gone. Finalizers of
    /// earlier tests' objects can create and drop tensor wrappers of their own while they run, which
    /// would otherwise show up as a few "leaked" tensors in a later measurement.</summary>
    public static long LiveTensorsAfterCollection()
    {
        for (int i = 0; i < 2; i++)
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
        }

        return Tensor.TotalCount;
    }

    /// <summary>Every file of a merged checkpoint, by name, for byte comparisons.</summary>
    public static Dictionary<string, byte[]> Files(string directory) =>
        Directory.GetFiles(directory).ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes, StringComparer.Ordinal);
}
