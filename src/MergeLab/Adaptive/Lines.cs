using MergeLab.Methods;
using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Adaptive;

/// <summary>Options of <see cref="Lines"/>.</summary>
public sealed record LinesOptions
{
    /// <summary>α, the factor of the shallowest block and of every tensor outside the blocks. Default
    /// 0.1: the authors' single-task example (<c>LiNeS_example.ipynb</c>: α = 0.1, β = 1 − α). Their
    /// multi-task rule is <see cref="Lines.MultiTaskAlpha"/>. Any finite value.</summary>
    public double Alpha
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Alpha));
            field = value;
        }
    } = 0.1;

    /// <summary>β, the increase from the shallowest to the deepest block: block l of L gets
    /// α + β·l/(L − 1). Default 0.9 (= 1 − α, so the deepest block keeps its full update). The authors
    /// tune it on validation data for multi-task merging. Any finite value.</summary>
    public double Beta
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Beta));
            field = value;
        }
    } = 0.9;

    /// <summary>L, the number of blocks; at least 2. Null (default): one more than the largest n such
    /// that <c>.n.</c> occurs in a tensor name (<see cref="ParameterLayers.InferBlockCount"/>); the
    /// reference fixes 12 for ViT-B and 24 for ViT-L.</summary>
    public int? BlockCount
    {
        get;
        init
        {
            if (value is int n)
            {
                MergeLab.Options.RequireInRange(n, nameof(BlockCount), 2, int.MaxValue);
            }

            field = value;
        }
    }

    /// <summary>The block index (0 … L − 1) of a tensor name, or null for tensors outside the blocks
    /// (which get α). Null (default): the reference's rule, the smallest i with <c>.{i}.</c> in the name
    /// (<see cref="ParameterLayers.BlockIndex"/>).</summary>
    public Func<string, int?>? BlockOf { get; init; }
}

/// <summary>
/// LiNeS, Layer-increasing Network Scaling (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling
/// Prevents Forgetting and Enhances Model Merging"): scales the update τ of block l (0-based, of L) by
/// λ(l) = α + β·l/(L − 1), so shallow blocks stay near the pretrained weights and deep blocks keep their
/// task-specific update; tensors outside the blocks are scaled by α. Follows <c>LiNeS_scaling</c> in
/// <c>wang-kee/LiNeS</c> <c>src/eval/eval.py</c>. Applies to one fine-tuned model (single-task editing,
/// α = c, β = 1 − c) and to a merged multi-task vector (α from <see cref="MultiTaskAlpha"/>, β tuned).
/// </summary>
/// <remarks>Stateless and thread-safe; the caller owns the tensors each call returns.</remarks>
public static class Lines
{
    /// <summary>λ(l) = α + β·l/(L − 1) for block <paramref name="block"/> of <paramref name="blockCount"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">L &lt; 2 or the block is outside 0 … L − 1.</exception>
    public static double Factor(int block, int blockCount, double alpha, double beta)
    {
        MergeLab.Options.RequireInRange(blockCount, nameof(blockCount), 2, int.MaxValue);
        MergeLab.Options.RequireInRange(block, nameof(block), 0, blockCount - 1);
        return alpha + beta * ((double)block / (blockCount - 1));
    }

    /// <summary>The options of single-task editing: α = <paramref name="alpha"/>, β = 1 − α, so the
    /// deepest block keeps its full update (the reference's <c>single_task</c> method).</summary>
    public static LinesOptions SingleTask(double alpha, int? blockCount = null) =>
        new() { Alpha = alpha, Beta = 1 - alpha, BlockCount = blockCount };

    /// <summary>
    /// The reference's α for a merged multi-task vector: ‖Σ_t τ_t‖₁ / (T·‖τ_MTL‖₁), where τ_MTL is the
    /// merged task vector before any λ (1/T for task arithmetic's plain sum).
    /// </summary>
    /// <exception cref="ArgumentException">No task vectors, a null one, or the merged vector is all zeros.</exception>
    /// <exception cref="MergeException">The task vectors, or the merged vector, disagree in names or shapes.</exception>
    public static double MultiTaskAlpha(IReadOnlyList<TaskVector> taskVectors, TaskVector merged)
    {
        ArgumentNullException.ThrowIfNull(taskVectors);
        ArgumentNullException.ThrowIfNull(merged);
        StateDictChecks.CheckTaskVectors(taskVectors, nameof(taskVectors));
        StateDictChecks.CheckCompatible(taskVectors[0].Deltas, [merged.Deltas], requiresBase: false, _ => "the merged task vector", "task vector 0");

        double summed = 0, mtl = 0;
        foreach (var name in merged.Names)
        {
            using var scope = NewDisposeScope();
            var sum = taskVectors[0][name].to(ScalarType.Float64, copy: true);
            for (int t = 1; t < taskVectors.Count; t++)
            {
                sum.add_(taskVectors[t][name].to(ScalarType.Float64));
            }

            summed += sum.abs().sum().item<double>();
            mtl += merged[name].to(ScalarType.Float64).abs().sum().item<double>();
        }

        if (mtl == 0)
        {
            throw new ArgumentException("The merged task vector is all zeros.", nameof(merged));
        }

        return summed / mtl / taskVectors.Count;
    }

    /// <summary>The multi-task options: α = <see cref="MultiTaskAlpha"/>, β = <paramref name="beta"/>.</summary>
    public static LinesOptions MultiTask(IReadOnlyList<TaskVector> taskVectors, TaskVector merged, double beta, int? blockCount = null) =>
        new() { Alpha = MultiTaskAlpha(taskVectors, merged), Beta = beta, BlockCount = blockCount };

    /// <summary>The factor of every name: α + β·l/(L − 1) for a name in block l, α for the others.</summary>
    /// <exception cref="ArgumentException">L (inferred: a given BlockCount is at least 2) is below 2, or the block rule returns an
    /// index outside 0 … L − 1.</exception>
    public static IReadOnlyDictionary<string, double> Factors(IReadOnlyList<string> names, LinesOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(names);
        var o = options ?? new LinesOptions();
        int blockCount = o.BlockCount ?? ParameterLayers.InferBlockCount(names);
        if (blockCount < 2)
        {
            string remedy = o.BlockOf is not null ? "with a custom BlockOf, set BlockCount too." : "set BlockCount, or BlockOf and BlockCount.";
            throw new ArgumentException(
                $"LiNeS needs at least 2 blocks, but the names imply {blockCount} (1 + their largest '.i.' component); {remedy}",
                nameof(options));
        }

        var blockOf = o.BlockOf ?? (name => ParameterLayers.BlockIndex(name, blockCount));
        var factors = new Dictionary<string, double>(StringComparer.Ordinal);
        foreach (var name in names)
        {
            int? block = blockOf(name);
            if (block is int b && (b < 0 || b >= blockCount))
            {
                throw new ArgumentException($"The block rule puts '{name}' in block {b}, outside 0 … {blockCount - 1}.", nameof(options));
            }

            factors[name] = block is int l ? Factor(l, blockCount, o.Alpha, o.Beta) : o.Alpha;
        }

        return factors;
    }

    /// <summary>The task vector with each tensor scaled by its block's factor; a new task vector.
    /// A factor of exactly 1 copies the tensor.</summary>
    public static TaskVector Scale(TaskVector taskVector, LinesOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(taskVector);
        var factors = Factors(taskVector.Names, options);
        var scaled = new StateDict();
        try
        {
            foreach (var (name, delta) in taskVector.Deltas)
            {
                double f = factors[name];
                if (f == 1.0)
                {
                    scaled.Add(name, delta.clone());
                    continue;
                }

                using var scale = f.ToScalar();
                scaled.Add(name, delta.mul(scale));
            }
        }
        catch
        {
            scaled.Dispose();
            throw;
        }

        return TaskVector.FromDeltas(scaled);
    }

    /// <summary>
    /// Edits a fine-tuned (or merged) model: θ = θ_base + λ(l)·(θ_ft − θ_base) per tensor, in float32,
    /// cast to the fine-tuned tensor's dtype. Where the factor is exactly 1 the fine-tuned tensor is
    /// copied, so α = 1, β = 0 returns <paramref name="fineTuned"/> bit for bit; integer and boolean
    /// tensors are copied from it too.
    /// </summary>
    /// <exception cref="MergeException">The models disagree in names or shapes.</exception>
    public static StateDict Edit(StateDict baseModel, StateDict fineTuned, LinesOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(baseModel);
        ArgumentNullException.ThrowIfNull(fineTuned);
        var names = StateDictChecks.CheckCompatible(baseModel, [fineTuned], requiresBase: true, _ => "the fine-tuned model");
        var factors = Factors(names, options);
        var result = new StateDict();
        try
        {
            foreach (var name in names)
            {
                var ft = fineTuned[name];
                double f = factors[name];
                if (f == 1.0 || !ft.is_floating_point())
                {
                    result.Add(name, ft.clone());
                    continue;
                }

                using var scope = NewDisposeScope();
                var b = baseModel[name].to(ScalarType.Float32);
                using var scale = f.ToScalar();
                var edited = (ft.to(ScalarType.Float32) - b).mul_(scale).add_(b); // b + (ft − b)·f, one temporary fewer
                result.Add(name, edited.to(ft.dtype).MoveToOuterDisposeScope());
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }

    /// <summary>θ = θ_base + λ(l)·τ per tensor, for a (merged) task vector τ; base tensors τ does not
    /// cover are copied.</summary>
    /// <exception cref="MergeException">τ names a tensor the base lacks, or shapes differ.</exception>
    public static StateDict Apply(StateDict baseModel, TaskVector taskVector, LinesOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(baseModel);
        using var scaled = Scale(taskVector, options);
        return scaled.ApplyTo(baseModel);
    }
}
