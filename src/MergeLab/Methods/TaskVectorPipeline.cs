using MergeLab.Stages;
using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// The stages of a task-vector merge, shared by task arithmetic, TIES, DARE and Breadcrumbs (the shape
/// of mergekit's generalized task arithmetic): sparsify each τ_k (unweighted) → weight by w_k → sign
/// consensus → aggregate → scale by λ → add to the base:
/// θ = θ_base + λ · aggregate_k(w_k · sparsify(τ_k) · m_k).
/// </summary>
/// <remarks>Build one directly for a custom combination, or use the method classes
/// (<see cref="TiesMerge"/>, <see cref="DareMerge"/>, …) whose presets reproduce the references.
/// Immutable and thread-safe: one pipeline may be shared by concurrent merges.</remarks>
public sealed record TaskVectorPipeline
{
    /// <summary>The sparsifiers: none (empty, the default), one shared by every expert, or one per
    /// expert in expert order.</summary>
    public IReadOnlyList<Sparsifier> Sparsifiers { get; init; } = [];

    /// <summary>The option the sparsifiers come from, for messages (e.g. <c>TiesOptions.Densities</c>).</summary>
    internal string SparsifierSource { get; init; } = nameof(Sparsifiers);

    /// <summary>Per-expert weights w_k; null (the default) means 1 for every expert.</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>The sign-consensus stage; null (the default) keeps every entry.</summary>
    public SignConsensus? Consensus { get; init; }

    /// <summary>How the filtered, weighted task vectors combine. Default <see cref="Aggregation.Sum"/>.</summary>
    public Aggregation Aggregation { get; init => field = MergeLab.Options.Defined(value, nameof(Aggregation)); } = Aggregation.Sum;

    /// <summary>λ, the scale of the merged task vector. Default 1; any finite value.</summary>
    public double Lambda
    {
        get;
        init
        {
            Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;

    /// <summary>Whether any stage needs a whole-model pass before merging.</summary>
    public bool NeedsWholeModelStatistic =>
        Sparsifiers.Any(s => s.NeedsWholeModelThreshold) || Consensus is { NeedsWholeModelMajority: true };

    /// <summary>The sparsifier applied to expert <paramref name="k"/> of <paramref name="expertCount"/>, or null.</summary>
    internal Sparsifier? SparsifierFor(int k, int expertCount) => Sparsifiers.Count switch
    {
        0 => null,
        1 => Sparsifiers[0],
        _ when Sparsifiers.Count == expertCount => Sparsifiers[k],
        _ => throw new ArgumentException(
            $"{SparsifierSource} has {Sparsifiers.Count} values but there are {expertCount} experts; give one, or one per expert."),
    };

    /// <summary>Checks the stages fit together and the expert count.</summary>
    internal void Validate(int? expertCount = null)
    {
        if (Aggregation == Aggregation.MeanOfAgreeing && Consensus is null)
        {
            throw new ArgumentException("Aggregation.MeanOfAgreeing averages over the experts that agree with the elected sign, so it needs a sign consensus stage.");
        }

        if (Sparsifiers.Any(s => s is null))
        {
            throw new ArgumentException("A sparsifier is null.");
        }

        if (expertCount is int n)
        {
            Options.Weights(Weights, n);
            SparsifierFor(0, n);
        }
        else if (Weights is not null)
        {
            Options.Weights(Weights, Weights.Count);
        }
    }

    /// <summary>Sparsifies each expert's task vector and stacks them: [N, ...] float32.</summary>
    internal Tensor SparseTaskVectors(TensorGroup group, PipelineStatistic? statistic)
    {
        using var scope = NewDisposeScope();
        var list = new Tensor[group.ExpertCount];
        for (int k = 0; k < list.Length; k++)
        {
            var tau = group.TaskVector(k);
            var sparsifier = SparsifierFor(k, group.ExpertCount);
            list[k] = sparsifier is null ? tau
                : sparsifier.Apply(tau, new SparsifyContext(group.Name, k, statistic?.Threshold(k)));
        }

        return stack(list).MoveToOuterDisposeScope();
    }

    /// <summary>The per-expert weights as a float32 tensor shaped to broadcast over [N, ...].</summary>
    internal Tensor WeightTensor(Tensor stacked)
    {
        var w = Options.Weights(Weights, (int)stacked.shape[0]).Select(x => (float)x).ToArray();
        var shape = new long[stacked.dim()];
        Array.Fill(shape, 1L);
        shape[0] = w.Length;
        return tensor(w, ScalarType.Float32, stacked.device).view(shape);
    }

    /// <summary>Runs every stage on one tensor group and returns θ in float32.</summary>
    internal Tensor Merge(TensorGroup group, PipelineStatistic? statistic)
    {
        var stacked = SparseTaskVectors(group, statistic);
        var weights = WeightTensor(stacked);
        var weighted = stacked * weights;
        Tensor merged;
        if (Consensus is { } consensus)
        {
            var electorate = consensus.ElectOnWeighted ? weighted : stacked;
            var sign = consensus.ResolveZeros(consensus.RawSign(electorate), statistic?.MajoritySign);
            var agree = SignConsensus.Agreement(electorate, sign).to(ScalarType.Float32);
            merged = (weighted * agree).sum(dim: 0);
            switch (Aggregation)
            {
                case Aggregation.MeanOfAgreeing:
                    merged.div_(agree.sum(dim: 0).clamp_min(ScalarArgs.One));
                    break;
                case Aggregation.WeightNormalized:
                    var divisor = (weights * agree).sum(dim: 0);
                    merged.div_(divisor.masked_fill_(divisor.eq(ScalarArgs.Zero), ScalarArgs.One));
                    break;
            }
        }
        else
        {
            merged = weighted.sum(dim: 0);
            if (Aggregation == Aggregation.WeightNormalized)
            {
                double divisor = Options.Weights(Weights, group.ExpertCount).Sum();
                using var by = (Options.SumsToZero(divisor) ? 1.0 : divisor).ToScalar();
                merged.div_(by);
            }
        }

        if (Lambda != 1.0)
        {
            using var lambda = Lambda.ToScalar();
            merged.mul_(lambda);
        }

        using var base32 = group.Base!.to(ScalarType.Float32);
        return base32 + merged;
    }
}

/// <summary>A merge method that runs a <see cref="TaskVectorPipeline"/>. The named methods
/// (<see cref="TaskArithmeticMerge"/>, <see cref="TiesMerge"/>, <see cref="DareMerge"/>,
/// <see cref="BreadcrumbsMerge"/>) are pipelines with reference presets.</summary>
public class PipelineMerge : MergeMethod
{
    /// <summary>Creates a method named <paramref name="name"/> that runs <paramref name="pipeline"/>.</summary>
    /// <exception cref="ArgumentException">The stages do not fit together.</exception>
    public PipelineMerge(string name, TaskVectorPipeline pipeline)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(pipeline);
        pipeline.Validate();
        Name = name;
        Pipeline = pipeline;
    }

    /// <inheritdoc />
    public override string Name { get; }

    /// <summary>The stages this method runs.</summary>
    public TaskVectorPipeline Pipeline { get; }

    /// <inheritdoc />
    public override ModelStatistic? CreateStatistic(int expertCount)
    {
        Pipeline.Validate(expertCount);
        return Pipeline.NeedsWholeModelStatistic ? new PipelineStatistic(Pipeline, expertCount) : null;
    }

    /// <inheritdoc />
    protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic) =>
        Pipeline.Merge(group, Prepare(group, statistic));

    /// <summary>The fused pipeline's exact selection over a whole tensor reads every value of each expert it
    /// trims and of the base (<see cref="Selection.ExactSelector"/>), DARE's L1 rescale sums |τ| over every
    /// entry, and plain task arithmetic's loop sees every input in every result; Breadcrumbs' paper variant
    /// selects per row and DARE's other rescales let a dropped value go unseen, which vouch for nothing.</summary>
    internal override bool MayVouchForFiniteInputs =>
        (Pipeline.Consensus is null && Pipeline.Sparsifiers.All(s => s is null))
        || Pipeline.Sparsifiers.Any(s => s is TopKMagnitude or KthMagnitudeThreshold { Scope: SelectionScope.PerTensor }
            or BreadcrumbsMask { Variant: BreadcrumbsVariant.Mergekit } or RandomDrop { RescaleNorm: RescaleNorm.L1 });

    private protected override Tensor? MergeDirect(TensorGroup group, ModelStatistic? statistic, ScalarType outputType) =>
        FusedPipeline.TryMerge(Pipeline, group, Prepare(group, statistic), outputType);

    private PipelineStatistic? Prepare(TensorGroup group, ModelStatistic? statistic)
    {
        Pipeline.Validate(group.ExpertCount);
        if (!Pipeline.NeedsWholeModelStatistic)
        {
            return null;
        }

        return statistic as PipelineStatistic ?? throw new MergeException(group.Name,
            $"'{Name}' works over the whole model (global threshold or majority sign): merge whole state dicts " +
            "with Merge or the checkpoint engine, or pass the statistic from CreateStatistic after its passes.");
    }
}
