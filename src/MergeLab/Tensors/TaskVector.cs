using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tensors;

/// <summary>
/// A task vector τ = θ_expert − θ_base: the per-tensor difference a fine-tune made to its pretrained
/// model, in float32 when made by <see cref="Between"/> (deltas wrapped by <see cref="FromDeltas"/> keep
/// their dtypes). Task vectors add, scale, combine and apply back onto a base
/// (Ilharco et al., "Editing Models with Task Arithmetic", 2023).
/// </summary>
/// <remarks>Owns its tensors; dispose it. Operations return new task vectors and never modify their
/// operands. Not thread-safe for concurrent disposal; concurrent reads are safe.</remarks>
public sealed class TaskVector : IDisposable
{
    private TaskVector(StateDict deltas) => Deltas = deltas;

    /// <summary>The per-tensor deltas, in the base model's name order: float32 from <see cref="Between"/>, the
    /// given dtypes from <see cref="FromDeltas"/>.</summary>
    public StateDict Deltas { get; }

    /// <summary>The tensor names.</summary>
    public IReadOnlyList<string> Names => Deltas.Names;

    /// <summary>The delta of the tensor named <paramref name="name"/>.</summary>
    public Tensor this[string name] => Deltas[name];

    /// <summary>Wraps existing deltas as a task vector and takes ownership of them, in their own dtypes (float64
    /// deltas keep their precision; <see cref="Combine"/> sums bfloat16 or float16 ones in float32).</summary>
    public static TaskVector FromDeltas(StateDict deltas)
    {
        ArgumentNullException.ThrowIfNull(deltas);
        return new TaskVector(deltas);
    }

    /// <summary>τ = <paramref name="expert"/> − <paramref name="baseModel"/>, per tensor, in float32.
    /// Integer and boolean tensors (buffers) are skipped.</summary>
    /// <exception cref="MergeException">A name is missing on one side, the shapes differ, or a tensor is
    /// floating-point on one side only; the message names the tensor.</exception>
    public static TaskVector Between(StateDict expert, StateDict baseModel)
    {
        ArgumentNullException.ThrowIfNull(expert);
        ArgumentNullException.ThrowIfNull(baseModel);
        StateDictChecks.CheckCompatible(baseModel, [expert], requiresBase: true);
        var deltas = new StateDict();
        try
        {
            foreach (var (name, b) in baseModel)
            {
                if (!b.is_floating_point())
                {
                    continue;
                }

                using var e32 = expert[name].to(ScalarType.Float32);
                using var b32 = b.to(ScalarType.Float32);
                deltas.Add(name, e32 - b32);
            }
        }
        catch
        {
            deltas.Dispose();
            throw;
        }

        return new TaskVector(deltas);
    }

    /// <summary>λ·τ, a new task vector.</summary>
    /// <exception cref="ArgumentOutOfRangeException">λ is NaN or infinite.</exception>
    public TaskVector Scale(double lambda)
    {
        Options.RequireFinite(lambda, nameof(lambda));
        using var scale = lambda.ToScalar();
        return new TaskVector(Deltas.Map(t => t.mul(scale)));
    }

    /// <summary>τ + <paramref name="other"/>, a new task vector.</summary>
    /// <exception cref="MergeException">Names, shapes or floating-point kinds disagree; the message names the tensor.</exception>
    public TaskVector Add(TaskVector other)
    {
        ArgumentNullException.ThrowIfNull(other);
        return Combine([this, other]);
    }

    /// <summary>Σ_k w_k·τ_k over several task vectors (w_k = 1 when <paramref name="weights"/> is null), summed
    /// in float32 (float64 when a term is float64) and stored in the first vector's dtype.</summary>
    /// <exception cref="MergeException">Names, shapes or floating-point kinds disagree.</exception>
    /// <exception cref="ArgumentException">The list is empty or holds null, the weight count differs from the
    /// vector count, or a weight is not finite.</exception>
    public static TaskVector Combine(IReadOnlyList<TaskVector> vectors, IReadOnlyList<double>? weights = null)
    {
        ArgumentNullException.ThrowIfNull(vectors);
        var deltas = StateDictChecks.CheckTaskVectors(vectors, nameof(vectors));
        var w = Options.Weights(weights, vectors.Count);
        var sum = new StateDict();
        try
        {
            foreach (var name in deltas[0].Names)
            {
                using var scope = NewDisposeScope();
                // Of one kind (the check above): floating-point terms are summed in at least float32 (`to` of the
                // same dtype is the tensor itself, so float32 terms sum as they are).
                var terms = deltas.Select(d => d[name]).ToArray();
                var work = terms.Any(t => t.dtype == ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;
                var result = terms[0].is_floating_point()
                    ? WeightedSum(terms.Select(t => t.to(work)).ToArray(), w).to(terms[0].dtype)
                    : WeightedSum(terms, w);
                sum.Add(name, result.MoveToOuterDisposeScope());
            }
        }
        catch
        {
            sum.Dispose();
            throw;
        }

        return new TaskVector(sum);
    }

    /// <summary>Σ_k w_k·x_k as libtorch computes it term by term: x_0·w_0, then + w_k·x_k in order (the sum of
    /// <see cref="Combine"/> and of weight averaging's libtorch path).</summary>
    internal static Tensor WeightedSum(IReadOnlyList<Tensor> terms, IReadOnlyList<double> weights)
    {
        using var first = weights[0].ToScalar();
        var sum = terms[0].mul(first);
        for (int k = 1; k < terms.Count; k++)
        {
            using var alpha = weights[k].ToScalar();
            sum.add_(terms[k], alpha: alpha);
        }

        return sum;
    }

    /// <summary>θ = θ_base + λ·τ, a new state dict in the base's dtypes. Base tensors the task vector
    /// does not cover (integer buffers) are copied.</summary>
    /// <exception cref="MergeException">The task vector names a tensor the base lacks, or shapes differ.</exception>
    public StateDict ApplyTo(StateDict baseModel, double lambda = 1.0)
    {
        ArgumentNullException.ThrowIfNull(baseModel);
        Options.RequireFinite(lambda, nameof(lambda));
        StateDictChecks.CheckCovers(baseModel, Deltas, "the task vector");

        var result = new StateDict();
        using var alpha = lambda.ToScalar();
        try
        {
            foreach (var (name, b) in baseModel)
            {
                if (!Deltas.TryGetValue(name, out var delta))
                {
                    result.Add(name, b.clone());
                    continue;
                }

                using var scope = NewDisposeScope();
                var merged = b.to(ScalarType.Float32).add(delta, alpha: alpha);
                result.Add(name, merged.to(b.dtype).MoveToOuterDisposeScope());
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }

    /// <summary>Disposes the deltas.</summary>
    public void Dispose() => Deltas.Dispose();
}
