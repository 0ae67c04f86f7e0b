using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>Options of <see cref="WeightAverageMerge"/>.</summary>
public sealed record WeightAverageOptions
{
    /// <summary>Per-expert weights w_k; null (default) means 1 each (a plain mean).</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>Divide by Σ w_k (mergekit <c>linear</c>'s <c>normalize</c>). Default true.</summary>
    public bool Normalize { get; init; } = true;
}

/// <summary>
/// Weight averaging ("model soups", Wortsman et al., 2022; mergekit <c>linear</c>):
/// θ = Σ_k w_k·θ_k / Σ_k w_k (no division when <see cref="WeightAverageOptions.Normalize"/> is off).
/// Needs no base model; with a base it equals task arithmetic with λ = 1/N.
/// </summary>
public sealed class WeightAverageMerge : MergeMethod
{
    /// <summary>Creates the method; default options give the plain mean of the experts.</summary>
    /// <exception cref="ArgumentException">A weight is not finite, or the weights sum to 0 (|Σ w| &lt; 1e-8,
    /// the tolerance task arithmetic's normalisation uses, so that a sum like 0.1 + 0.2 − 0.3, 5.6e-17 in
    /// doubles, is not divided by) with normalization on.</exception>
    public WeightAverageMerge(WeightAverageOptions? options = null)
    {
        Options = options ?? new WeightAverageOptions();
        if (Options.Weights is { } w)
        {
            var checkedWeights = MergeLab.Options.Weights(w, w.Count);
            if (Options.Normalize && MergeLab.Options.SumsToZero(checkedWeights.Sum()))
            {
                throw new ArgumentException("The weights sum to 0, so they cannot be normalized.", nameof(options));
            }
        }
    }

    /// <summary>The options this method was created with.</summary>
    public WeightAverageOptions Options { get; }

    /// <inheritdoc />
    public override string Name => "linear";

    /// <inheritdoc />
    public override bool RequiresBase => false;

    /// <summary>The fused average sees every expert's value in every result (the base, not averaged, is
    /// checked by the engine).</summary>
    internal override bool MayVouchForFiniteInputs => true;

    /// <inheritdoc />
    private protected override Tensor? MergeDirect(TensorGroup group, ModelStatistic? statistic, ScalarType outputType) =>
        FusedPipeline.TryAverage(group, MergeLab.Options.Weights(Options.Weights, group.ExpertCount), Options.Normalize, outputType);

    /// <inheritdoc />
    protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic)
    {
        var w = MergeLab.Options.Weights(Options.Weights, group.ExpertCount);
        var sum = TaskVector.WeightedSum(group.Experts.Select(e => e.to(ScalarType.Float32)).ToArray(), w);

        if (!Options.Normalize)
        {
            return sum;
        }

        using var total = w.Sum().ToScalar();
        return sum.div_(total);
    }
}
