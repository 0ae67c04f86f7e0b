using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace MergeLab.Selection;

/// <summary>
/// exp and tanh over <see cref="Vector{T}"/> or <see cref="Vector512{T}"/> of float32 (one generic body, so
/// both widths give the same bits), for the CPU kernels that need them in their hot loop (PCB's scores). Both are within 1 ulp of the exact value (tested against float64
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
    public static Vector<float> Exp(Vector<float> x) => Exp<VectorLanes, Vector<float>>(x);

    /// <summary>tanh(x) (NaN stays NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Tanh(Vector<float> x) => Tanh<VectorLanes, Vector<float>>(x);

    /// <summary>e^x at any width (see <see cref="Exp(Vector{float})"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static TV Exp<TL, TV>(TV x)
        where TL : ISimdLanes<TV>
        where TV : unmanaged
    {
        var clamped = TL.MinNative(TL.MaxNative(x, TL.Broadcast(-87f)), TL.Broadcast(88f)); // NaN is restored below

        // e^x = 2^k · e^r with k = round(x / ln 2) and |r| ≤ ln 2 / 2.
        var k = TL.Round(TL.Multiply(clamped, TL.Broadcast(Log2E)));
        var r = TL.FusedMultiplyAdd(k, TL.Broadcast(-Ln2High), clamped);
        r = TL.FusedMultiplyAdd(k, TL.Broadcast(-Ln2Low), r);

        // e^r = 1 + r + r²·(1/2! + r/3! + … + r⁵/7!): the truncation is below 0.1 ulp on |r| ≤ ln 2 / 2.
        var p = TL.Broadcast(1f / 5040f);
        p = TL.FusedMultiplyAdd(p, r, TL.Broadcast(1f / 720f));
        p = TL.FusedMultiplyAdd(p, r, TL.Broadcast(1f / 120f));
        p = TL.FusedMultiplyAdd(p, r, TL.Broadcast(1f / 24f));
        p = TL.FusedMultiplyAdd(p, r, TL.Broadcast(1f / 6f));
        p = TL.FusedMultiplyAdd(p, r, TL.Broadcast(0.5f));
        var er = TL.Add(TL.FusedMultiplyAdd(TL.Multiply(r, r), p, r), TL.One);

        // 2^k from its exponent bits; k lies in [−126, 127] after the clamp.
        var result = TL.Multiply(er, TL.PowerOfTwo(k));
        return TL.Select(TL.EqualTo(x, x), result, x);
    }

    /// <summary>tanh(x) at any width (see <see cref="Tanh(Vector{float})"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static TV Tanh<TL, TV>(TV x)
        where TL : ISimdLanes<TV>
        where TV : unmanaged
    {
        var x2 = TL.Multiply(x, x);

        // tanh x = x + x³·P(x²) with P the series' coefficients −1/3, 2/15, −17/315, 62/2835,
        // −1382/155925, 21844/6081075; for |x| < 0.3 the first omitted term is below 1e-10 of x.
        var p = TL.Broadcast(21844f / 6081075f);
        p = TL.FusedMultiplyAdd(p, x2, TL.Broadcast(-1382f / 155925f));
        p = TL.FusedMultiplyAdd(p, x2, TL.Broadcast(62f / 2835f));
        p = TL.FusedMultiplyAdd(p, x2, TL.Broadcast(-17f / 315f));
        p = TL.FusedMultiplyAdd(p, x2, TL.Broadcast(2f / 15f));
        p = TL.FusedMultiplyAdd(p, x2, TL.Broadcast(-1f / 3f));
        var series = TL.FusedMultiplyAdd(TL.Multiply(x, x2), p, x);
        series = TL.Select(TL.Broadcast(-0f), x, series); // x's sign, so tanh(−0) = −0

        var large = TL.GreaterThanOrEqual(TL.Abs(x), TL.Broadcast(TanhSeriesLimit));
        return TL.None(large) ? series : TL.Select(large, LargeTanh<TL, TV>(x), series);
    }

    /// <summary>tanh lane by lane in float64 (the rare lanes with |x| ≥ 0.3, where 1 − 2/(e^{2|x|} + 1)
    /// in float32 would lose up to a few ulp to cancellation).</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static unsafe TV LargeTanh<TL, TV>(TV x)
        where TL : ISimdLanes<TV>
        where TV : unmanaged
    {
        var lanes = stackalloc float[TL.Count];
        TL.Write(x, lanes);
        for (int i = 0; i < TL.Count; i++)
        {
            lanes[i] = (float)Math.Tanh(lanes[i]);
        }

        return TL.Read(lanes);
    }
}
