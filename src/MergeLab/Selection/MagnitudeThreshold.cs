using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// Exact order statistics of magnitudes, the hot loop of TIES, Breadcrumbs and PCB. Every result is
/// exact (no sampling, no approximation) and ties at a boundary are broken by position, so two runs
/// on the same input always select the same entries.
/// </summary>
/// <remarks>On the CPU these run an O(n) selection over the float bits (<see cref="ExactSelector"/>,
/// <see cref="RowSelector"/>), vectorized and multi-threaded; on other devices they use libtorch
/// (<c>kthvalue</c>, <c>sort</c>). Both give identical answers. Values are compared as float32, as the
/// merges compute (a float64 input is rounded to float32 first, so values that round alike tie), and NaN
/// ranks above every number, as in <c>torch.sort</c>, <c>kthvalue</c> and <c>topk</c>.</remarks>
public static class MagnitudeThreshold
{
    /// <summary>
    /// The <paramref name="k"/>-th smallest value (1-based) of <paramref name="values"/> over all
    /// entries, as <c>torch.kthvalue(values.flatten(), k)</c> gives it (−0 and +0 are equal; a zero
    /// answer is +0).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">k is not in [1, numel].</exception>
    public static float KthSmallest(Tensor values, long k)
    {
        ArgumentNullException.ThrowIfNull(values);
        long n = values.numel();
        if (k < 1 || k > n)
        {
            throw new ArgumentOutOfRangeException(nameof(k), k, $"k must be in [1, {n}].");
        }

        if (UseCpuKernels(values))
        {
            var floats = CpuTensors.Floats(values, out var lease);
            using (lease)
            {
                var query = new SelectionQuery(new SignedKeys(floats), k - 1);
                ExactSelector.Solve([query]);
                return FloatKeys.Value(query.Key, signed: true);
            }
        }

        using var scope = NewDisposeScope();
        var flat = values.to(ScalarType.Float32).flatten();
        var (kth, _) = flat.kthvalue(k, 0, false);
        return kth.cpu().item<float>();
    }

    /// <summary>
    /// A boolean mask selecting exactly <paramref name="keep"/> entries of largest
    /// <paramref name="magnitudes"/> (values assumed non-negative, e.g. |τ|). Among entries equal to
    /// the boundary value, those at the lowest flat positions are taken first.
    /// </summary>
    /// <param name="magnitudes">Non-negative values, any shape.</param>
    /// <param name="keep">How many entries to select; ≤ 0 selects none, ≥ numel selects all.</param>
    public static Tensor TopKMask(Tensor magnitudes, long keep)
    {
        ArgumentNullException.ThrowIfNull(magnitudes);
        long n = magnitudes.numel();
        if (keep <= 0)
        {
            return zeros_like(magnitudes, ScalarType.Bool);
        }

        if (keep >= n)
        {
            return ones_like(magnitudes, ScalarType.Bool);
        }

        if (UseCpuKernels(magnitudes))
        {
            var floats = CpuTensors.Floats(magnitudes, out var lease);
            using (lease)
            {
                var source = new SignedKeys(floats);
                var query = new SelectionQuery(source, n - keep, indexDescending: true);
                ExactSelector.Solve([query]);
                return MaskFromSource(source, magnitudes.shape, query.Composite);
            }
        }

        using var scope = NewDisposeScope();
        var m = AsCompared(magnitudes);
        // The keep-th largest is the (n - keep + 1)-th smallest. NaN is above every number and equal to NaN.
        float boundary = KthSmallest(m, n - keep + 1);
        using var boundaryScalar = boundary.ToScalar();
        var nan = m.isnan();
        var (above, atBoundary) = float.IsNaN(boundary)
            ? (zeros_like(m, ScalarType.Bool), nan)
            : (m.gt(boundaryScalar).logical_or_(nan), m.eq(boundaryScalar));
        long strictlyAbove = above.sum().item<long>();
        using var tiesKept = (keep - strictlyAbove).ToScalar();
        var firstTies = atBoundary.flatten().cumsum(0, ScalarType.Int64).le(tiesKept).view(magnitudes.shape);
        return above.logical_or_(atBoundary.logical_and_(firstTies)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// A boolean mask selecting, in each row (the last dimension), the entries whose rank in a stable
    /// ascending sort of <paramref name="magnitudes"/> lies in [<paramref name="low"/>,
    /// <paramref name="high"/>): rank 0 is the smallest; equal values rank by position.
    /// </summary>
    public static Tensor RankWindowMask(Tensor magnitudes, long low, long high)
    {
        ArgumentNullException.ThrowIfNull(magnitudes);
        if (magnitudes.numel() == 0)
        {
            return zeros_like(magnitudes, ScalarType.Bool);
        }

        long d = magnitudes.shape.Length == 0 ? 1 : magnitudes.shape[^1];
        if (UseCpuKernels(magnitudes) && d <= ExactSelector.MaxLength)
        {
            var floats = CpuTensors.Floats(magnitudes, out var lease);
            using (lease)
            {
                return CpuRankWindowMask(floats, magnitudes.shape, d, low, high);
            }
        }

        using var scope = NewDisposeScope();
        var rows = AsCompared(magnitudes).reshape(-1, d);
        var (_, order) = rows.sort(dim: 1, descending: false, stable: true);
        using var width = d.ToScalar();
        using var lowScalar = low.ToScalar();
        using var highScalar = high.ToScalar();
        var ranks = empty_like(order).scatter_(1, order, arange(ScalarArgs.Zero, width, ScalarArgs.One, ScalarType.Int64, rows.device).expand(rows.shape[0], d));
        var mask = ranks.ge(lowScalar).logical_and_(ranks.lt(highScalar));
        return mask.view(magnitudes.shape).MoveToOuterDisposeScope();
    }

    /// <summary><paramref name="t"/> as the selection compares it: float64 rounded to float32 (the CPU kernels
    /// read float32), anything else as it is.</summary>
    private static Tensor AsCompared(Tensor t) => t.dtype == ScalarType.Float64 ? t.to(ScalarType.Float32) : t;

    /// <summary>Whether the CPU kernels handle <paramref name="t"/> (switched off to test them against libtorch).</summary>
    internal static bool UseCpuKernels(Tensor t) =>
        CpuKernelsEnabled && CpuTensors.OnCpu(t) && t.is_floating_point() && t.numel() > 0 && t.numel() <= ExactSelector.MaxLength;

    /// <summary>Whether CPU tensors use the hand-written kernels (true) or libtorch (false, for tests).</summary>
    internal static bool CpuKernelsEnabled { get; set; } = true;

    /// <summary>The bool mask "composite (key, ~index) ≥ <paramref name="boundary"/>" over a whole source.</summary>
    private static unsafe Tensor MaskFromSource(KeySource source, long[] shape, ulong boundary)
    {
        var mask = NativeBufferPool.Empty(shape, ScalarType.Bool);
        var output = (byte*)CpuTensors.Pointer(mask);
        uint key = (uint)(boundary >> 32);
        long lastIndex = uint.MaxValue - (uint)boundary; // ties at the boundary key: indices ≤ this are kept
        source.ForEachBlock((_, start, count, keys) =>
        {
            for (int i = 0; i < count; i++)
            {
                uint k = keys[i];
                output[start + i] = (byte)(k > key || (k == key && start + i <= lastIndex) ? 1 : 0);
            }
        });

        return mask;
    }

    private static unsafe Tensor CpuRankWindowMask(CpuFloats floats, long[] shape, long d, long low, long high)
    {
        long n = floats.Length;
        long rows = n / d;
        var mask = NativeBufferPool.Empty(shape, ScalarType.Bool);
        var output = (byte*)CpuTensors.Pointer(mask);
        low = Math.Clamp(low, 0, d);
        high = Math.Clamp(high, 0, d);
        if (high <= low)
        {
            System.Runtime.InteropServices.NativeMemory.Clear(output, (nuint)n);
            return mask;
        }

        if (d > RowWindow.MaxShortRow)
        {
            // Few long rows: select within each row with the whole-tensor selector (multi-threaded).
            for (long r = 0; r < rows; r++)
            {
                var source = new SignedKeys(floats.Slice(r * d, d));
                var (lower, upper) = RowWindow.OfLongRow(source, low, high);
                WindowMaskOfSource(source, output + r * d, low > 0, lower, upper);
            }

            return mask;
        }

        int width = (int)d;
        CpuParallel.For(rows, r =>
        {
            RowWindow.ShortRowScratch(width, out var keys, out var floatsScratch, out var selector);
            new SignedKeys(floats).Fill(r * d, width, keys, floatsScratch);
            var (lower, upper) = RowWindow.OfShortRow(keys, width, low, high, selector);
            var rowOut = output + r * d;
            for (int i = 0; i < width; i++)
            {
                ulong c = ((ulong)keys[i] << 32) | (uint)i;
                rowOut[i] = (byte)(c <= upper && (low == 0 || c > lower) ? 1 : 0);
            }
        });

        return mask;
    }

    /// <summary>The bool mask "lower &lt; (key, index) ≤ upper" of a row (no lower bound unless
    /// <paramref name="hasLower"/>: composite 0 is a real entry, so 0 cannot stand for "none").</summary>
    private static unsafe void WindowMaskOfSource(KeySource source, byte* output, bool hasLower, ulong lower, ulong upper)
    {
        source.ForEachBlock((_, start, count, keys) =>
        {
            for (int i = 0; i < count; i++)
            {
                ulong c = ((ulong)keys[i] << 32) | (uint)(start + i);
                output[start + i] = (byte)(c <= upper && (!hasLower || c > lower) ? 1 : 0);
            }
        });
    }
}
