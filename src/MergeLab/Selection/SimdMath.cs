using System.Numerics;
using System.Runtime.CompilerServices;

namespace MergeLab.Selection;

/// <summary>
/// exp and tanh over <see cref="Vector{T}"/> of float32, for the CPU kernels that need them in their hot
/// loop (PCB's scores). Both are within 1 ulp of the exact value (tested against float64
/// <see cref="Math.Exp"/> and <see cref="Math.Tanh"/>), as libtorch's own are; neither is bit-identical to
/// libtorch's, which itself differs between CPUs (Sleef or MKL) and devices.
/// </summary>
internal static class SimdMath
{
    // ln 2 split in two (Cody and Waite): the high part ends in nine zero bits, so k·Ln2High is exact for
    // every k that occurs (|k| ≤ 127) and the reduced argument loses nothing.
    private const float Ln2High = 0.693145751953125f;
    private const float Ln2Low = 1.42860676533018e-06f;
    private const float Log2E = 1.44269504088896341f;

    /// <summary>Below this |x| tanh is its odd Taylor series; from it on, 1 − 2/(e^{2|x|} + 1) in float64.</summary>
    internal const float TanhSeriesLimit = 0.3f;

    /// <summary>e^x for x in [−87, 88] (arguments outside are clamped to it; NaN stays NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Exp(Vector<float> x)
    {
        var clamped = Vector.MinNative(Vector.MaxNative(x, new Vector<float>(-87f)), new Vector<float>(88f)); // NaN is restored below

        // e^x = 2^k · e^r with k = round(x / ln 2) and |r| ≤ ln 2 / 2.
        var k = Vector.Round(clamped * Log2E);
        var r = Vector.FusedMultiplyAdd(k, new Vector<float>(-Ln2High), clamped);
        r = Vector.FusedMultiplyAdd(k, new Vector<float>(-Ln2Low), r);

        // e^r = 1 + r + r²·(1/2! + r/3! + … + r⁵/7!): the truncation is below 0.1 ulp on |r| ≤ ln 2 / 2.
        var p = new Vector<float>(1f / 5040f);
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1f / 720f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1f / 120f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1f / 24f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1f / 6f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(0.5f));
        var er = Vector.FusedMultiplyAdd(r * r, p, r) + Vector<float>.One;

        // 2^k from its exponent bits; k lies in [−126, 127] after the clamp.
        var scale = Vector.AsVectorSingle(Vector.ShiftLeft(Vector.ConvertToInt32(k) + new Vector<int>(127), 23));
        var result = er * scale;
        return Vector.ConditionalSelect(Vector.Equals(x, x), result, x);
    }

    /// <summary>tanh(x) (NaN stays NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Tanh(Vector<float> x)
    {
        var x2 = x * x;

        // tanh x = x + x³·P(x²) with P the series' coefficients −1/3, 2/15, −17/315, 62/2835,
        // −1382/155925, 21844/6081075; for |x| < 0.3 the first omitted term is below 1e-10 of x.
        var p = new Vector<float>(21844f / 6081075f);
        p = Vector.FusedMultiplyAdd(p, x2, new Vector<float>(-1382f / 155925f));
        p = Vector.FusedMultiplyAdd(p, x2, new Vector<float>(62f / 2835f));
        p = Vector.FusedMultiplyAdd(p, x2, new Vector<float>(-17f / 315f));
        p = Vector.FusedMultiplyAdd(p, x2, new Vector<float>(2f / 15f));
        p = Vector.FusedMultiplyAdd(p, x2, new Vector<float>(-1f / 3f));
        var series = Vector.FusedMultiplyAdd(x * x2, p, x);
        series = Vector.ConditionalSelect(new Vector<float>(-0f), x, series); // x's sign, so tanh(−0) = −0

        var large = Vector.GreaterThanOrEqual(Vector.Abs(x), new Vector<float>(TanhSeriesLimit));
        return Vector.EqualsAll(large, Vector<int>.Zero) ? series : Vector.ConditionalSelect(large, LargeTanh(x), series);
    }

    /// <summary>tanh lane by lane in float64 (the rare lanes with |x| ≥ 0.3, where 1 − 2/(e^{2|x|} + 1)
    /// in float32 would lose up to a few ulp to cancellation).</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static Vector<float> LargeTanh(Vector<float> x)
    {
        Span<float> lanes = stackalloc float[Vector<float>.Count];
        x.CopyTo(lanes);
        for (int i = 0; i < lanes.Length; i++)
        {
            lanes[i] = (float)Math.Tanh(lanes[i]);
        }

        return new Vector<float>(lanes);
    }
}
