using MergeLab.Methods;
using MergeLab.Stages;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class BreadcrumbsTests
{
    private static readonly float[] Rows = [5, -1, 3, .5f, -4, 1, 2, 3, 4, 5];

    [Test]
    public void Paper_masks_each_row_removing_the_top_gamma_then_keeping_beta()
    {
        // Width 5: remove ⌊5·.2⌋ = 1 largest, keep the next ⌊5·.4⌋ = 2 of each row.
        var mask = new BreadcrumbsMask(density: .4, gamma: .2, BreadcrumbsVariant.Paper);
        using var tau = T.Mat(Rows, 2, 5);
        using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
        T.Near(kept, [0, 0, 3, 0, -4, 0, 0, 3, 4, 0]);
    }

    [Test]
    public void Mergekit_masks_the_whole_tensor_with_ties_broken_by_position()
    {
        // n = 10: keep ⌊10·.4⌋ = 4 after removing the ⌊10·.1⌋ = 1 largest; ascending ranks 5..8 survive:
        // the 3 at index 7, the 4s at indices 4 and 8, the 5 at index 0 (the later 5 is removed).
        var mask = new BreadcrumbsMask(density: .4, gamma: .1, BreadcrumbsVariant.Mergekit);
        using var tau = T.Mat(Rows, 2, 5);
        using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
        T.Near(kept, [5, 0, 0, 0, -4, 0, 0, 3, 4, 0]);
    }

    [TestCase(BreadcrumbsVariant.Paper, 0, 0, 3, 0, -4, 0, 0, 3, 4, 0)]
    [TestCase(BreadcrumbsVariant.Mergekit, 5, 0, 0, 0, -4, 0, 0, 3, 4, 0)]
    public void L1_rescale_restores_the_tensors_l1_norm(BreadcrumbsVariant variant, params double[] kept)
    {
        // The masks of the two tests above; ‖τ‖₁ = 28.5 over the whole tensor, rescaled as mergekit's
        // rescale: true does (per tensor, for the per-row variant too).
        var mask = new BreadcrumbsMask(density: .4, gamma: variant == BreadcrumbsVariant.Paper ? .2 : .1, variant, RescaleNorm.L1);
        using var tau = T.Mat(Rows, 2, 5);
        using var rescaled = mask.Apply(tau, new SparsifyContext("w", 0));
        float factor = (float)(28.5 / kept.Sum(Math.Abs));
        T.Near(rescaled, kept.Select(v => (double)((float)v * factor)));
    }

    [TestCase(BreadcrumbsVariant.Paper, RescaleNorm.None)]
    [TestCase(BreadcrumbsVariant.Mergekit, RescaleNorm.None)]
    [TestCase(BreadcrumbsVariant.Mergekit, RescaleNorm.L1)]
    public void An_empty_task_vector_stays_empty(BreadcrumbsVariant variant, RescaleNorm rescale)
    {
        // The rank window reshaped to rows of the last dimension, which fails for 0 entries.
        var mask = new BreadcrumbsMask(density: .4, gamma: .1, variant, rescale);
        foreach (var shape in new long[][] { [0], [3, 0], [0, 5] })
        {
            using var tau = zeros(shape);
            using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
            Assert.That(kept.shape, Is.EqualTo(shape));
        }
    }

    [TestCase(BreadcrumbsVariant.Paper)]
    [TestCase(BreadcrumbsVariant.Mergekit)]
    public void Gamma_zero_removes_nothing(BreadcrumbsVariant variant)
    {
        // mergekit's own code zeroes the whole tensor here; the largest entries must survive instead.
        var mask = new BreadcrumbsMask(density: .4, gamma: 0, variant);
        using var tau = T.Vec(5, -1, 3, .5f, -4);
        using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
        T.Near(kept, [5, 0, 0, 0, -4]);
    }

    [Test]
    public void Paper_beta_zero_keeps_nothing()
    {
        var mask = new BreadcrumbsMask(density: 0, gamma: .2, BreadcrumbsVariant.Paper);
        using var tau = T.Vec(5, -1, 3);
        using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
        T.Near(kept, [0, 0, 0]);
    }

    [Test]
    public void Mergekit_keeps_the_target_count_when_gamma_and_density_overlap()
    {
        // density .8 + gamma .4 > 1: mergekit removes fewer outliers so that ⌊n·density⌋ = 4 survive.
        var mask = new BreadcrumbsMask(density: .8, gamma: .4, BreadcrumbsVariant.Mergekit);
        using var tau = T.Vec(5, -1, 3, .5f, -4);
        using var kept = mask.Apply(tau, new SparsifyContext("w", 0));
        T.Near(kept, [0, -1, 3, .5, -4]);
    }

    [TestCase(BreadcrumbsVariant.Paper, Combination.Linear)]
    [TestCase(BreadcrumbsVariant.Mergekit, Combination.Linear)]
    [TestCase(BreadcrumbsVariant.Paper, Combination.Ties)]
    public void Keeping_everything_and_removing_nothing_equals_task_arithmetic(BreadcrumbsVariant variant, Combination combination)
    {
        using var baseModel = T.RandomModel(30);
        using var expert = T.Expert(baseModel, 31);
        var options = new BreadcrumbsOptions { Variant = variant, Density = 1, Gamma = 0, Combination = combination, Lambda = .6 };
        using var crumbs = new BreadcrumbsMerge(options).Merge(baseModel, [expert]);
        using var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = .6 }).Merge(baseModel, [expert]);
        foreach (var name in ta.Names)
        {
            T.BitEqual(crumbs[name], ta[name]);
        }
    }

    [Test]
    public void Masked_task_vectors_are_summed_and_scaled()
    {
        var method = new BreadcrumbsMerge(new BreadcrumbsOptions { Density = .4, Gamma = .2, Lambda = .5 });
        using var merged = T.MergeDeltas(method, [5, -1, 3, .5f, -4], [1, 2, 3, 4, 5]);
        // Row masks: [0,0,3,0,−4] and [0,0,3,4,0]; sum [0,0,6,4,−4]; times .5.
        T.Near(merged, [0, 0, 3, 2, -2]);
    }
}
