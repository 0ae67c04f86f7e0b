using MergeLab.Stages;

namespace MergeLab.Methods;

/// <summary>How sparsified task vectors are combined after DARE or Breadcrumbs masking.</summary>
public enum Combination
{
    /// <summary>Task arithmetic: Σ_k w_k·τ'_k (mergekit's <c>dare_linear</c>, <c>breadcrumbs</c>).</summary>
    Linear,

    /// <summary>TIES sign consensus (mergekit's <c>dare_ties</c>, <c>breadcrumbs_ties</c>).</summary>
    Ties,
}

/// <summary>Options of <see cref="DareMerge"/>.</summary>
public sealed record DareOptions
{
    /// <summary>p, the probability of dropping each task-vector entry, in [0, 1). Default 0.9 (the
    /// paper's common setting). mergekit's <c>density</c> is 1 − p.</summary>
    public double DropRate
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(DropRate), 0, 1, maxInclusive: false);
            field = value;
        }
    } = 0.9;

    /// <summary>Per-expert drop rates overriding <see cref="DropRate"/>; null (default) uses it for all.</summary>
    public IReadOnlyList<double>? DropRates { get; init; }

    /// <summary>How survivors are rescaled. Default <see cref="RescaleNorm.InverseKeepProbability"/>
    /// (1/(1−p), the paper and PEFT); <see cref="RescaleNorm.L1"/> is mergekit's <c>rescale: true</c>.</summary>
    public RescaleNorm Rescale { get; init => field = MergeLab.Options.Defined(value, nameof(Rescale)); } = RescaleNorm.InverseKeepProbability;

    /// <summary>Linear (DARE-linear, default) or TIES consensus (DARE-TIES).</summary>
    public Combination Combination { get; init => field = MergeLab.Options.Defined(value, nameof(Combination)); } = Combination.Linear;

    /// <summary>For DARE-TIES: the reference whose consensus is used. Default
    /// <see cref="TiesPreset.Mergekit"/>.</summary>
    public TiesPreset ConsensusPreset { get; init => field = MergeLab.Options.Defined(value, nameof(ConsensusPreset)); } = TiesPreset.Mergekit;

    /// <summary>The aggregation; null (default) is <see cref="Aggregation.Sum"/> for linear and
    /// mergekit-consensus DARE (mergekit's <c>normalize: false</c> default), the preset's for others.</summary>
    public Aggregation? Aggregation { get; init => field = MergeLab.Options.Defined(value, nameof(Aggregation)); }

    /// <summary>Per-expert weights; null (default) means 1 each.</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>λ. Default 1.</summary>
    public double Lambda
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;

    /// <summary>The random seed. Default 0. Results are identical for identical inputs and seed, on
    /// any thread count and in any tensor order.</summary>
    public long Seed { get; init; }
}

/// <summary>
/// DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each task-vector entry with
/// probability p, rescale the survivors, then combine by task arithmetic or TIES consensus.
/// </summary>
public sealed class DareMerge : PipelineMerge
{
    /// <summary>Creates the method; default options are DARE-linear with p = 0.9, 1/(1−p) rescale, seed 0.</summary>
    public DareMerge(DareOptions? options = null)
        : base((options ?? new DareOptions()).Combination == Combination.Ties ? "dare_ties" : "dare_linear",
            Build(options ?? new DareOptions()))
    {
        Options = options ?? new DareOptions();
    }

    /// <summary>The options this method was created with.</summary>
    public DareOptions Options { get; }

    private static TaskVectorPipeline Build(DareOptions o)
    {
        const string source = $"{nameof(DareOptions)}.{nameof(DareOptions.DropRates)}";
        var rates = MergeLab.Options.PerExpert(o.DropRates, o.DropRate, source, nameof(DareOptions.DropRate));
        var sparsifiers = rates.Select((p, k) =>
        {
            MergeLab.Options.RequireInRange(p, $"DropRates[{k}]", 0, 1, maxInclusive: false);
            return (Sparsifier)new RandomDrop(p, o.Rescale, o.Seed);
        }).ToArray();
        return Combine(sparsifiers, source, o.Combination, o.ConsensusPreset,
            o.Aggregation, o.Weights, o.Lambda);
    }

    /// <summary>The pipeline of a sparsify-then-combine method (DARE, Breadcrumbs); <paramref name="source"/>
    /// names the option the sparsifiers come from, for messages.</summary>
    internal static TaskVectorPipeline Combine(Sparsifier[] sparsifiers, string source, Combination combination, TiesPreset preset,
        Aggregation? aggregation, IReadOnlyList<double>? weights, double lambda)
    {
        SignConsensus? consensus = null;
        var defaultAggregation = Stages.Aggregation.Sum;
        if (combination == Combination.Ties)
        {
            (consensus, var presetAggregation) = TiesConsensus.For(preset, SignElection.Sum, SelectionScope.PerTensor);
            if (preset != TiesPreset.Mergekit)
            {
                defaultAggregation = presetAggregation;
            }
        }

        return new TaskVectorPipeline
        {
            Sparsifiers = sparsifiers,
            SparsifierSource = source,
            Weights = weights,
            Consensus = consensus,
            Aggregation = aggregation ?? defaultAggregation,
            Lambda = lambda,
        };
    }
}
