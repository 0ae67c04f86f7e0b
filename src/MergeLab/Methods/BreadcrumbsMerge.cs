using MergeLab.Stages;

namespace MergeLab.Methods;

/// <summary>Options of <see cref="BreadcrumbsMerge"/>.</summary>
public sealed record BreadcrumbsOptions
{
    /// <summary>Per row (<see cref="BreadcrumbsVariant.Paper"/>, default) or per tensor (mergekit).</summary>
    public BreadcrumbsVariant Variant { get; init => field = MergeLab.Options.Defined(value, nameof(Variant)); } = BreadcrumbsVariant.Paper;

    /// <summary>β (paper) / <c>density</c> (mergekit): the fraction kept, in [0, 1]. Default 0.2, the
    /// reference README's example.</summary>
    public double Density
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Density), 0, 1);
            field = value;
        }
    } = 0.2;

    /// <summary>γ: the fraction of largest magnitudes removed, in [0, 1]. Default 0.1, the reference
    /// README's example (mergekit's default is 0.01). 0 removes nothing.</summary>
    public double Gamma
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Gamma), 0, 1);
            field = value;
        }
    } = 0.1;

    /// <summary>Per-expert (density, gamma) pairs overriding the shared ones, each in [0, 1]; null (default)
    /// uses them.</summary>
    public IReadOnlyList<(double Density, double Gamma)>? PerExpert
    {
        get;
        init
        {
            for (int k = 0; k < (value?.Count ?? 0); k++)
            {
                MergeLab.Options.RequireInRange(value![k].Density, $"PerExpert[{k}].Density", 0, 1);
                MergeLab.Options.RequireInRange(value[k].Gamma, $"PerExpert[{k}].Gamma", 0, 1);
            }

            field = value;
        }
    }

    /// <summary>How each masked task vector is rescaled. Default <see cref="RescaleNorm.None"/> (the paper,
    /// mergekit's <c>rescale: false</c>); <see cref="RescaleNorm.L1"/> multiplies the kept entries of each tensor
    /// by ‖τ_k‖₁ / ‖mask(τ_k)‖₁ (mergekit's <c>rescale: true</c>). The norms are summed in float64; on the
    /// CPU the fused kernel takes one more pass over the inputs for them (the per-row Paper variant runs as
    /// libtorch operations).</summary>
    public RescaleNorm Rescale { get; init => field = Sparsifier.MaskRescale(value, nameof(Rescale), "The Breadcrumbs mask"); }

    /// <summary>Linear (default; mergekit <c>breadcrumbs</c>) or TIES consensus (<c>breadcrumbs_ties</c>).</summary>
    public Combination Combination { get; init => field = MergeLab.Options.Defined(value, nameof(Combination)); } = Combination.Linear;

    /// <summary>For the TIES combination: whose consensus. Default <see cref="TiesPreset.Mergekit"/>.</summary>
    public TiesPreset ConsensusPreset { get; init => field = MergeLab.Options.Defined(value, nameof(ConsensusPreset)); } = TiesPreset.Mergekit;

    /// <summary>The aggregation; null (default) is <see cref="Aggregation.Sum"/> for the linear
    /// combination (the paper's sum) and for mergekit's consensus (its <c>normalize: false</c> default),
    /// and the preset's aggregation for the Paper and PEFT consensus.</summary>
    public Aggregation? Aggregation { get; init => field = MergeLab.Options.Defined(value, nameof(Aggregation)); }

    /// <summary>Per-expert weights; null (default) means 1 each.</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>λ (the paper's α). Default 1; the paper tunes it (0.2–0.4 typical for many tasks).</summary>
    public double Lambda
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;
}

/// <summary>
/// Model Breadcrumbs (Davari &amp; Belilovsky, 2024, "Model Breadcrumbs: Scaling Multi-Task Model
/// Merging with Sparse Masks"): per layer, mask out the largest-magnitude outliers (top γ) and the
/// smallest perturbations, keeping a β fraction, then combine. See <see cref="BreadcrumbsVariant"/>.
/// </summary>
public sealed class BreadcrumbsMerge : PipelineMerge
{
    /// <summary>Creates the method; default options are the paper's per-row mask with β = 0.2, γ = 0.1.</summary>
    public BreadcrumbsMerge(BreadcrumbsOptions? options = null)
        : base((options ?? new BreadcrumbsOptions()).Combination == Combination.Ties ? "breadcrumbs_ties" : "breadcrumbs",
            Build(options ?? new BreadcrumbsOptions()))
    {
        Options = options ?? new BreadcrumbsOptions();
    }

    /// <summary>The options this method was created with.</summary>
    public BreadcrumbsOptions Options { get; }

    private static TaskVectorPipeline Build(BreadcrumbsOptions o)
    {
        const string source = $"{nameof(BreadcrumbsOptions)}.{nameof(BreadcrumbsOptions.PerExpert)}";
        var pairs = MergeLab.Options.PerExpert(o.PerExpert, (o.Density, o.Gamma), source,
            $"{nameof(BreadcrumbsOptions.Density)} and {nameof(BreadcrumbsOptions.Gamma)}");
        var sparsifiers = pairs.Select(p => (Sparsifier)new BreadcrumbsMask(p.Density, p.Gamma, o.Variant, o.Rescale)).ToArray();
        return DareMerge.Combine(sparsifiers, source, o.Combination,
            o.ConsensusPreset, o.Aggregation, o.Weights, o.Lambda);
    }
}
