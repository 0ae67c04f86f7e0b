using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class TiesTests
{
    [Test]
    public void Paper_trim_keeps_floor_n_density_plus_one_entries()
    {
        // n = 5, density .4: k = 5 − 2 = 3, the 3rd smallest |τ| is 2, so |τ| ≥ 2 survives (3 entries).
        var trim = new KthMagnitudeThreshold(.4, SelectionScope.PerTensor);
        using var tau = T.Vec(4, -3, 2, 1, .5f);
        using var trimmed = trim.Apply(tau, new SparsifyContext("w", 0));
        T.Near(trimmed, [4, -3, 2, 0, 0]);
    }

    [Test]
    public void Paper_trim_keeps_every_tie_at_the_threshold()
    {
        // k = 4 − 2 = 2: the 2nd smallest |τ| is 1, and all three entries of magnitude 1 survive.
        var trim = new KthMagnitudeThreshold(.5, SelectionScope.PerTensor);
        using var tau = T.Vec(1, -1, 1, .5f);
        using var trimmed = trim.Apply(tau, new SparsifyContext("w", 0));
        T.Near(trimmed, [1, -1, 1, 0]);
    }

    [Test]
    public void Paper_zero_sum_takes_the_majority_of_elected_signs()
    {
        // Sums [−1, 1, 0, −1]: signs [−, +, 0, −], majority sign(−1) = −, so entry 2 elects − and keeps τ2's −1.
        var paper = new TiesMerge(new TiesOptions { Density = 1, Scope = SelectionScope.PerTensor });
        using var merged = T.MergeDeltas(paper, [-3, -1, 1, -2], [2, 2, -1, 1]);
        T.Near(merged, [-3, 2, -1, -2]);

        // mergekit breaks the same tie towards +: entry 2 keeps τ1's +1.
        var mergekit = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 1 });
        using var mk = T.MergeDeltas(mergekit, [-3, -1, 1, -2], [2, 2, -1, 1]);
        T.Near(mk, [-3, 2, 1, -2]);
    }

    [Test]
    public void A_positive_subnormal_entry_agrees_with_an_elected_plus()
    {
        // τ1 = 1e-40 (below float32's smallest normal), τ2 = 1: both positive, so the disjoint mean is 0.5 —
        // in the kernel's tail (8 entries, and the odd 11th of the second case) as in its blocks.
        var peft = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = 1 });
        using var small = T.MergeDeltas(peft, Enumerable.Repeat(1e-40f, 8).ToArray(), Enumerable.Repeat(1f, 8).ToArray());
        T.Near(small, Enumerable.Repeat(.5, 8));
        using var weighted = T.MergeDeltas(new TiesMerge(peft.Options with { Weights = [1, 3] }),
            Enumerable.Repeat(1e-40f, 4099).ToArray(), Enumerable.Repeat(1f, 4099).ToArray());
        T.Near(weighted, Enumerable.Repeat(1.5, 4099)); // (1e-40·1 + 1·3) / 2
    }

    [Test]
    public void Peft_elects_on_the_unweighted_and_mergekit_on_the_weighted_task_vectors()
    {
        // τ = [1] and [−.6] with weights .5 and 1. Unweighted, the sum 1 − .6 elects +, so PEFT keeps the
        // weighted .5 alone (mean of one agreeing entry); weighted, .5 − .6 elects −, so mergekit keeps
        // −.6 and divides by the agreeing weight 1.
        var peft = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = 1, Weights = [.5, 1] });
        using var p = T.MergeDeltas(peft, [1], [-.6f]);
        T.Near(p, [.5]);

        var mergekit = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 1, Weights = [.5, 1] });
        using var m = T.MergeDeltas(mergekit, [1], [-.6f]);
        T.Near(m, [-.6]);

        // The paper elects on the weighted sum too (its weights are λ-free, 1 by default).
        var paper = new TiesMerge(new TiesOptions { Density = 1, Scope = SelectionScope.PerTensor, Weights = [.5, 1] });
        using var q = T.MergeDeltas(paper, [1], [-.6f]);
        T.Near(q, [-.6]);
    }

    /// <summary>The majority that settles a zero sum counts every block of a large tensor (the kernel sums
    /// the signs in blocks of 32,768): the first block elects −, the next two +, the last (1,696 entries) −
    /// but for its last entry, whose sum is 0. The majority (65,536 + against 34,463 −) gives that entry +,
    /// where the first or the last block alone would give −.</summary>
    [Test]
    public void Paper_zero_sum_majority_counts_every_block_of_a_large_tensor()
    {
        const int n = 100_000;
        var t1 = new float[n];
        var t2 = new float[n];
        for (int i = 0; i < n; i++)
        {
            t1[i] = t2[i] = i < 32_768 || i >= 3 * 32_768 ? -1 : 1;
        }

        t1[n - 1] = 1;
        t2[n - 1] = -1;
        var paper = new TiesMerge(new TiesOptions { Density = 1, Scope = SelectionScope.PerTensor });
        using var merged = T.MergeDeltas(paper, t1, t2);
        var values = T.Values(merged);
        Assert.That(values[n - 1], Is.EqualTo(1f));
        Assert.That(values[0], Is.EqualTo(-1f));
        Assert.That(values[(3 * 32_768) - 1], Is.EqualTo(1f));
        Assert.That(values[n - 2], Is.EqualTo(-1f));
    }

    [Test]
    public void Paper_dis_sum_adds_instead_of_averaging()
    {
        var paper = new TiesMerge(new TiesOptions { Density = 1, Scope = SelectionScope.PerTensor, Aggregation = Aggregation.Sum });
        using var merged = T.MergeDeltas(paper, [1, 2], [3, -1], [2, -4]);
        // Signs: [+, −]; entry 0: 1 + 3 + 2; entry 1: −1 − 4.
        T.Near(merged, [6, -5]);
    }

    [Test]
    public void Lambda_scales_the_merged_task_vector()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = 1, Lambda = .5 });
        using var merged = T.MergeDeltas(ties, [2, -4], [4, 2]);
        T.Near(merged, [1.5, -2]); // means of agreeing entries: [3, −4] (entry 1: sum −2 → −), times .5
    }

    [Test]
    public void Whole_model_threshold_is_taken_over_all_tensors_of_an_expert()
    {
        using var baseModel = Model(a: [0, 0, 0], b: [0, 0, 0]);
        using var expert = Model(a: [10, 9, 8], b: [1, 2, 3]);
        // n = 6, density .5: k = 3, the 3rd smallest |τ| over the model is 3.
        var global = new TiesMerge(new TiesOptions { Density = .5 });
        using var merged = global.Merge(baseModel, [expert]);
        T.Near(merged["a"], [10, 9, 8]);
        T.Near(merged["b"], [0, 0, 3]);

        // Per tensor: k = 3 − 1 = 2 in each tensor.
        var local = new TiesMerge(new TiesOptions { Density = .5, Scope = SelectionScope.PerTensor });
        using var perTensor = local.Merge(baseModel, [expert]);
        T.Near(perTensor["a"], [10, 9, 0]);
        T.Near(perTensor["b"], [0, 2, 3]);
    }

    [Test]
    public void Whole_model_majority_sign_comes_from_every_tensor()
    {
        // Tensor a ties (1 vs −1); tensor b elects + twice, so the model's majority is + and a keeps +1.
        using var baseModel = Model(a: [0], b: [0, 0]);
        using var e1 = Model(a: [1], b: [5, 5]);
        using var e2 = Model(a: [-1], b: [1, 1]);
        var global = new TiesMerge(new TiesOptions { Density = 1 });
        using var merged = global.Merge(baseModel, [e1, e2]);
        T.Near(merged["a"], [1]);

        // Per tensor the majority of a alone is 0, so (as the authors' where(sign > 0, …)) the negative side survives.
        var local = new TiesMerge(new TiesOptions { Density = 1, Scope = SelectionScope.PerTensor });
        using var perTensor = local.Merge(baseModel, [e1, e2]);
        T.Near(perTensor["a"], [-1]);
    }

    [Test]
    public void Whole_model_statistic_matches_kthvalue_over_the_concatenated_model()
    {
        using var baseModel = T.RandomModel(1);
        using var expert = T.Expert(baseModel, 2);
        var method = new TiesMerge(new TiesOptions { Density = .3 });
        using var merged = method.Merge(baseModel, [expert]);

        using var tv = TaskVector.Between(expert, baseModel);
        using var kth = Threshold(tv, .3);
        float threshold = kth.item<float>();
        foreach (var (name, delta) in tv.Deltas)
        {
            using var expected = baseModel[name] + delta * delta.abs().ge(threshold);
            T.Near(merged[name], expected, 1e-6);
        }
    }

    /// <summary>The whole-model TIES threshold of <paramref name="tv"/> by libtorch: the k-th smallest of all
    /// its magnitudes, concatenated, with k = n − ⌊n·density⌋.</summary>
    private static Tensor Threshold(TaskVector tv, double density)
    {
        using var scope = NewDisposeScope();
        var all = cat(tv.Deltas.Select(kv => kv.Value.flatten()).ToArray()).abs();
        long n = all.numel();
        long k = n - (long)Math.Floor(n * density);
        return all.kthvalue(k, 0, false).values.MoveToOuterDisposeScope();
    }

    /// <summary>The same on a model large enough for the CPU's bracket selection (over 2¹⁷ magnitudes,
    /// 407,798 here, in bfloat16 and float32 tensors, two of them 2-D), against libtorch's kthvalue of the
    /// concatenated magnitudes, bit for bit.</summary>
    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float32)]
    public void Whole_model_statistic_of_a_large_model_matches_kthvalue(ScalarType dtype)
    {
        using var baseModel = T.DrawnModel(5, ("a", [300, 1100], dtype), ("b", [77_777], dtype), ("c", [3, 7], dtype));
        using var expert = T.Expert(baseModel, 6, .02);
        using var merged = new TiesMerge(new TiesOptions { Density = .3 }).Merge(baseModel, [expert]);

        using var tv = TaskVector.Between(expert, baseModel);
        using var scope = NewDisposeScope();
        var threshold = Threshold(tv, .3);
        foreach (var (name, delta) in tv.Deltas)
        {
            var expected = (baseModel[name].to(ScalarType.Float32) + (delta * delta.abs().ge(threshold))).to(dtype);
            T.BitEqual(merged[name], expected, name);
        }
    }

    [TestCase(TiesPreset.Paper)]
    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void Density_one_with_one_expert_equals_task_arithmetic(TiesPreset preset)
    {
        using var baseModel = T.RandomModel(3);
        using var expert = T.Expert(baseModel, 4);
        using var ties = new TiesMerge(new TiesOptions { Preset = preset, Density = 1 }).Merge(baseModel, [expert]);
        using var ta = new TaskArithmeticMerge().Merge(baseModel, [expert]);
        foreach (var name in ta.Names)
        {
            T.BitEqual(ties[name], ta[name]);
        }
    }

    [TestCase(TiesPreset.Paper)]
    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void Identical_experts_merge_to_that_expert(TiesPreset preset)
    {
        using var baseModel = T.RandomModel(5);
        using var expert = T.Expert(baseModel, 6);
        using var merged = new TiesMerge(new TiesOptions { Preset = preset, Density = 1 }).Merge(baseModel, [expert, expert, expert]);
        foreach (var name in expert.Names)
        {
            T.Near(merged[name], expert[name], 1e-6);
        }
    }

    [Test]
    public void Density_zero_keeps_only_the_base_for_exact_count_presets()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0 });
        using var merged = T.MergeDeltas(ties, [1, -2, 3], [2, 2, 2]);
        T.Near(merged, [0, 0, 0]);
    }

    [Test]
    public void Per_expert_densities_apply_to_their_own_expert()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Densities = [.25, 1] });
        // τ1 keeps its one largest entry (4); τ2 keeps all.
        using var merged = T.MergeDeltas(ties, [1, 1, 4, 1], [1, 1, 2, 1]);
        T.Near(merged, [1, 1, 3, 1]);
    }

    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void L1_rescale_keeps_the_trimmed_task_vectors_l1_norm(TiesPreset preset)
    {
        // One expert, so the merge is its trimmed and rescaled τ: the ⌊.3·n⌋ largest entries, each times
        // ‖τ‖₁ / ‖trim(τ)‖₁. 150,000 entries: nine whole norm blocks and a part, so the fused kernel sums
        // eight blocks side by side and the rest alone, and must agree with the sparsifier's own pass.
        using var scope = NewDisposeScope();
        using var generator = new TorchSharp.torch.Generator(11);
        var tau = randn(250, 600, generator: generator) * exp(randn(250, 1, generator: generator));
        var ties = new TiesMerge(new TiesOptions { Preset = preset, Density = .3, Rescale = RescaleNorm.L1 });
        var plain = new TiesMerge(new TiesOptions { Preset = preset, Density = .3 });
        var merged = ties.MergeTensor(new TensorGroup("w", zeros_like(tau), [tau]));
        var trimmed = plain.MergeTensor(new TensorGroup("w", zeros_like(tau), [tau]));

        Assert.That(merged.count_nonzero().item<long>(), Is.EqualTo(45_000));
        double before = tau.abs().sum(ScalarType.Float64).item<double>();
        double after = trimmed.abs().sum(ScalarType.Float64).item<double>();
        Assert.That(after, Is.LessThan(before * .8), "the trim removes mass");
        Assert.That(merged.abs().sum(ScalarType.Float64).item<double>(), Is.EqualTo(before).Within(1e-5).Percent);
        T.BitEqual(merged, trimmed * (float)(before / after));
        var sparsified = new TopKMagnitude(.3, RescaleNorm.L1).Apply(tau, new SparsifyContext("w", 0));
        Assert.That(merged.eq(sparsified).all().item<bool>(), Is.True, "the fused kernel and the sparsifier agree");
    }

    [TestCase(true)]
    [TestCase(false)]
    public void L1_rescale_of_a_trim_that_keeps_nothing_spreads_a_non_finite_entry_as_mergekit_does(bool cpuKernels)
    {
        // ⌊3·.2⌋ = 0 entries kept: τ·0 holds a NaN where τ is ∞, so ‖masked‖₁ is NaN and so is the factor;
        // mergekit's masked * (before / after) then makes the whole tensor NaN, and so must both paths.
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .2, Rescale = RescaleNorm.L1 });
        using var kernels = T.CpuKernels(cpuKernels);
        using var merged = T.MergeDeltas(ties, [1, float.PositiveInfinity, -2]);
        var values = T.Values(merged);
        Assert.That(values.All(float.IsNaN), Is.True, string.Join(", ", values));
    }

    [Test]
    public void Whole_model_method_refuses_a_lone_tensor_without_its_statistic()
    {
        var ties = new TiesMerge();
        using var b = zeros(3);
        using var e = ones(3);
        var ex = Assert.Throws<MergeException>(() => ties.MergeTensor(new("layer.w", b, [e])));
        Assert.That(ex!.Message, Does.Contain("layer.w").And.Contain("whole model"));
    }

    private static StateDict Model(float[] a, float[] b) => new() { { "a", tensor(a) }, { "b", tensor(b) } };
}
