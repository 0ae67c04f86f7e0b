using MergeLab.Stages;

namespace MergeLab.Methods;

/// <summary>Which reference implementation a TIES-style merge reproduces exactly.</summary>
public enum TiesPreset
{
    /// <summary>The authors' code (Yadav et al., 2023, <c>ties-merging/src/utils/merge_utils.py</c>):
    /// trim keeps |τ| ≥ the k-th smallest |τ| with k = n − ⌊n·density⌋ over the whole model by default;
    /// weights applied after trimming; sign = sign(Σ_k w_k·τ_k) (the authors' code has no weights: with
    /// the default weights of 1 this is their Σ_k τ_k), a zero sum taking the sign of the sum of all
    /// elected signs; mean over the agreeing experts (<c>dis-mean</c>).</summary>
    Paper,

    /// <summary>mergekit (<c>sparsify.magnitude</c> + <c>generalized_task_arithmetic</c>): exactly
    /// ⌊density·n⌋ kept per tensor; weights applied after trimming; sign elected on Σ_k w_k·τ_k (0 → +);
    /// Σ w_k·τ_k·m_k / Σ w_k·m_k (divisor 0 → 1) when normalizing, which is its default for TIES.</summary>
    Mergekit,

    /// <summary>PEFT (<c>peft/utils/merge_utils.py</c> <c>ties</c>): exactly ⌊density·n⌋ kept per tensor;
    /// sign elected on the unweighted trimmed values (<c>total</c>) or their signs (<c>frequency</c>),
    /// 0 → +; Σ w_k·τ_k·m_k / max(Σ m_k, 1).</summary>
    Peft,
}

/// <summary>Options of <see cref="TiesMerge"/>.</summary>
public sealed record TiesOptions
{
    /// <summary>The reference reproduced. Default <see cref="TiesPreset.Paper"/>.</summary>
    public TiesPreset Preset { get; init => field = MergeLab.Options.Defined(value, nameof(Preset)); } = TiesPreset.Paper;

    /// <summary>Fraction of each task vector kept by the trim, in [0, 1]. Default 0.2 (the paper's
    /// top-20%).</summary>
    public double Density
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Density), 0, 1);
            field = value;
        }
    } = 0.2;

    /// <summary>Per-expert densities overriding <see cref="Density"/> (mergekit's per-model
    /// <c>density</c>); null (default) uses <see cref="Density"/> for all.</summary>
    public IReadOnlyList<double>? Densities { get; init; }

    /// <summary>Per-expert weights w_k, applied after trimming; null (default) means 1 each.</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>How each trimmed task vector is rescaled. Default <see cref="RescaleNorm.None"/> (the paper,
    /// PEFT, mergekit's <c>rescale: false</c>); <see cref="RescaleNorm.L1"/> multiplies the kept entries of
    /// each tensor by ‖τ_k‖₁ / ‖trim(τ_k)‖₁ (mergekit's <c>rescale: true</c>), for the
    /// <see cref="TiesPreset.Mergekit"/> and <see cref="TiesPreset.Peft"/> presets only. The norms are summed in float64 (see
    /// <see cref="RescaleNorm.L1"/>); on the CPU the fused kernel takes one more pass over the inputs for them.</summary>
    public RescaleNorm Rescale { get; init => field = Sparsifier.MaskRescale(value, nameof(Rescale), "A TIES trim"); }

    /// <summary>λ, the scale of the merged task vector. Default 1 (the paper tunes it in 0.8–2.5 on
    /// validation data).</summary>
    public double Lambda
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;

    /// <summary>What the sign is elected from. Default <see cref="SignElection.Sum"/> (PEFT's
    /// <c>total</c>); <see cref="SignElection.Count"/> is PEFT's <c>frequency</c>.</summary>
    public SignElection Election { get; init => field = MergeLab.Options.Defined(value, nameof(Election)); } = SignElection.Sum;

    /// <summary>Where the trim threshold (and the paper's majority sign) is computed. Null (default):
    /// whole model for <see cref="TiesPreset.Paper"/>, per tensor for the others (the only scope their
    /// exact-count trim has).</summary>
    public SelectionScope? Scope { get; init => field = MergeLab.Options.Defined(value, nameof(Scope)); }

    /// <summary>The aggregation. Null (default): the preset's — <see cref="Aggregation.MeanOfAgreeing"/>
    /// for Paper and PEFT, <see cref="Aggregation.WeightNormalized"/> for mergekit (its
    /// <c>normalize: true</c>); <see cref="Aggregation.Sum"/> gives the authors' <c>dis-sum</c> or
    /// mergekit's <c>normalize: false</c>.</summary>
    public Aggregation? Aggregation { get; init => field = MergeLab.Options.Defined(value, nameof(Aggregation)); }
}

/// <summary>
/// TIES-Merging (Yadav et al., 2023, "Resolving Interference When Merging Models"): trim each task
/// vector to its largest magnitudes, elect a sign per parameter, and average the entries that agree
/// with it: θ = θ_base + λ·aggregate_k(w_k·trim(τ_k)·m_k). See <see cref="TiesPreset"/> for how the
/// three reference implementations differ.
/// </summary>
public sealed class TiesMerge : PipelineMerge
{
    /// <summary>Creates the method; default options are the paper's (top 20%, whole model, λ = 1).</summary>
    /// <exception cref="ArgumentException">An option is out of range or the options conflict.</exception>
    public TiesMerge(TiesOptions? options = null)
        : base("ties", Build(options ?? new TiesOptions()))
    {
        Options = options ?? new TiesOptions();
    }

    /// <summary>The options this method was created with.</summary>
    public TiesOptions Options { get; }

    private static TaskVectorPipeline Build(TiesOptions o)
    {
        var scope = o.Scope ?? (o.Preset == TiesPreset.Paper ? SelectionScope.WholeModel : SelectionScope.PerTensor);
        if (o.Preset != TiesPreset.Paper && scope == SelectionScope.WholeModel)
        {
            throw new ArgumentException($"The {o.Preset} preset trims exactly ⌊density·n⌋ entries per tensor; only the Paper preset has a whole-model scope.");
        }

        if (o.Rescale != RescaleNorm.None && o.Preset == TiesPreset.Paper)
        {
            throw new ArgumentException($"{nameof(TiesOptions)}.{nameof(TiesOptions.Rescale)} {o.Rescale} needs the Mergekit or Peft preset " +
                "(mergekit's rescale goes with their exact-count trim); the Paper preset does not rescale.");
        }

        const string source = $"{nameof(TiesOptions)}.{nameof(TiesOptions.Densities)}";
        var densities = MergeLab.Options.PerExpert(o.Densities, o.Density, source, nameof(TiesOptions.Density));
        var sparsifiers = densities.Select((d, k) =>
        {
            MergeLab.Options.RequireInRange(d, $"Densities[{k}]", 0, 1);
            return o.Preset == TiesPreset.Paper ? (Sparsifier)new KthMagnitudeThreshold(d, scope) : new TopKMagnitude(d, o.Rescale);
        }).ToArray();
        var (consensus, aggregation) = TiesConsensus.For(o.Preset, o.Election, scope);
        return new TaskVectorPipeline
        {
            Sparsifiers = sparsifiers,
            SparsifierSource = source,
            Weights = o.Weights,
            Consensus = consensus,
            Aggregation = o.Aggregation ?? aggregation,
            Lambda = o.Lambda,
        };
    }
}

/// <summary>The sign-consensus stage and default aggregation of each TIES preset, shared by TIES,
/// DARE-TIES and Breadcrumbs-TIES.</summary>
internal static class TiesConsensus
{
    public static (SignConsensus Consensus, Aggregation Aggregation) For(TiesPreset preset, SignElection election, SelectionScope scope) =>
        preset switch
        {
            TiesPreset.Paper => (new SignConsensus(election, ElectOnWeighted: true, ZeroSignRule.Majority, scope), Aggregation.MeanOfAgreeing),
            TiesPreset.Mergekit => (new SignConsensus(election, ElectOnWeighted: true), Aggregation.WeightNormalized),
            TiesPreset.Peft => (new SignConsensus(election, ElectOnWeighted: false), Aggregation.MeanOfAgreeing),
            _ => throw new ArgumentOutOfRangeException(nameof(preset), preset, "Unknown TIES preset."),
        };
}
