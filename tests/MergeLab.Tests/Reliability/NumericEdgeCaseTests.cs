using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// The numeric edge cases of issue 6, pinned to what the README documents, through the public API:
/// all-zero task vectors, a density that keeps no entry (k = 0), ties at the trim threshold, and sign
/// ties (a sum of exactly 0). Each case states the README sentence it checks.
/// </summary>
public class NumericEdgeCaseTests
{
    private static IEnumerable<TestCaseData> EveryMethod()
    {
        TestCaseData Case(string label, MergeMethod m) => new TestCaseData(m).SetArgDisplayNames(label);
        yield return Case("task arithmetic", new TaskArithmeticMerge());
        yield return Case("task arithmetic normalized", new TaskArithmeticMerge(new TaskArithmeticOptions { Normalize = true }));
        yield return Case("TIES paper", new TiesMerge());
        yield return Case("TIES paper per tensor", new TiesMerge(new TiesOptions { Scope = SelectionScope.PerTensor }));
        yield return Case("TIES mergekit", new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.5 }));
        yield return Case("TIES PEFT", new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = 0.5 }));
        yield return Case("TIES PEFT count", new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Election = SignElection.Count }));
        yield return Case("DARE", new DareMerge(new DareOptions { DropRate = 0.5, Seed = 1 }));
        yield return Case("DARE L1 TIES", new DareMerge(new DareOptions { DropRate = 0.5, Seed = 1, Rescale = RescaleNorm.L1, Combination = Combination.Ties }));
        yield return Case("Breadcrumbs paper", new BreadcrumbsMerge());
        yield return Case("Breadcrumbs mergekit", new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 0.5 }));
        yield return Case("PCB", new PcbMerge());
        yield return Case("PCB per tensor", new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor }));
    }

    /// <summary>A model whose experts are all equal to the base: every task vector is zero.</summary>
    [TestCaseSource(nameof(EveryMethod))]
    public void All_zero_task_vectors_give_back_the_base_exactly(MergeMethod method)
    {
        using var baseModel = T.RandomModel(31);
        using var e1 = baseModel.Map(t => t.clone());
        using var e2 = baseModel.Map(t => t.clone());
        using var merged = method.Merge(baseModel, [e1, e2]);
        foreach (var name in baseModel.Names)
        {
            // README: PCB "A constant row rescales to 0 instead of the reference's NaN"; DARE's L1 rescale is
            // "unscaled when either is below 1e-7"; trims of a zero vector keep nothing non-zero.
            Assert.That(merged[name].isfinite().all().item<bool>(), Is.True, $"{name} is finite");
            T.BitEqual(merged[name], baseModel[name]);
        }
    }

    [Test]
    public void Weight_averaging_identical_experts_gives_that_expert()
    {
        using var model = T.RandomModel(32);
        using var copy = model.Map(t => t.clone());
        using var merged = new WeightAverageMerge().Merge(null, [model, copy]);
        foreach (var name in model.Names)
        {
            T.Near(merged[name], model[name], 0);
        }
    }

    [Test]
    public void Pcb_with_constant_task_vectors_gives_the_base_not_nan()
    {
        // README: "A constant row rescales to 0 instead of the reference's NaN".
        using var merged = T.MergeDeltas(new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor }),
            [0.5f, 0.5f, 0.5f, 0.5f], [0.5f, 0.5f, 0.5f, 0.5f]);
        T.Near(merged, [0, 0, 0, 0], 0);
    }

    // ---- density giving k = 0 --------------------------------------------------------------------

    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void Ties_with_a_density_that_keeps_no_entry_zeroes_the_task_vector(TiesPreset preset)
    {
        // README: mergekit/PEFT keep "exactly ⌊density·n⌋ largest |τ| per tensor"; ⌊8·0.1⌋ = 0.
        // CONFIG.md: "TIES with a density that keeps no entry zeroes the task vector where mergekit asserts."
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Preset = preset, Density = 0.1 }),
            [0.1f, -0.5f, 0.3f, 0.2f, 0.05f, -0.4f, 0.25f, 0.15f]);
        T.Near(merged, (IEnumerable<double>)new double[8], 0);
    }

    [TestCase(0.1)]
    [TestCase(0.0)]
    public void Ties_paper_keeps_the_largest_entry_even_when_density_rounds_to_none(double density)
    {
        // README: the paper's trim keeps |τ| ≥ the k-th smallest |τ|, k = n − ⌊n·density⌋ — "⌊n·density⌋+1 kept, plus ties".
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Density = density, Scope = SelectionScope.PerTensor }),
            [0.1f, -0.5f, 0.3f, 0.2f, 0.05f, -0.4f, 0.25f, 0.15f]);
        T.Near(merged, [0, -0.5, 0, 0, 0, 0, 0, 0], 0);
    }

    [Test]
    public void Breadcrumbs_paper_with_beta_zero_keeps_nothing()
    {
        // README: "β = 0 keeps nothing".
        using var merged = T.MergeDeltas(new BreadcrumbsMerge(new BreadcrumbsOptions { Density = 0, Gamma = 0.1 }),
            [0.1f, -0.5f, 0.3f, 0.2f, 0.05f, -0.4f, 0.25f, 0.15f, 0.6f, -0.7f]);
        T.Near(merged, (IEnumerable<double>)new double[10], 0);
    }

    [Test]
    public void Breadcrumbs_mergekit_with_a_density_that_keeps_no_entry_keeps_nothing()
    {
        // README: mergekit's variant keeps ⌊n·density⌋ after removing ⌊n·γ⌋; ⌊10·0.05⌋ = 0.
        using var merged = T.MergeDeltas(new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 0.05, Gamma = 0.1 }),
            [0.1f, -0.5f, 0.3f, 0.2f, 0.05f, -0.4f, 0.25f, 0.15f, 0.6f, -0.7f]);
        T.Near(merged, (IEnumerable<double>)new double[10], 0);
    }

    // ---- ties at the threshold -------------------------------------------------------------------

    [Test]
    public void Ties_mergekit_breaks_ties_at_the_threshold_towards_the_lowest_positions()
    {
        // README: "exactly ⌊density·n⌋ largest |τ| per tensor, ties to the lowest positions": ⌊5·0.4⌋ = 2
        // of the three entries of magnitude 2.
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.4 }),
            [1f, 2f, -2f, 2f, 0.5f]);
        T.Near(merged, [0, 2, -2, 0, 0], 0);
    }

    [Test]
    public void Ties_paper_keeps_every_entry_tied_at_the_threshold()
    {
        // README: "keep |τ| ≥ the k-th smallest |τ|" with k = 5 − ⌊5·0.2⌋ = 4: the 4th smallest is 2, so
        // all three entries of magnitude 2 are kept ("plus ties").
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Density = 0.2, Scope = SelectionScope.PerTensor }),
            [1f, 2f, -2f, 2f, 0.5f]);
        T.Near(merged, [0, 2, -2, 2, 0], 0);
    }

    [Test]
    public void Breadcrumbs_keeps_exactly_its_count_when_magnitudes_tie_at_a_boundary()
    {
        // README: "Ties at a boundary are broken by position". n = 10, γ = 0.1 removes the 3; density 0.2
        // keeps 2 of the three entries of magnitude 1.
        using var merged = T.MergeDeltas(new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 0.2, Gamma = 0.1 }),
            [3f, 1f, -1f, 1f, 0.5f, 0.2f, 0.1f, 0.05f, 0.01f, 0.02f]);
        var values = T.Values(merged);
        Assert.That(values.Count(v => v != 0), Is.EqualTo(2));
        Assert.That(values.Where(v => v != 0).Select(Math.Abs), Has.All.EqualTo(1f));
        Assert.That(values[0], Is.Zero, "the top-γ entry is removed");
    }

    // ---- sign ties: a sum of exactly 0 -----------------------------------------------------------

    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void A_sign_tie_elects_plus_in_mergekit_and_peft(TiesPreset preset)
    {
        // README: sign(Σ_k w_k τ_k); "0 → +". Entry 0 sums to 0, so only the positive expert agrees.
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Preset = preset, Density = 1 }),
            [1f, 2f], [-1f, 3f]);
        T.Near(merged, [1, 2.5], 1e-7);
    }

    [Test]
    public void A_sign_tie_takes_the_sign_of_the_other_elected_signs_in_the_paper()
    {
        // README: "0 → sign of the sum of all elected signs". Entries 1 and 2 elect +, so entry 0 elects +
        // and its mean over agreeing experts is expert 1's 1.
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Density = 1 }),
            [1f, 2f, 3f], [-1f, 1f, 1f]);
        T.Near(merged, [1, 1.5, 2], 1e-7);
    }

    [Test]
    public void A_sign_tie_with_tied_elected_signs_lets_the_negative_entries_agree_in_the_paper()
    {
        // README: "(if that is 0 too, negative entries agree)". Entry 1 elects +, entry 2 elects −: their
        // sum is 0, so at entry 0 only expert 2's −1 agrees.
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Density = 1 }),
            [1f, 2f, -3f], [-1f, 1f, -1f]);
        T.Near(merged, [-1, 1.5, -2], 1e-7);
    }

    [TestCase(TiesPreset.Paper)]
    [TestCase(TiesPreset.Mergekit)]
    [TestCase(TiesPreset.Peft)]
    public void An_entry_of_zero_never_agrees_with_the_elected_sign(TiesPreset preset)
    {
        // README: "An entry of 0 never agrees with an elected sign": the mean at entry 0 is over expert 2 alone.
        using var merged = T.MergeDeltas(new TiesMerge(new TiesOptions { Preset = preset, Density = 1, Scope = SelectionScope.PerTensor }),
            [0f, 1f], [2f, 1f]);
        T.Near(merged, [2, 1], 1e-7);
    }

    [Test]
    public void Dare_l1_rescale_leaves_tiny_task_vectors_unscaled()
    {
        // README: mergekit's L1 rescale is "unscaled when either is below 1e-7": with τ = 1e-9 everywhere
        // the survivors stay 1e-9 (not 2e-9 for p = 0.5).
        var tau = Enumerable.Repeat(1e-9f, 64).ToArray();
        using var merged = T.MergeDeltas(new DareMerge(new DareOptions { DropRate = 0.5, Seed = 4, Rescale = RescaleNorm.L1 }), tau);
        var values = T.Values(merged);
        Assert.That(values, Has.All.EqualTo(0f).Or.EqualTo(1e-9f));
        Assert.That(values.Count(v => v == 0), Is.InRange(1, 63), "some entries were dropped and some kept");
    }
}
