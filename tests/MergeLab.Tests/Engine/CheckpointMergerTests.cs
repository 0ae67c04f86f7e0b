using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Engine;

public class CheckpointMergerTests
{
    /// <summary>Writes <paramref name="model"/> as a checkpoint directory, sharded when <paramref name="maxShardBytes"/> is small.</summary>
    private static string Save(TempDirectory dir, string name, StateDict model, long maxShardBytes = long.MaxValue)
    {
        string path = Path.Combine(dir.Path, name);
        Directory.CreateDirectory(path);
        using (var writer = new ShardedCheckpointWriter(path, maxShardBytes))
        {
            foreach (var (n, t) in model)
            {
                writer.Add(n, t.clone()); // the writer takes ownership
            }

            writer.Complete();
        }

        File.WriteAllText(Path.Combine(path, "config.json"), $"{{\"name\": \"{name}\"}}");
        return path;
    }

    private static IEnumerable<MergeMethod> Methods() =>
    [
        new TiesMerge(), // whole-model threshold and majority sign: three statistic passes
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .4, Weights = [1, .5, 2] }),
        new DareMerge(new DareOptions { DropRate = .6, Seed = 5, Combination = Combination.Ties }),
        new PcbMerge(new PcbOptions { Ratio = .3 }),
        new BreadcrumbsMerge(),
        new WeightAverageMerge(),
    ];

    [TestCaseSource(nameof(Methods))]
    public void Streaming_merge_is_bit_identical_to_the_in_memory_merge(MergeMethod method)
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(90, ScalarType.BFloat16);
        using var e1 = T.Expert(baseModel, 91);
        using var e2 = T.Expert(baseModel, 92);
        using var e3 = T.Expert(baseModel, 93);
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel, maxShardBytes: 300),
            Experts = [Save(dir, "e1", e1), Save(dir, "e2", e2, 200), Save(dir, "e3", e3)],
            Method = method,
            OutputDirectory = Path.Combine(dir.Path, "out"),
            MaxShardBytes = 250,
        };
        var result = CheckpointMerger.Merge(request);

        using var expected = method.Merge(baseModel, [e1, e2, e3]);
        using var merged = SafetensorsCheckpoint.Open(result.OutputDirectory);
        Assert.That(merged.TensorNames.Order(), Is.EqualTo(expected.Names.Order()));
        foreach (var name in expected.Names)
        {
            using var actual = merged.ReadTensor(name);
            T.BitEqual(actual, expected[name]);
        }

        Assert.That(result.Files, Does.Contain("config.json").And.Contain(SafetensorsCheckpoint.IndexFileName));
        Assert.That(File.ReadAllText(Path.Combine(result.OutputDirectory, "config.json")), Does.Contain("base"));
    }

    [Test]
    public void Mapped_and_copied_inputs_give_the_same_bytes()
    {
        // TIES reads every input four times (three statistic passes, then the merge); bfloat16 and float32
        // inputs, some sharded, all mapped by default and all copied when MapInputs is off.
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(94, ScalarType.BFloat16);
        using var e1 = T.Expert(baseModel, 95);
        using var e2f = T.Expert(baseModel, 96);
        using var e2 = e2f.To(ScalarType.Float32);
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel, maxShardBytes: 300),
            Experts = [Save(dir, "e1", e1, 200), Save(dir, "e2", e2)],
            Method = new TiesMerge(),
            OutputDirectory = Path.Combine(dir.Path, "mapped"),
        };

        long before = MappedTensors.MappedCount;
        var mapped = CheckpointMerger.Merge(request);
        long count = MappedTensors.MappedCount - before;
        var copied = CheckpointMerger.Merge(request with { OutputDirectory = Path.Combine(dir.Path, "copied"), MapInputs = false });

        Assert.That(count, Is.EqualTo(4 * 3 * baseModel.Count), "every input tensor mapped on each of the four passes");
        Assert.That(MappedTensors.MappedCount - before, Is.EqualTo(count), "nothing mapped with MapInputs off");
        Assert.That(copied.Files, Is.EqualTo(mapped.Files));
        foreach (var f in mapped.Files)
        {
            Assert.That(File.ReadAllBytes(Path.Combine(copied.OutputDirectory, f)), Is.EqualTo(File.ReadAllBytes(Path.Combine(mapped.OutputDirectory, f))), f);
        }

        using var expected = request.Method.Merge(baseModel, [e1, e2]);
        using var merged = SafetensorsCheckpoint.Open(mapped.OutputDirectory);
        foreach (var name in expected.Names)
        {
            using var actual = merged.ReadTensor(name);
            T.BitEqual(actual, expected[name]);
        }
    }

    [Test]
    public void Progress_covers_every_tensor_and_byte_of_each_pass()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(95);
        using var e1 = T.Expert(baseModel, 96);
        var reports = new List<CheckpointMergeProgress>();
        var result = CheckpointMerger.Merge(new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1)],
            Method = new TiesMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        }, new SynchronousProgress<CheckpointMergeProgress>(reports.Add));

        Assert.That(result.StatisticPasses, Is.EqualTo(3));
        var merge = reports.Where(r => r.Stage == "merge").ToArray();
        Assert.That(merge, Has.Length.EqualTo(baseModel.Count));
        Assert.That(merge[^1].BytesDone, Is.EqualTo(merge[^1].BytesTotal));
        Assert.That(merge[^1].BytesTotal, Is.EqualTo(2 * baseModel.ElementCount * 4));
        Assert.That(reports.Count(r => r.Stage == "statistics"), Is.EqualTo(3 * baseModel.Count));
    }

    [Test]
    public void Cancelled_merge_leaves_no_output_and_no_temporary_directory()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(97);
        using var e1 = T.Expert(baseModel, 98);
        using var cts = new CancellationTokenSource();
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1)],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.TensorsDone == 2)
            {
                cts.Cancel();
            }
        });
        Assert.Throws<OperationCanceledException>(() => CheckpointMerger.Merge(request, progress, cts.Token));
        Assert.That(Directory.GetDirectories(dir.Path).Select(Path.GetFileName), Is.EquivalentTo(new[] { "base", "e1" }));
    }

    [Test]
    public void A_failing_method_names_the_tensor_and_leaves_nothing()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(99);
        using var e1 = T.Expert(baseModel, 100);
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1)],
            Method = new TaskArithmeticMerge(),
            MethodForTensor = name => name == "layers.0.bias" ? new FailingMethod() : new TaskArithmeticMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("layers.0.bias").And.Contain("boom"));
        Assert.That(Directory.GetDirectories(dir.Path), Has.Length.EqualTo(2));
    }

    [Test]
    public void Mismatched_architectures_are_refused_before_any_work()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(101);
        using var other = new StateDict { { "embed.weight", zeros(16, 8) } };
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "other", other)],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("has no tensor of this name").And.Contain("other"));
        Assert.That(Directory.Exists(request.OutputDirectory), Is.False);
    }

    [Test]
    public void An_existing_output_is_refused_unless_overwriting()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(102);
        using var e1 = T.Expert(baseModel, 103);
        string output = Path.Combine(dir.Path, "out");
        Directory.CreateDirectory(output);
        File.WriteAllText(Path.Combine(output, "keep.txt"), "mine");
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1)],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = output,
        };
        Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(File.Exists(Path.Combine(output, "keep.txt")), Is.True);

        CheckpointMerger.Merge(request with { Overwrite = true });
        Assert.That(File.Exists(Path.Combine(output, "keep.txt")), Is.False);
        Assert.That(File.Exists(Path.Combine(output, SafetensorsCheckpoint.SingleFileName)), Is.True);
    }

    private sealed class FailingMethod : MergeMethod
    {
        public override string Name => "failing";

        protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic) => throw new InvalidOperationException("boom");
    }
}

/// <summary>An IProgress that reports on the calling thread (Progress&lt;T&gt; posts to the thread pool).</summary>
internal sealed class SynchronousProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
