using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// Exact order statistics of magnitudes, the hot loop of TIES, Breadcrumbs and PCB. Every result is
/// exact (no sampling, no approximation) and ties at a boundary are broken by position, so two runs
/// on the same input always select the same entries.
/// </summary>
public static class MagnitudeThreshold
{
    /// <summary>
    /// The <paramref name="k"/>-th smallest value (1-based) of <paramref name="values"/> over all
    /// entries, as <c>torch.kthvalue(values.flatten(), k)</c> gives it.
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

        using var scope = NewDisposeScope();
        // The keep-th largest is the (n - keep + 1)-th smallest.
        float boundary = KthSmallest(magnitudes, n - keep + 1);
        var above = magnitudes > boundary;
        long strictlyAbove = above.sum().item<long>();
        var atBoundary = magnitudes == boundary;
        var firstTies = atBoundary.flatten().cumsum(0, ScalarType.Int64).le(keep - strictlyAbove).view(magnitudes.shape);
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
        using var scope = NewDisposeScope();
        long d = magnitudes.shape.Length == 0 ? 1 : magnitudes.shape[^1];
        var rows = magnitudes.reshape(-1, d);
        var (_, order) = rows.sort(dim: 1, descending: false, stable: true);
        var ranks = empty_like(order).scatter_(1, order, arange(d, ScalarType.Int64, rows.device).expand(rows.shape[0], d));
        var mask = ranks.ge(low).logical_and_(ranks.lt(high));
        return mask.view(magnitudes.shape).MoveToOuterDisposeScope();
    }
}
