using MergeLab.Selection;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Stages;

/// <summary>Where a magnitude threshold is computed.</summary>
public enum SelectionScope
{
    /// <summary>Each tensor on its own (mergekit, PEFT).</summary>
    PerTensor,

    /// <summary>Over the whole model, every tensor of one expert flattened together (the TIES and PCB
    /// authors' code). A streaming merge makes extra passes to compute it.</summary>
    WholeModel,
}

/// <summary>How a sparsifier rescales the entries it keeps.</summary>
public enum RescaleNorm
{
    /// <summary>Kept entries are left as they are.</summary>
    None,

    /// <summary>Kept entries are divided by the keep probability 1 − p (the DARE paper, PEFT).</summary>
    InverseKeepProbability,

    /// <summary>Kept entries are multiplied by ‖τ‖₁ / ‖masked τ‖₁ so the tensor keeps its L1 norm
    /// (mergekit's <c>rescale</c>); left unscaled when either norm is below 1e-7. Both norms are summed in
    /// float64 and the factor rounded to float32 (mergekit sums in float32, in an order that depends on
    /// torch's thread count, so its factor can differ in the last bit).</summary>
    L1,
}

/// <summary>What a sparsifier is told about the tensor it works on.</summary>
/// <param name="TensorName">The parameter name.</param>
/// <param name="ExpertIndex">Which expert's task vector this is (0-based).</param>
/// <param name="WholeModelThreshold">For whole-model scope: the expert's global magnitude threshold,
/// or null when everything is kept.</param>
public readonly record struct SparsifyContext(string TensorName, int ExpertIndex, float? WholeModelThreshold = null);

/// <summary>
/// The first stage of the task-vector pipeline: zeroes some entries of one expert's task vector τ_k
/// (before weighting). Implementations are immutable records whose options are validated on creation.
/// </summary>
/// <remarks>Sparsifiers are immutable and thread-safe: one instance may sparsify many tensors at
/// once (random ones derive their draws from the seed, tensor name and expert index, never from
/// shared state).</remarks>
public abstract record Sparsifier
{
    /// <summary>Whether the sparsifier needs a whole-model threshold before any tensor is merged.</summary>
    public virtual bool NeedsWholeModelThreshold => false;

    /// <summary>How the entries the sparsifier keeps are rescaled; <see cref="RescaleNorm.None"/> unless the
    /// sparsifier says otherwise.</summary>
    public virtual RescaleNorm RescaleNorm => RescaleNorm.None;

    /// <summary>Returns the sparsified task vector as a new float32 tensor on τ's device.</summary>
    /// <param name="taskVector">τ_k in float32; not modified.</param>
    /// <param name="context">The tensor name, expert index and any whole-model threshold.</param>
    public abstract Tensor Apply(Tensor taskVector, SparsifyContext context);

    /// <summary>τ·mask, rescaled as <paramref name="norm"/> says: divided by <paramref name="keepProbability"/>
    /// (DARE's paper), or multiplied by the float32 factor ‖τ‖₁ / ‖masked‖₁ (mergekit's
    /// <c>rescaled_masked_tensor</c>) with both norms summed in float64 (<see cref="DropMask.L1Factor(double, double)"/>):
    /// mergekit sums in float32, whose bits depend on the summation order and so on torch's thread count.</summary>
    /// <param name="taskVector">τ in float32.</param>
    /// <param name="mask">1 where kept, 0 elsewhere.</param>
    /// <param name="norm">The rescale.</param>
    /// <param name="keepProbability">DARE's 1 − p.</param>
    /// <param name="magnitudes">|τ| when the caller has it (any shape with τ's entries in order), so the L1
    /// norm need not take it again.</param>
    private protected static Tensor Rescale(Tensor taskVector, Tensor mask, RescaleNorm norm, double keepProbability = 1, Tensor? magnitudes = null)
    {
        var masked = taskVector * mask;
        switch (norm)
        {
            case RescaleNorm.InverseKeepProbability:
                using (var probability = keepProbability.ToScalar())
                {
                    return masked.div_(probability);
                }

            case RescaleNorm.L1:
                float factor = L1Factor(taskVector, masked, magnitudes);
                if (factor == 1f)
                {
                    return masked;
                }

                using (var factorScalar = factor.ToScalar())
                {
                    return masked.mul_(factorScalar);
                }

            default:
                return masked;
        }
    }

    /// <summary><see cref="DropMask.L1Factor(double, double)"/> of ‖τ‖₁ and ‖masked‖₁, summed in float64: where the CPU
    /// kernels run, block by block as the fused kernel sums them
    /// (<see cref="DropMask.L1Factor(CpuFloats, float*)"/>); elsewhere by libtorch.</summary>
    private static unsafe float L1Factor(Tensor taskVector, Tensor masked, Tensor? magnitudes)
    {
        if (MagnitudeThreshold.UseCpuKernels(taskVector) && masked.dtype == ScalarType.Float32 && masked.is_contiguous())
        {
            var tau = CpuTensors.Floats(taskVector, out var lease);
            using (lease)
            {
                return DropMask.L1Factor(tau, (float*)CpuTensors.Pointer(masked));
            }
        }

        using var absolute = magnitudes is null ? taskVector.abs() : null;
        using var total = (magnitudes ?? absolute!).sum(ScalarType.Float64);
        using var keptAbsolute = masked.abs();
        using var keptTotal = keptAbsolute.sum(ScalarType.Float64);
        return DropMask.L1Factor(total.item<double>(), keptTotal.item<double>());
    }

    /// <summary>Checks the rescale of a deterministic mask (a trim or a rank window), which has no keep
    /// probability: <see cref="RescaleNorm.None"/> or <see cref="RescaleNorm.L1"/>.</summary>
    /// <param name="value">The rescale asked for.</param>
    /// <param name="name">The option or parameter that asked.</param>
    /// <param name="mask">What masks, for the message.</param>
    internal static RescaleNorm MaskRescale(RescaleNorm value, string name, string mask) =>
        value == RescaleNorm.InverseKeepProbability
            ? throw new ArgumentOutOfRangeException(name, value, $"{mask} has no keep probability; use None or L1.")
            : Options.Defined(value, name);

    /// <summary>⌊n·fraction⌋ computed in double as Python's <c>int(n * fraction)</c> does.</summary>
    private protected static long FloorCount(long n, double fraction) => (long)Math.Floor(n * fraction);
}

/// <summary>
/// Keeps exactly ⌊density·n⌋ entries of largest |τ| per tensor (mergekit's and PEFT's
/// <c>magnitude</c> pruning); ties at the boundary go to the lowest flat positions. Density 1 keeps
/// everything; a density giving zero entries zeroes the tensor (mergekit asserts there instead).
/// </summary>
public sealed record TopKMagnitude : Sparsifier
{
    /// <summary>Creates the sparsifier.</summary>
    /// <param name="density">Fraction of entries kept, in [0, 1].</param>
    /// <param name="rescale">How kept entries are rescaled; default none.</param>
    public TopKMagnitude(double density, RescaleNorm rescale = RescaleNorm.None)
    {
        Options.RequireInRange(density, nameof(density), 0, 1);
        Density = density;
        RescaleNorm = MaskRescale(rescale, nameof(rescale), "Magnitude pruning");
    }

    /// <summary>Fraction of entries kept, in [0, 1].</summary>
    public double Density { get; }

    /// <summary>How kept entries are rescaled.</summary>
    public override RescaleNorm RescaleNorm { get; }

    /// <inheritdoc />
    public override Tensor Apply(Tensor taskVector, SparsifyContext context)
    {
        if (Density >= 1)
        {
            return taskVector.clone();
        }

        using var scope = NewDisposeScope();
        using var magnitudes = taskVector.abs();
        var mask = MagnitudeThreshold.TopKMask(magnitudes, FloorCount(taskVector.numel(), Density));
        return Rescale(taskVector, mask, RescaleNorm, magnitudes: magnitudes).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The TIES authors' trim (<c>topk_values_mask</c>): with n entries and k = n − ⌊n·density⌋, keeps every
/// entry with |τ| ≥ the k-th smallest |τ|, so ⌊n·density⌋ + 1 entries plus any ties are kept. With
/// k = 0 (density 1) everything is kept, where the authors' code fails. The threshold is per tensor
/// or over the whole model (the authors' default).
/// </summary>
public sealed record KthMagnitudeThreshold : Sparsifier
{
    /// <summary>Creates the sparsifier.</summary>
    /// <param name="density">Fraction of entries kept, in [0, 1].</param>
    /// <param name="scope">Per tensor, or over the whole model.</param>
    public KthMagnitudeThreshold(double density, SelectionScope scope)
    {
        Options.RequireInRange(density, nameof(density), 0, 1);
        Density = density;
        Scope = Options.Defined(scope, nameof(scope));
    }

    /// <summary>Fraction of entries kept, in [0, 1].</summary>
    public double Density { get; }

    /// <summary>Where the threshold is computed.</summary>
    public SelectionScope Scope { get; }

    /// <inheritdoc />
    public override bool NeedsWholeModelThreshold => Scope == SelectionScope.WholeModel;

    /// <summary>The 1-based rank k = n − ⌊n·density⌋ of the threshold among n magnitudes; 0 keeps all.</summary>
    internal long ThresholdRank(long n) => n - FloorCount(n, Density);

    /// <inheritdoc />
    public override Tensor Apply(Tensor taskVector, SparsifyContext context)
    {
        using var scope = NewDisposeScope();
        bool whole = Scope == SelectionScope.WholeModel;
        float? given = whole ? context.WholeModelThreshold : null;
        long k = whole ? 0 : ThresholdRank(taskVector.numel());
        if (given is null && k == 0)
        {
            return taskVector.clone().MoveToOuterDisposeScope();
        }

        // |τ| once, for both the threshold and the mask.
        var magnitudes = taskVector.abs();
        float threshold = given ?? MagnitudeThreshold.KthSmallest(magnitudes, k);
        using var thresholdScalar = threshold.ToScalar();
        var keep = magnitudes.ge(thresholdScalar);
        return (taskVector * keep).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// DARE (Yu et al., 2024, "Language Models are Super Mario"): drops each entry with probability
/// <see cref="DropRate"/> and rescales the survivors. The mask comes from a generator seeded by
/// (seed, tensor name, expert index), so the result does not depend on the order tensors are merged
/// in, on streaming, or on the thread count.
/// </summary>
public sealed record RandomDrop : Sparsifier
{
    /// <summary>Creates the sparsifier.</summary>
    /// <param name="dropRate">p, the probability of dropping an entry, in [0, 1).</param>
    /// <param name="rescale">1/(1−p) (the paper, default), L1 (mergekit), or none.</param>
    /// <param name="seed">The random seed.</param>
    public RandomDrop(double dropRate, RescaleNorm rescale = RescaleNorm.InverseKeepProbability, long seed = 0)
    {
        Options.RequireInRange(dropRate, nameof(dropRate), 0, 1, maxInclusive: false);
        DropRate = dropRate;
        RescaleNorm = Options.Defined(rescale, nameof(rescale));
        Seed = seed;
    }

    /// <summary>p, the probability of dropping an entry, in [0, 1).</summary>
    public double DropRate { get; }

    /// <summary>How survivors are rescaled.</summary>
    public override RescaleNorm RescaleNorm { get; }

    /// <summary>The random seed.</summary>
    public long Seed { get; }

    /// <inheritdoc />
    public override Tensor Apply(Tensor taskVector, SparsifyContext context)
    {
        if (DropRate == 0)
        {
            return taskVector.clone();
        }

        long stream = DropMask.StreamSeed(Seed, context.TensorName, context.ExpertIndex);
        if (MagnitudeThreshold.UseCpuKernels(taskVector))
        {
            return ApplyOnCpu(taskVector, stream);
        }

        using var scope = NewDisposeScope();
        var keep = DropMask.Keep(taskVector, DropRate, stream);
        return Rescale(taskVector.to(ScalarType.Float32), keep, RescaleNorm, 1 - DropRate).MoveToOuterDisposeScope();
    }

    /// <summary>The CPU kernel: the same mask, rescaled in the same float32 operations, with the L1
    /// norms summed in float64 block by block (<see cref="DropMask.NormBlock"/>) in index order.</summary>
    private unsafe Tensor ApplyOnCpu(Tensor taskVector, long stream)
    {
        var tau = CpuTensors.Floats(taskVector, out var lease);
        using (lease)
        {
            long n = tau.Length;
            var result = NativeBufferPool.Empty(taskVector.shape, ScalarType.Float32);
            var output = (float*)CpuTensors.Pointer(result);
            uint threshold = DropMask.KeepThreshold(DropRate);
            long blocks = CpuParallel.BlockCount(n, DropMask.NormBlock);
            var norms = RescaleNorm == RescaleNorm.L1 ? new (double Before, double After)[blocks] : [];
            bool inverseKeep = RescaleNorm == RescaleNorm.InverseKeepProbability;
            float keepProbability = (float)(1 - DropRate);
            CpuParallel.For(blocks, b =>
            {
                long start = b * DropMask.NormBlock;
                int count = (int)Math.Min(DropMask.NormBlock, n - start);
                var scratch = (float*)ThreadScratch.Get(DropMask.NormBlock * 4L);
                var source = tau.Block(start, count, scratch);
                var target = output + start;
                Buffer.MemoryCopy(source, target, count * 4L, count * 4L);
                DropMask.Apply(stream, threshold, start, count, target);
                if (inverseKeep)
                {
                    // The divisor is known up front: rescaled while the block is in cache.
                    DropMask.Rescale(target, count, keepProbability, divide: true);
                }
                else if (RescaleNorm == RescaleNorm.L1)
                {
                    norms[b] = DropMask.BlockNorms(source, target, count);
                }
            });

            if (RescaleNorm == RescaleNorm.L1)
            {
                // The L1 factor needs every block's norms first: a second pass.
                var (before, after) = DropMask.SumNorms(norms);
                float factor = DropMask.L1Factor(before, after);
                if (factor != 1f)
                {
                    CpuParallel.For(blocks, b =>
                    {
                        long start = b * DropMask.NormBlock;
                        int count = (int)Math.Min(DropMask.NormBlock, n - start);
                        DropMask.Rescale(output + start, count, factor, divide: false);
                    });
                }
            }

            return result;
        }
    }
}

/// <summary>Which reference the Breadcrumbs mask follows.</summary>
public enum BreadcrumbsVariant
{
    /// <summary>The authors' code: per row (last dimension) of width c, remove the ⌊c·γ⌋ largest
    /// |τ|, then keep the next ⌊c·β⌋ largest. β = 0 keeps nothing; 0-d tensors are unchanged.</summary>
    Paper,

    /// <summary>mergekit's <c>magnitude_outliers</c>: per tensor of n entries, remove the ⌊n·γ⌋
    /// largest, keep the next ⌊n·density⌋ (fewer removed when both do not fit); density 1 keeps all.
    /// Unlike mergekit, γ = 0 removes nothing instead of zeroing the tensor.</summary>
    Mergekit,
}

/// <summary>
/// Model Breadcrumbs (Davari &amp; Belilovsky, 2024): masks out the largest-magnitude outliers and the
/// smallest perturbations of each task vector. Ties at a boundary are broken by position as a stable
/// ascending sort does: of equal magnitudes, the later position ranks larger.
/// </summary>
public sealed record BreadcrumbsMask : Sparsifier
{
    /// <summary>Creates the sparsifier.</summary>
    /// <param name="density">β: the fraction kept, in [0, 1].</param>
    /// <param name="gamma">γ: the fraction of largest magnitudes removed, in [0, 1].</param>
    /// <param name="variant">Per row (paper) or per tensor (mergekit).</param>
    /// <param name="rescale">How kept entries are rescaled: none (default; the paper, mergekit's
    /// <c>rescale: false</c>) or <see cref="RescaleNorm.L1"/> over the whole tensor (mergekit's <c>rescale: true</c>).</param>
    public BreadcrumbsMask(double density, double gamma, BreadcrumbsVariant variant = BreadcrumbsVariant.Paper, RescaleNorm rescale = RescaleNorm.None)
    {
        Options.RequireInRange(density, nameof(density), 0, 1);
        Options.RequireInRange(gamma, nameof(gamma), 0, 1);
        Density = density;
        Gamma = gamma;
        Variant = Options.Defined(variant, nameof(variant));
        RescaleNorm = MaskRescale(rescale, nameof(rescale), "The Breadcrumbs mask");
    }

    /// <summary>β: the fraction kept.</summary>
    public double Density { get; }

    /// <summary>γ: the fraction of largest magnitudes removed.</summary>
    public double Gamma { get; }

    /// <summary>Per row (paper) or per tensor (mergekit).</summary>
    public BreadcrumbsVariant Variant { get; }

    /// <summary>How kept entries are rescaled.</summary>
    public override RescaleNorm RescaleNorm { get; }

    /// <inheritdoc />
    public override Tensor Apply(Tensor taskVector, SparsifyContext context)
    {
        using var scope = NewDisposeScope();
        long low, high;
        Tensor magnitudes;
        if (Variant == BreadcrumbsVariant.Paper)
        {
            if (taskVector.dim() == 0)
            {
                return taskVector.clone().MoveToOuterDisposeScope();
            }

            long c = taskVector.shape[^1];
            high = c - FloorCount(c, Gamma);
            low = Math.Max(0, high - FloorCount(c, Density));
            magnitudes = taskVector.abs();
        }
        else
        {
            if (Density >= 1)
            {
                return taskVector.clone().MoveToOuterDisposeScope();
            }

            long n = taskVector.numel();
            long target = FloorCount(n, Density);
            long top = Math.Min(FloorCount(n, Gamma), n - target);
            high = n - top;
            low = high - target;
            magnitudes = taskVector.abs().flatten();
        }

        var mask = MagnitudeThreshold.RankWindowMask(magnitudes, low, high).view(taskVector.shape);
        return Rescale(taskVector, mask, RescaleNorm, magnitudes: magnitudes).MoveToOuterDisposeScope();
    }
}
