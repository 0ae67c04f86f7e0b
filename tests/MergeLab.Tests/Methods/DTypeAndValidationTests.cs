using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class DTypeTests
{
    private static IEnumerable<MergeMethod> Methods() =>
    [
        new WeightAverageMerge(),
        new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = .7 }),
        new TiesMerge(),
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .5 }),
        new DareMerge(new DareOptions { DropRate = .5, Seed = 3 }),
        new BreadcrumbsMerge(),
        new PcbMerge(),
    ];

    [TestCaseSource(nameof(Methods))]
    public void Half_precision_inputs_merge_in_float32_and_come_back_in_their_dtype(MergeMethod method)
    {
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float16 })
        {
            using var baseModel = T.RandomModel(60, dtype);
            using var e1 = T.Expert(baseModel, 61);
            using var e2 = T.Expert(baseModel, 62);
            using var merged = method.Merge(baseModel, [e1, e2]);

            // The same inputs widened to float32 first, merged, then narrowed: must be identical.
            using var b32 = baseModel.To(ScalarType.Float32);
            using var e1f = e1.To(ScalarType.Float32);
            using var e2f = e2.To(ScalarType.Float32);
            using var reference = method.Merge(b32, [e1f, e2f]);
            foreach (var name in baseModel.Names)
            {
                Assert.That(merged[name].dtype, Is.EqualTo(dtype), name);
                using var narrowed = reference[name].to(dtype);
                T.BitEqual(merged[name], narrowed);
            }
        }
    }

    [Test]
    public void Output_dtype_can_be_requested()
    {
        using var baseModel = T.RandomModel(63, ScalarType.BFloat16);
        using var e1 = T.Expert(baseModel, 64);
        using var merged = new TaskArithmeticMerge().Merge(baseModel, [e1], ScalarType.Float32);
        Assert.That(merged.Select(kv => kv.Value.dtype), Is.All.EqualTo(ScalarType.Float32));
    }

    [Test]
    public void Weight_averaging_takes_the_dtype_and_integer_tensors_of_a_given_base()
    {
        using var baseModel = new StateDict
        {
            { "w", tensor(new float[] { 1, 2 }) },
            { "ids", tensor(new long[] { 0, 1, 2 }) },
        };
        using var e1 = new StateDict
        {
            { "w", tensor(new float[] { 3, 4 }, dtype: ScalarType.BFloat16) },
            { "ids", tensor(new long[] { 10, 11, 12 }) },
        };
        using var e2 = new StateDict
        {
            { "w", tensor(new float[] { 5, 8 }, dtype: ScalarType.BFloat16) },
            { "ids", tensor(new long[] { 20, 21, 22 }) },
        };
        using var merged = new WeightAverageMerge().Merge(baseModel, [e1, e2]);
        Assert.That(merged["w"].dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(merged["w"].data<float>().ToArray(), Is.EqualTo(new float[] { 4, 6 }));
        Assert.That(merged["ids"].data<long>().ToArray(), Is.EqualTo(new long[] { 0, 1, 2 }));

        using var free = new WeightAverageMerge().Merge(null, [e1, e2]);
        Assert.That(free["w"].dtype, Is.EqualTo(ScalarType.BFloat16), "without a base, the first expert's");
        Assert.That(free["ids"].data<long>().ToArray(), Is.EqualTo(new long[] { 10, 11, 12 }));
    }

    private static IEnumerable<MergeMethod> EveryMethod() =>
    [
        new WeightAverageMerge(),
        new TaskArithmeticMerge(),
        new TiesMerge(),
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit }),
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft }),
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Rescale = RescaleNorm.L1 }),
        new DareMerge(new DareOptions { Combination = Combination.Ties, Seed = 1 }),
        new BreadcrumbsMerge(),
        new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit }),
        new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Rescale = RescaleNorm.L1 }),
        new PcbMerge(),
        new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor }),
    ];

    [TestCaseSource(nameof(EveryMethod))]
    public void An_empty_tensor_merges_to_an_empty_tensor_and_leaves_the_others_as_they_were(MergeMethod method)
    {
        using var baseModel = T.RandomModel(65);
        using var e1 = T.Expert(baseModel, 66);
        using var e2 = T.Expert(baseModel, 67);
        using var without = method.Merge(baseModel, [e1, e2]);
        foreach (var model in new[] { baseModel, e1, e2 })
        {
            model.Add("empty", zeros(0, 4, dtype: ScalarType.BFloat16));
        }

        using var merged = method.Merge(baseModel, [e1, e2]);
        Assert.That(merged["empty"].shape, Is.EqualTo(new long[] { 0, 4 }));
        Assert.That(merged["empty"].dtype, Is.EqualTo(ScalarType.BFloat16));
        foreach (var name in without.Names)
        {
            T.BitEqual(merged[name], without[name]);
        }

        // A model of empty tensors only: nothing to bound, nothing to merge, no error.
        using var emptyBase = new StateDict { { "empty", zeros(0, 4) } };
        using var emptyExpert = new StateDict { { "empty", zeros(0, 4) } };
        using var nothing = method.Merge(emptyBase, [emptyExpert]);
        Assert.That(nothing["empty"].numel(), Is.Zero);
    }

    [Test]
    public void Integer_buffers_are_copied_from_the_base()
    {
        using var b = tensor(new long[] { 0, 1, 2 });
        using var e = tensor(new long[] { 5, 5, 5 });
        using var merged = new TaskArithmeticMerge().MergeTensor(new TensorGroup("position_ids", b, [e]));
        Assert.That(merged.dtype, Is.EqualTo(ScalarType.Int64));
        Assert.That(merged.data<long>().ToArray(), Is.EqualTo(new long[] { 0, 1, 2 }));
    }
}

public class ValidationTests
{
    [Test]
    public void Empty_expert_list_is_refused()
    {
        using var baseModel = T.RandomModel(70);
        var ex = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().Merge(baseModel, []));
        Assert.That(ex!.Message, Does.Contain("empty"));
    }

    [Test]
    public void Missing_base_is_refused_by_methods_that_need_it()
    {
        using var expert = T.RandomModel(71);
        var ex = Assert.Throws<MergeException>(() => new TiesMerge().Merge(null, [expert]));
        Assert.That(ex!.Message, Does.Contain("base"));
    }

    [Test]
    public void Missing_tensor_is_named()
    {
        using var baseModel = T.RandomModel(72);
        using var expert = T.Expert(baseModel, 73);
        expert.Detach("layers.0.bias").Dispose();
        var ex = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().Merge(baseModel, [expert]));
        Assert.That(ex!.Message, Does.Contain("layers.0.bias").And.Contain("expert 0"));
        Assert.That(ex.TensorName, Is.EqualTo("layers.0.bias"));
    }

    [Test]
    public void Extra_tensor_in_an_expert_is_named()
    {
        using var baseModel = T.RandomModel(74);
        using var expert = T.Expert(baseModel, 75);
        expert.Add("lm_head.weight", zeros(2, 2));
        var ex = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().Merge(baseModel, [expert]));
        Assert.That(ex!.Message, Does.Contain("lm_head.weight"));
    }

    [Test]
    public void Shape_mismatch_is_named_with_both_shapes()
    {
        using var b = zeros(2, 3);
        using var e = zeros(3, 2);
        var ex = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().MergeTensor(new TensorGroup("mlp.w", b, [e])));
        Assert.That(ex!.Message, Does.Contain("mlp.w").And.Contain("[3, 2]").And.Contain("[2, 3]"));
    }

    [Test]
    public void Empty_expert_group_is_named()
    {
        using var b = zeros(2);
        var ex = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().MergeTensor(new TensorGroup("w", b, [])));
        Assert.That(ex!.Message, Does.Contain("'w'"));
    }

    private static IEnumerable<TestCaseData> BadOptions()
    {
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Density = 1.5 }), "Density").SetName("TIES density above 1");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Density = -.1 }), "Density").SetName("TIES density below 0");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Density = double.NaN }), "Density").SetName("TIES density NaN");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesMerge(new TiesOptions { Densities = [.5, 2] })), "Densities[1]").SetName("TIES per-expert density");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Lambda = double.NaN }), "Lambda").SetName("TIES lambda NaN");
        yield return new TestCaseData(new TestDelegate(() => _ = new DareOptions { DropRate = 1 }), "DropRate").SetName("DARE p = 1");
        yield return new TestCaseData(new TestDelegate(() => _ = new DareOptions { DropRate = double.NaN }), "DropRate").SetName("DARE p NaN");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsOptions { Density = 2 }), "Density").SetName("Breadcrumbs beta above 1");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsOptions { Gamma = -1 }), "Gamma").SetName("Breadcrumbs gamma below 0");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsOptions { Gamma = double.NaN }), "Gamma").SetName("Breadcrumbs gamma NaN");
        yield return new TestCaseData(new TestDelegate(() => _ = new PcbOptions { Ratio = 0 }), "Ratio").SetName("PCB ratio 0");
        yield return new TestCaseData(new TestDelegate(() => _ = new PcbOptions { ClampLow = double.NaN }), "ClampLow").SetName("PCB clamp NaN");
        yield return new TestCaseData(new TestDelegate(() => _ = new TaskArithmeticOptions { Lambda = double.PositiveInfinity }), "Lambda").SetName("Task arithmetic lambda infinite");
        yield return new TestCaseData(new TestDelegate(() => _ = new RandomDrop(1.2)), "dropRate").SetName("RandomDrop p above 1");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsMerge(new BreadcrumbsOptions { PerExpert = [(.2, .1), (2, .1)] })), "PerExpert[1].Density")
            .SetName("Breadcrumbs per-expert beta");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsMerge(new BreadcrumbsOptions { PerExpert = [(.2, -.1)] })), "PerExpert[0].Gamma")
            .SetName("Breadcrumbs per-expert gamma");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Election = (SignElection)9 }), "Election").SetName("TIES election not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Aggregation = (Aggregation)9 }), "Aggregation").SetName("TIES aggregation not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new DareOptions { Rescale = (RescaleNorm)7 }), "Rescale").SetName("DARE rescale not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Rescale = (RescaleNorm)7 }), "Rescale").SetName("TIES rescale not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new TiesOptions { Rescale = RescaleNorm.InverseKeepProbability }), "Rescale").SetName("TIES rescale by a keep probability");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsOptions { Rescale = RescaleNorm.InverseKeepProbability }), "Rescale").SetName("Breadcrumbs rescale by a keep probability");
        yield return new TestCaseData(new TestDelegate(() => _ = new PcbOptions { Scope = (SelectionScope)5 }), "Scope").SetName("PCB scope not an enum value");

        // The pipeline stages (PipelineMerge's building blocks) check theirs as the option records do.
        yield return new TestCaseData(new TestDelegate(() => _ = new RandomDrop(0.5, (RescaleNorm)9)), "rescale").SetName("RandomDrop rescale not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new TopKMagnitude(0.5, (RescaleNorm)9)), "rescale").SetName("TopKMagnitude rescale not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsMask(0.5, 0.1, (BreadcrumbsVariant)5)), "variant").SetName("BreadcrumbsMask variant not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new BreadcrumbsMask(0.5, 0.1, BreadcrumbsVariant.Mergekit, RescaleNorm.InverseKeepProbability)), "rescale").SetName("BreadcrumbsMask rescale by a keep probability");
        yield return new TestCaseData(new TestDelegate(() => _ = new KthMagnitudeThreshold(0.5, (SelectionScope)5)), "scope").SetName("KthMagnitudeThreshold scope not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new SignConsensus((SignElection)7)), "Election").SetName("SignConsensus election not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new SignConsensus() with { ZeroRule = (ZeroSignRule)7 }), "ZeroRule").SetName("SignConsensus zero rule not an enum value");
        yield return new TestCaseData(new TestDelegate(() => _ = new SignConsensus(MajorityScope: (SelectionScope)7)), "MajorityScope").SetName("SignConsensus scope not an enum value");
    }

    [TestCaseSource(nameof(BadOptions))]
    public void Out_of_range_option_is_refused_with_its_name(TestDelegate create, string option)
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(create);
        Assert.That(ex!.Message, Does.Contain(option));
    }

    [Test]
    public void Weight_count_must_match_the_experts()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Weights = [1, 2, 3] });
        var ex = Assert.Throws<ArgumentException>(() => T.MergeDeltas(ties, [1, 2], [3, 4]));
        Assert.That(ex!.Message, Does.Contain("3 values").And.Contain("2 experts"));

        // Per-expert sparsifier settings are named by their option.
        var densities = new TiesMerge(new TiesOptions { Densities = [.2, .3, .4] });
        ex = Assert.Throws<ArgumentException>(() => T.MergeDeltas(densities, [1, 2], [3, 4]));
        Assert.That(ex!.Message, Does.Contain("TiesOptions.Densities has 3 values but there are 2 experts"));
        var one = new TaskArithmeticMerge(new TaskArithmeticOptions { Weights = [1] });
        ex = Assert.Throws<ArgumentException>(() => T.MergeDeltas(one, [1, 2], [3, 4]));
        Assert.That(ex!.Message, Does.Contain("has 1 value but"));
    }

    [Test]
    public void An_empty_per_expert_list_is_refused_when_the_method_is_created()
    {
        // Not read as "no trim, no drop, no mask", which would merge as plain task arithmetic.
        var ex = Assert.Throws<ArgumentException>(() => _ = new TiesMerge(new TiesOptions { Densities = [] }));
        Assert.That(ex!.Message, Does.Contain("TiesOptions.Densities is empty").And.Contain("leave it null to use Density"));
        ex = Assert.Throws<ArgumentException>(() => _ = new DareMerge(new DareOptions { DropRates = [] }));
        Assert.That(ex!.Message, Does.Contain("DareOptions.DropRates is empty").And.Contain("DropRate for every expert"));
        ex = Assert.Throws<ArgumentException>(() => _ = new BreadcrumbsMerge(new BreadcrumbsOptions { PerExpert = [] }));
        Assert.That(ex!.Message, Does.Contain("BreadcrumbsOptions.PerExpert is empty").And.Contain("Density and Gamma"));
    }

    [Test]
    public void An_enum_option_names_its_values_when_refused()
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => _ = new TiesOptions { Preset = (TiesPreset)4 });
        Assert.That(ex!.Message, Does.Contain("Preset must be one of Paper, Mergekit, Peft"));
        Assert.That(new TiesOptions { Scope = null }.Scope, Is.Null, "an optional enum may be left unset");
    }

    [Test]
    public void A_statistic_for_another_number_of_experts_is_refused_with_the_counts()
    {
        using var b = linspace(0, 31.0 / 7, 32).reshape(4, 8);
        using var e1 = b + 0.1f;
        using var e2 = b - 0.2f;
        var ties = new TiesMerge();
        var statistic = ties.CreateStatistic(1)!;
        while (!statistic.IsComplete)
        {
            statistic.Observe(new TensorGroup("w", b, [e1]));
            statistic.EndPass();
        }

        var ex = Assert.Throws<MergeException>(() => ties.MergeTensor(new TensorGroup("w", b, [e1, e2]), statistic));
        Assert.That(ex!.Message, Does.Contain("'w'").And.Contain("1 expert").And.Contain("has 2"));
        var pcb = new PcbMerge();
        var fresh = pcb.CreateStatistic(2)!;
        Assert.Throws<MergeException>(() => fresh.Observe(new TensorGroup("w", b, [e1])));
    }

    [Test]
    public void An_integer_output_dtype_is_refused()
    {
        using var baseModel = T.RandomModel(76);
        using var expert = T.Expert(baseModel, 77);
        var ex = Assert.Throws<ArgumentException>(() => new TaskArithmeticMerge().Merge(baseModel, [expert], ScalarType.Int32));
        Assert.That(ex!.Message, Does.Contain("floating-point").And.Contain("Int32"));
    }

    [Test]
    public void A_disposed_state_dict_is_reported_as_disposed_not_as_missing_tensors()
    {
        using var baseModel = T.RandomModel(78);
        var expert = T.Expert(baseModel, 79);
        expert.Dispose();
        Assert.Throws<ObjectDisposedException>(() => new TaskArithmeticMerge().Merge(baseModel, [expert]));
        Assert.Throws<ObjectDisposedException>(() => new WeightAverageMerge().Merge(null, [expert]));
        Assert.Throws<ObjectDisposedException>(() => _ = expert.Count);
        Assert.Throws<ObjectDisposedException>(() => expert.ContainsKey("layers.0.bias"));
        Assert.Throws<ObjectDisposedException>(() => expert.GetEnumerator());
        expert.Dispose(); // a second Dispose is allowed
    }

    [Test]
    public void The_l1_rescale_of_ties_is_refused_with_the_paper_preset()
    {
        var ex = Assert.Throws<ArgumentException>(() => _ = new TiesMerge(new TiesOptions { Preset = TiesPreset.Paper, Rescale = RescaleNorm.L1 }));
        Assert.That(ex!.Message, Does.Contain("TiesOptions.Rescale").And.Contain("Mergekit or Peft preset"));
    }

    [Test]
    public void Mean_of_agreeing_without_consensus_is_refused()
    {
        Assert.Throws<ArgumentException>(() => _ = new PipelineMerge("x", new TaskVectorPipeline { Aggregation = Aggregation.MeanOfAgreeing }));
    }
}
