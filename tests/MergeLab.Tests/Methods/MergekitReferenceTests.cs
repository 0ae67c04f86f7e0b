using MergeLab.Methods;
using MergeLab.Stages;
using NUnit.Framework;
using static MergeLab.Tests.ReferenceTaskVectors;

namespace MergeLab.Tests.Methods;

/// <summary>
/// Reference values from the reference code itself: mergekit a6e4028's <c>sparsify</c> and
/// <c>get_mask</c> with <c>GTATask.execute</c>'s arithmetic, and the PCB authors' <c>PCB_merge</c>, run with
/// PyTorch in float32 on the reference vector's task vectors and weights (<see cref="ReferenceTaskVectors"/>), density .5,
/// γ .2, each method as the CLI maps mergekit's config onto it. mergekit sums the L1 norms of its
/// <c>rescale</c> in float32 and MergeLab in float64, so the values may differ in the last bits.
/// </summary>
public class MergekitReferenceTests
{
    [Test]
    public void Ties_with_rescale_matches_mergekit()
    {
        // magnitude with rescale_norm=l1: τ1 keeps [.5, −1, 3] × 4.8/4.5, τ2 [−2, 1, −1.5] × 5.25/4.5,
        // τ3 [−.9, −2, .7] × 4.72/3.6; then the weighted sign election and the agreeing weights' mean.
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .5, Weights = Weights, Rescale = RescaleNorm.L1 });
        using var merged = T.MergeDeltas(ties, Tau1, Tau2, Tau3);
        T.Near(merged, [0.5333333015441895, -1.4888887405395508, -1.1799999475479126, -2.6222221851348877, 1.6785184144973755, 0]);
    }

    [Test]
    public void Ties_without_rescale_matches_mergekit()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .5, Weights = Weights });
        using var merged = T.MergeDeltas(ties, Tau1, Tau2, Tau3);
        T.Near(merged, [0.5, -1.3333333730697632, -0.8999999761581421, -2.0, 1.4666666984558105, 0]);
    }

    [Test]
    public void Breadcrumbs_matches_mergekit()
    {
        // magnitude_outliers: of 6 entries, the largest ⌊6·.2⌋ = 1 and the smallest 2 removed, 3 kept.
        using var merged = T.MergeDeltas(Breadcrumbs(Combination.Linear, RescaleNorm.None), Tau1, Tau2, Tau3);
        T.Near(merged, [1.5, -1.0, -1.5999999046325684, 0.5, 0.6499999761581421, 0]);
    }

    [Test]
    public void Breadcrumbs_with_rescale_matches_mergekit()
    {
        // τ1 keeps [.5, −1, .2] × 4.8/1.7, τ2 [−.4, 1, −1.5] × 5.25/2.9, τ3 [.6, −.9, .7] × 4.72/2.2.
        using var merged = T.MergeDeltas(Breadcrumbs(Combination.Linear, RescaleNorm.L1), Tau1, Tau2, Tau3);
        T.Near(merged, [3.624241352081299, -2.8235292434692383, -3.297112464904785, 0.9051724076271057, 1.645877718925476, 0]);
    }

    [Test]
    public void Breadcrumbs_ties_with_rescale_and_normalize_matches_mergekit()
    {
        using var merged = T.MergeDeltas(Breadcrumbs(Combination.Ties, RescaleNorm.L1, Aggregation.WeightNormalized), Tau1, Tau2, Tau3);
        T.Near(merged, [1.3287700414657593, -2.8235292434692383, -1.9309091567993164, 1.8103448152542114, 1.5018181800842285, 0]);
    }

    [Test]
    public void Pcb_matches_the_authors_code()
    {
        // PCB_merge(stack([τ1, τ2, τ3]), pcb_ratio=.5): clamped at sorted entries 0 and ⌊6·.9999 − 1⌋ = 4,
        // scores clamped below at sorted entry 3.
        var pcb = new PcbMerge(new PcbOptions { Ratio = .5 });
        using var merged = T.MergeDeltas(pcb, Tau1, Tau2, Tau3);
        T.Near(merged, [0, -1.251746416091919, -0.8999999761581421, -0.8999999761581421, 1.0, 0.05000000074505806]);
    }

    private static BreadcrumbsMerge Breadcrumbs(Combination combination, RescaleNorm rescale, Aggregation? aggregation = null) => new(new BreadcrumbsOptions
    {
        Aggregation = aggregation,
        Variant = BreadcrumbsVariant.Mergekit,
        Density = .5,
        Gamma = .2,
        Rescale = rescale,
        Combination = combination,
        Weights = Weights,
    });
}
