using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using MergeLab.Tests.Engine;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>Inputs holding NaN or ±∞ are found before anything is written and reported with the tensor
/// and the file; <see cref="NonFiniteInputs.Pass"/> merges them as they are.</summary>
[FixtureLifeCycle(LifeCycle.InstancePerTestCase)]
public sealed class NonFiniteInputTests : IDisposable
{
    private const string Bad = "model.layers.6.weight";
    private readonly TempDirectory _dir = new();
    private readonly StateDict _base = MergeFixtures.Model(11, tensors: 10, ScalarType.BFloat16);
    private readonly StateDict _clean;
    private readonly StateDict _poisoned;

    public NonFiniteInputTests()
    {
        _clean = T.Expert(_base, 12);
        _poisoned = T.Expert(_base, 12);
        // Three NaN and one -inf in one tensor of one expert, far from its start (not in the first chunk of
        // a naive check that looked only at the beginning).
        var w = _poisoned[Bad];
        using var flat = w.view(-1);
        foreach (long i in new long[] { 7, 100, 255 })
        {
            flat[i] = tensor(float.NaN);
        }

        flat[200] = tensor(float.NegativeInfinity);
    }

    public void Dispose()
    {
        _base.Dispose();
        _clean.Dispose();
        _poisoned.Dispose();
        _dir.Dispose();
    }

    private CheckpointMergeRequest Request(MergeMethod method, params string[] experts) => Request(method, _base, experts);

    private CheckpointMergeRequest Request(MergeMethod method, StateDict baseModel, params string[] experts) => new()
    {
        BaseModel = MergeFixtures.Save(_dir, "base", baseModel),
        Experts = experts,
        Method = method,
        OutputDirectory = _dir.File("out"),
    };

    [Test]
    public void A_nan_in_an_expert_stops_the_merge_naming_the_tensor_and_the_file()
    {
        string clean = MergeFixtures.Save(_dir, "clean", _clean);
        string poisoned = MergeFixtures.Save(_dir, "poisoned", _poisoned, maxShardBytes: 2048);
        var reports = new List<CheckpointMergeProgress>();
        var ex = Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(
            Request(new TaskArithmeticMerge(), clean, poisoned), new SynchronousProgress<CheckpointMergeProgress>(reports.Add)))!;

        Assert.That(ex.TensorName, Is.EqualTo(Bad));
        Assert.That(ex.NaNCount, Is.EqualTo(3));
        Assert.That(ex.InfinityCount, Is.EqualTo(1));
        using (var checkpoint = SafetensorsCheckpoint.Open(poisoned))
        {
            Assert.That(ex.FilePath, Is.EqualTo(checkpoint.GetShard(Bad).Path), "the shard that holds the tensor");
        }

        Assert.That(ex.Message, Does.Contain(Bad).And.Contain(ex.FilePath).And.Contain("3 NaN and 1 infinite"));
        Assert.That(ex, Is.InstanceOf<MergeException>(), "callers that catch MergeException catch this too");
        Assert.That(reports.Select(r => r.Tensor), Has.None.EqualTo(Bad), "the bad tensor is never merged");
        MergeFixtures.AssertNothingLeft(_dir, "base", "clean", "poisoned");
    }

    [Test]
    public void An_infinity_in_the_base_is_reported_with_the_base_file()
    {
        using (var flat = _base["model.layers.2.weight"].view(-1))
        {
            flat[0] = tensor(float.PositiveInfinity);
        }

        var ex = Assert.Throws<NonFiniteInputException>(() =>
            CheckpointMerger.Merge(Request(new TaskArithmeticMerge(), MergeFixtures.Save(_dir, "clean", _clean))))!;
        Assert.That(ex.TensorName, Is.EqualTo("model.layers.2.weight"));
        Assert.That(ex.FilePath, Is.EqualTo(Path.Combine(_dir.Path, "base", SafetensorsCheckpoint.SingleFileName)));
        Assert.That((ex.NaNCount, ex.InfinityCount), Is.EqualTo((0L, 1L)));
    }

    [Test]
    public void Whole_model_methods_find_it_in_their_first_statistic_pass()
    {
        var reports = new List<CheckpointMergeProgress>();
        Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(
            Request(new TiesMerge(), MergeFixtures.Save(_dir, "poisoned", _poisoned)), new SynchronousProgress<CheckpointMergeProgress>(reports.Add)));
        Assert.That(reports, Has.All.Matches<CheckpointMergeProgress>(r => r.Stage == "statistics" && r.Pass == 1));
    }

    /// <summary>Methods whose kernels may vouch for their inputs (a per-tensor selection reads every input;
    /// every input takes part in every result of task arithmetic and averaging): the engine checks after
    /// their merge, and only what the kernel did not vouch for.</summary>
    private static IEnumerable<TestCaseData> VouchingMethods(bool readsBase)
    {
        yield return new TestCaseData(new TaskArithmeticMerge()).SetArgDisplayNames("task arithmetic");
        if (!readsBase)
        {
            yield return new TestCaseData(new WeightAverageMerge()).SetArgDisplayNames("weight averaging"); // reads no base
        }

        yield return new TestCaseData(new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.3 })).SetArgDisplayNames("TIES mergekit");
        yield return new TestCaseData(new TiesMerge(new TiesOptions { Scope = SelectionScope.PerTensor })).SetArgDisplayNames("TIES paper per tensor");
        yield return new TestCaseData(new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 0.5 })).SetArgDisplayNames("Breadcrumbs mergekit");
        yield return new TestCaseData(new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor })).SetArgDisplayNames("PCB per tensor");
        yield return new TestCaseData(new DareMerge(new DareOptions { DropRate = 0.5, Rescale = RescaleNorm.L1, Combination = Combination.Ties }))
            .SetArgDisplayNames("DARE-TIES, L1 rescale");
    }

    /// <summary>A model whose tensor <see cref="Large"/> is large enough for the selection's vouching scan
    /// (the small ones are selected in memory, unvouched, and checked by the engine).</summary>
    private const string Large = "model.embed.weight";

    private static StateDict WithLarge(StateDict model, long seed, Action<Tensor>? poison = null)
    {
        using var g = new Generator((ulong)seed);
        var large = randn([400, 400], generator: g).to(ScalarType.BFloat16);
        if (poison is not null)
        {
            using var flat = large.view(-1);
            poison(flat);
        }

        var copy = model.Map(t => t.clone());
        copy.Add(Large, large);
        return copy;
    }

    [TestCaseSource(nameof(VouchingMethods), new object[] { false })]
    public void Vouching_methods_report_a_nan_as_the_check_before_the_merge_did(MergeMethod method)
    {
        using var bse = WithLarge(_base, 1);
        using var clean = WithLarge(_clean, 2);
        using var poisoned = WithLarge(_clean, 3, flat =>
        {
            flat[159_999] = tensor(float.NaN);
            flat[80_000] = tensor(float.PositiveInfinity);
        });
        var reports = new List<CheckpointMergeProgress>();
        var ex = Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(
            Request(method, bse, MergeFixtures.Save(_dir, "clean", clean), MergeFixtures.Save(_dir, "poisoned", poisoned)),
            new SynchronousProgress<CheckpointMergeProgress>(reports.Add)))!;
        Assert.That((ex.TensorName, ex.NaNCount, ex.InfinityCount), Is.EqualTo((Large, 1L, 1L)));
        Assert.That(ex.FilePath, Is.EqualTo(Path.Combine(_dir.Path, "poisoned", SafetensorsCheckpoint.SingleFileName)));
        Assert.That(reports.Select(r => r.Tensor), Has.None.EqualTo(Large), "the merged tensor is never handed on");
        MergeFixtures.AssertNothingLeft(_dir, "base", "clean", "poisoned");
    }

    [TestCaseSource(nameof(VouchingMethods), new object[] { true })]
    public void Vouching_methods_report_an_infinity_in_the_base(MergeMethod method)
    {
        using var bse = WithLarge(_base, 1, flat => flat[123] = tensor(float.NegativeInfinity));
        using var clean = WithLarge(_clean, 2);
        var ex = Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(
            Request(method, bse, MergeFixtures.Save(_dir, "clean", clean))))!;
        Assert.That((ex.TensorName, ex.NaNCount, ex.InfinityCount), Is.EqualTo((Large, 0L, 1L)));
        Assert.That(ex.FilePath, Is.EqualTo(Path.Combine(_dir.Path, "base", SafetensorsCheckpoint.SingleFileName)));
    }

    [Test]
    public void A_task_vector_that_overflows_to_infinity_is_a_false_alarm_the_check_clears()
    {
        // Finite inputs whose difference is beyond float32's range: the selection's key is +∞, so the kernel
        // vouches for nothing, and the engine's own check finds every input finite and lets the merge finish.
        using var bse = WithLarge(_base, 1, flat => flat[5] = tensor(-3e38f));
        using var expert = WithLarge(_clean, 2, flat => flat[5] = tensor(3e38f));
        var method = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.3 });
        var result = CheckpointMerger.Merge(Request(method, bse, MergeFixtures.Save(_dir, "expert", expert)));

        using var merged = SafetensorsCheckpoint.Open(result.OutputDirectory);
        using var expected = method.Merge(bse, [expert]);
        using var actual = merged.ReadTensor(Large);
        Assert.That(T.RawBytes(actual), Is.EqualTo(T.RawBytes(expected[Large])));
    }

    [Test]
    public void Inputs_a_merge_vouched_for_are_not_read_again()
    {
        using var bse = WithLarge(_base, 1);
        using var clean = WithLarge(_clean, 2);
        string expert = MergeFixtures.Save(_dir, "clean", clean);
        long Checks(MergeMethod method, string output)
        {
            long before = MergeLab.Selection.FiniteValues.Checks;
            CheckpointMerger.Merge(Request(method, bse, expert) with { OutputDirectory = _dir.File(output), SmallGroupBytes = 0 });
            return MergeLab.Selection.FiniteValues.Checks - before;
        }

        Assert.That(Checks(new TaskArithmeticMerge(), "ta"), Is.Zero, "task arithmetic vouches for every input");
        Assert.That(Checks(new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.3 }), "ties"), Is.EqualTo(2 * 10),
            "TIES vouches for the large tensor's two inputs; the ten small ones are selected in memory and checked after");
        Assert.That(Checks(new DareMerge(new DareOptions { DropRate = 0.5 }), "dare"), Is.EqualTo(2 * 11), "DARE does not vouch: all checked on reading");
    }

    [Test]
    public void With_checks_on_reading_and_after_merging_the_first_bad_tensor_is_reported()
    {
        // layers.5 is merged with TIES (checked after its merge), layers.6 with DARE (checked as it is read).
        // A slow merge of layers.4 lets the reader reach layers.6 and fail while layers.5 waits in its queue.
        using (var flat = _poisoned["model.layers.5.weight"].view(-1))
        {
            flat[3] = tensor(float.NaN);
        }

        var slow = new SlowMerge();
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.3 });
        var dare = new DareMerge(new DareOptions { DropRate = 0.5 });
        var ta = new TaskArithmeticMerge();
        var request = Request(ta, MergeFixtures.Save(_dir, "poisoned", _poisoned)) with
        {
            MethodForTensor = name => name switch
            {
                "model.layers.4.weight" => slow,
                "model.layers.5.weight" => ties,
                Bad => dare,
                _ => ta,
            },
        };
        var ex = Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(request))!;
        Assert.That(ex.TensorName, Is.EqualTo("model.layers.5.weight"));
    }

    /// <summary>Task arithmetic that takes half a second.</summary>
    private sealed class SlowMerge : MergeMethod
    {
        public override string Name => "slow";

        protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic)
        {
            Thread.Sleep(500);
            return group.Base!.to(ScalarType.Float32);
        }
    }

    [Test]
    public void A_method_that_fails_on_a_non_finite_input_is_reported_as_the_input_not_the_failure()
    {
        string poisoned = MergeFixtures.Save(_dir, "poisoned", _poisoned);
        var ex = Assert.Throws<NonFiniteInputException>(() => CheckpointMerger.Merge(Request(new FailsOnNaN(), poisoned)))!;
        Assert.That((ex.TensorName, ex.NaNCount, ex.InfinityCount), Is.EqualTo((Bad, 3L, 1L)));
    }

    /// <summary>A method that asks the engine to check after its merge and fails on NaN.</summary>
    private sealed class FailsOnNaN : MergeMethod
    {
        public override string Name => "fails_on_nan";

        internal override bool MayVouchForFiniteInputs => true;

        protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic)
        {
            if (group.Experts.Any(e => e.isnan().any().item<bool>()))
            {
                throw new InvalidOperationException("NaN");
            }

            return group.Base!.to(ScalarType.Float32);
        }
    }

    [Test]
    public void Pass_merges_non_finite_inputs_as_they_are()
    {
        var request = Request(new TaskArithmeticMerge(), MergeFixtures.Save(_dir, "poisoned", _poisoned)) with { NonFinite = NonFiniteInputs.Pass };
        var result = CheckpointMerger.Merge(request);

        using var expected = new TaskArithmeticMerge().Merge(_base, [_poisoned]);
        T.CheckpointHolds(result.OutputDirectory, expected);
        using var merged = SafetensorsCheckpoint.Open(result.OutputDirectory);
        using var bad = merged.ReadTensor(Bad);
        Assert.That(bad.isnan().sum().item<long>() + bad.isinf().sum().item<long>(), Is.EqualTo(4), "the non-finite entries carry through");
    }

    [Test]
    public void Finite_inputs_merge_as_before_and_integer_buffers_are_not_checked()
    {
        var result = CheckpointMerger.Merge(Request(new TaskArithmeticMerge(), MergeFixtures.Save(_dir, "clean", _clean)));
        Assert.That(result.TensorCount, Is.EqualTo(_base.Count));
    }
}
