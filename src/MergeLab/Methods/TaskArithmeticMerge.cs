using MergeLab.Stages;

namespace MergeLab.Methods;

/// <summary>Options of <see cref="TaskArithmeticMerge"/>.</summary>
public sealed record TaskArithmeticOptions
{
    /// <summary>Per-expert weights w_k; null (default) means 1 each.</summary>
    public IReadOnlyList<double>? Weights { get; init; }

    /// <summary>λ. Default 1; any finite value (the task-arithmetic paper tunes it on validation data,
    /// typically 0.3–0.5 for many experts).</summary>
    public double Lambda
    {
        get;
        init
        {
            Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;

    /// <summary>Divide Σ w_k·τ_k by Σ w_k (mergekit's <c>normalize</c>). Default false. As in mergekit, weights
    /// whose sum is 0 (|Σ w_k| &lt; 1e-8, e.g. [1, −1]) are divided by 1, not refused (weight averaging refuses
    /// them): the result is then Σ w_k·τ_k.</summary>
    public bool Normalize { get; init; }
}

/// <summary>
/// Task arithmetic (Ilharco et al., 2023): θ = θ_base + λ·Σ_k w_k·τ_k, with τ_k = θ_k − θ_base
/// (divided by Σ_k w_k when <see cref="TaskArithmeticOptions.Normalize"/> is set).
/// </summary>
public sealed class TaskArithmeticMerge : PipelineMerge
{
    /// <summary>Creates the method; default options give θ_base + Σ_k τ_k.</summary>
    public TaskArithmeticMerge(TaskArithmeticOptions? options = null)
        : base("task_arithmetic", Build(options ?? new TaskArithmeticOptions()))
    {
        Options = options ?? new TaskArithmeticOptions();
    }

    /// <summary>The options this method was created with.</summary>
    public TaskArithmeticOptions Options { get; }

    private static TaskVectorPipeline Build(TaskArithmeticOptions o) => new()
    {
        Weights = o.Weights,
        Lambda = o.Lambda,
        Aggregation = o.Normalize ? Aggregation.WeightNormalized : Aggregation.Sum,
    };
}
