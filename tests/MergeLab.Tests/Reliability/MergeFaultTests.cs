using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Tensors;
using MergeLab.Tests.Engine;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Faults during a checkpoint merge — an input truncated or deleted half-way, the output disk full,
/// cancellation, an exception inside a method — each leave no output and no temporary directory,
/// release every tensor, and say which tensor the merge was on.
/// </summary>
[NonParallelizable]
[FixtureLifeCycle(LifeCycle.InstancePerTestCase)] // every test gets fresh input files: some damage them
public sealed class MergeFaultTests : IDisposable
{
    private readonly TempDirectory _dir = new();
    private readonly StateDict _base = MergeFixtures.Model(1);
    private readonly StateDict _expert;
    private readonly string _basePath, _expertPath;

    public MergeFaultTests()
    {
        _expert = T.Expert(_base, 2);
        _basePath = MergeFixtures.Save(_dir, "base", _base);
        _expertPath = MergeFixtures.Save(_dir, "expert", _expert, maxShardBytes: 4096);
    }

    public void Dispose()
    {
        _base.Dispose();
        _expert.Dispose();
        _dir.Dispose();
    }

    private CheckpointMergeRequest Request(MergeMethod? method = null, int readAhead = 1) => new()
    {
        BaseModel = _basePath,
        Experts = [_expertPath],
        Method = method ?? new TaskArithmeticMerge(),
        OutputDirectory = _dir.File("out"),
        ReadAhead = readAhead,
        SmallGroupBytes = 0, // these small tensors too are mapped and read in parallel, as large ones are
    };

    /// <summary>Runs <paramref name="merge"/>, which must fail, and checks that it left nothing and
    /// released every tensor it made; returns its exception.</summary>
    private TException Fails<TException>(Action merge)
        where TException : Exception
    {
        long live = MergeFixtures.LiveTensorsAfterCollection();
        var ex = Assert.Throws<TException>(() => merge())!;
        MergeFixtures.AssertNothingLeft(_dir, "base", "expert");
        Assert.That(MergeFixtures.LiveTensors, Is.LessThanOrEqualTo(live), "every tensor the merge read or made was disposed");
        return ex;
    }

    [TestCase(true)]
    [TestCase(false)]
    public void An_input_truncated_half_way_raises_the_format_error_naming_the_file_and_the_tensor(bool mapInputs)
    {
        // Mapped or copied: the shard is cut before its tensor is read (a mapped tensor being merged when
        // its file is cut stops the process instead; see CheckpointMergeRequest.MapInputs).
        // The shard of a tensor read late in the merge (the order is the base file's: ordinal by name).
        string shard;
        using (var expert = SafetensorsCheckpoint.Open(_expertPath))
        {
            shard = expert.GetShard("model.layers.9.weight").Path;
        }

        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.TensorsDone == 2)
            {
                using var f = new FileStream(shard, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete);
                f.SetLength(f.Length / 2);
            }
        });

        var ex = Fails<SafetensorsFormatException>(() => CheckpointMerger.Merge(Request() with { MapInputs = mapInputs }, progress));

        Assert.That(ex.Path, Is.EqualTo(shard));
        Assert.That(ex.TensorName, Is.Not.Null.And.StartsWith("model.layers."));
        Assert.That(ex.Message, Does.Contain(ex.TensorName!).And.Contain("truncated"));
    }

    [Test]
    public void When_several_inputs_fail_the_first_in_input_order_is_reported()
    {
        // A group's inputs are read in parallel, yet the error must be the one a sequential read gives:
        // the first failing input's. Both experts' shards holding layer 7 (read late in the ordinal order
        // 0, 1, 10, …, 19, 2, 20, …, 23, 3, …, 9, like its shard neighbours) are cut, in input order, so a
        // read between the two cuts still fails on the first expert.
        using var second = T.Expert(_base, 3);
        string secondPath = MergeFixtures.Save(_dir, "expert2", second, maxShardBytes: 4096);
        string Shard(string checkpoint)
        {
            using var c = SafetensorsCheckpoint.Open(checkpoint);
            return c.GetShard("model.layers.7.weight").Path;
        }

        string firstShard = Shard(_expertPath), secondShard = Shard(secondPath);
        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.TensorsDone == 2)
            {
                foreach (var shard in new[] { firstShard, secondShard })
                {
                    using var f = new FileStream(shard, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete);
                    f.SetLength(f.Length / 2);
                }
            }
        });

        long live = MergeFixtures.LiveTensorsAfterCollection();
        var ex = Assert.Throws<SafetensorsFormatException>(() =>
            CheckpointMerger.Merge(Request() with { Experts = [_expertPath, secondPath] }, progress))!;
        MergeFixtures.AssertNothingLeft(_dir, "base", "expert", "expert2");
        Assert.That(MergeFixtures.LiveTensors, Is.LessThanOrEqualTo(live), "every tensor read before the failure was disposed");
        Assert.That(ex.Path, Is.EqualTo(firstShard), "the first expert's error, as a sequential read would give");
    }

    [Test]
    public void A_file_truncated_after_it_was_opened_is_never_read_as_garbage()
    {
        string path = Path.Combine(_basePath, SafetensorsCheckpoint.SingleFileName);
        using var file = SafetensorsFile.Open(path);
        using var first = file.ReadTensor(file.TensorNames[0]);
        var last = file.GetInfo(file.TensorNames[^1]);

        // Cut the file inside the last tensor: the read ends early. Then regrow it with zeros to one byte
        // short of its old size: the size check catches that before anything is read.
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete))
        {
            f.SetLength(last.DataOffset + 3);
        }

        var ex = Assert.Throws<SafetensorsFormatException>(() => file.ReadTensor(last.Name).Dispose())!;
        Assert.That(ex.TensorName, Is.EqualTo(last.Name));
        Assert.That(ex.Message, Does.StartWith(path).And.Contain(last.Name));

        using (var f = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete))
        {
            f.SetLength(file.FileLength - 1);
        }

        Assert.That(() => file.ReadTensor(last.Name).Dispose(), Throws.TypeOf<SafetensorsFormatException>()
            .With.Message.Contains("was truncated or rewritten"));
    }

    [Test]
    public void An_input_deleted_half_way_is_read_in_full_from_the_open_file()
    {
        // POSIX keeps a deleted file's data while it is open; Windows does the same for files opened
        // with FileShare.Delete, as MergeLab opens them. So the merge completes, with the original data.
        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.TensorsDone == 2)
            {
                foreach (var f in Directory.GetFiles(_expertPath))
                {
                    File.Delete(f);
                }
            }
        });

        var result = CheckpointMerger.Merge(Request(), progress);

        using var expected = new TaskArithmeticMerge().Merge(_base, [_expert]);
        T.CheckpointHolds(result.OutputDirectory, expected);
    }

    [Test]
    public void A_full_output_disk_names_the_tensor_and_leaves_nothing()
    {
        var ex = Fails<MergeException>(() => CheckpointMerger.Merge(Request() with { SimulatedDiskSpace = 10_000 }));

        Assert.That(ex.TensorName, Does.StartWith("model.layers."));
        Assert.That(ex.InnerException, Is.InstanceOf<IOException>());
        Assert.That(ex.Message, Does.Contain("writing the merged tensor").And.Contain("No space left on device"));
    }

    [TestCase("statistics")]
    [TestCase("merge")]
    public void Cancellation_leaves_nothing_and_releases_every_tensor(string stage)
    {
        using var cts = new CancellationTokenSource();
        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.Stage == stage && p.TensorsDone == 3)
            {
                cts.Cancel();
            }
        });

        // The paper's TIES has three whole-model statistic passes before the merge pass.
        Fails<OperationCanceledException>(() => CheckpointMerger.Merge(Request(new TiesMerge()), progress, cts.Token));
    }

    [TestCase("statistics")]
    [TestCase("merge")]
    public void An_exception_inside_a_method_names_the_tensor(string stage)
    {
        var method = new FailingMethod(stage == "statistics", "model.layers.5.weight");
        var ex = Fails<MergeException>(() => CheckpointMerger.Merge(Request(method)));

        Assert.That(ex.TensorName, Is.EqualTo("model.layers.5.weight"));
        Assert.That(ex.InnerException, Is.InstanceOf<InvalidOperationException>().With.Message.EqualTo("boom"));
        Assert.That(ex.Message, Does.Contain(stage == "merge" ? "merging failed: boom" : "computing the whole-model statistic failed: boom"));
    }

    [Test]
    public void Repeated_failing_merges_do_not_accumulate_tensors()
    {
        // Warm up (first-use allocations), then every kind of failure five times, with groups read ahead
        // (queued, not yet merged) when the failure comes.
        Assert.Throws<MergeException>(() => CheckpointMerger.Merge(Request(new FailingMethod(false, "model.layers.3.weight"))));
        long live = MergeFixtures.LiveTensorsAfterCollection();
        for (int round = 0; round < 5; round++)
        {
            Assert.Throws<MergeException>(() => CheckpointMerger.Merge(Request(new FailingMethod(false, "model.layers.3.weight"), readAhead: 4)));
            Assert.Throws<MergeException>(() => CheckpointMerger.Merge(Request(new FailingMethod(true, "model.layers.7.weight"), readAhead: 4)));
            Assert.Throws<MergeException>(() => CheckpointMerger.Merge(Request(readAhead: 4) with { SimulatedDiskSpace = 5_000 }));
            using var cts = new CancellationTokenSource();
            var cancelAt4 = new SynchronousProgress<CheckpointMergeProgress>(p =>
            {
                if (p.TensorsDone == 4)
                {
                    cts.Cancel();
                }
            });
            Assert.Throws<OperationCanceledException>(() => CheckpointMerger.Merge(Request(new TiesMerge(), readAhead: 4), cancelAt4, cts.Token));
        }

        Assert.That(MergeFixtures.LiveTensors, Is.LessThanOrEqualTo(live), "live tensors after 20 failed merges");
        MergeFixtures.AssertNothingLeft(_dir, "base", "expert");
    }

    /// <summary>Task arithmetic that throws on one tensor, while merging it or while observing it for a
    /// (dummy) whole-model statistic.</summary>
    private sealed class FailingMethod(bool inStatistic, string tensor) : MergeMethod
    {
        private readonly TaskArithmeticMerge _inner = new();

        public override string Name => "failing";

        public override ModelStatistic? CreateStatistic(int expertCount) => inStatistic ? new FailingStatistic(tensor) : null;

        protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic) =>
            !inStatistic && group.Name == tensor
                ? throw new InvalidOperationException("boom")
                : _inner.MergeTensor(group, null, ScalarType.Float32);
    }

    private sealed class FailingStatistic(string tensor) : ModelStatistic
    {
        public override bool IsComplete => PassesDone > 0;

        public override void Observe(TensorGroup group)
        {
            if (group.Name == tensor)
            {
                throw new InvalidOperationException("boom");
            }
        }

        protected override void CompletePass()
        {
        }
    }
}
