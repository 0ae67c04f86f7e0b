using System.Numerics;
using System.Runtime.Intrinsics;
using MergeLab.Selection;
using NUnit.Framework;

namespace MergeLab.Tests.Selection;

/// <summary>The vectorized exp and tanh of the PCB kernel against float64 <see cref="Math"/>, in ulps of the
/// float32 result: about libtorch's own promise of 1 ulp (Sleef's u10 functions), measured 1.014 for exp
/// over its whole range and 0.53 for tanh.</summary>
public class SimdMathTests
{
    private static float[] Apply(Func<Vector<float>, Vector<float>> f, float[] x)
    {
        var result = new float[x.Length];
        int lanes = Vector<float>.Count;
        var padded = new float[(x.Length + lanes - 1) / lanes * lanes];
        x.CopyTo(padded, 0);
        for (int i = 0; i < padded.Length; i += lanes)
        {
            var y = f(new Vector<float>(padded, i));
            for (int j = 0; j < lanes && i + j < x.Length; j++)
            {
                result[i + j] = y[j];
            }
        }

        return result;
    }

    /// <summary>|actual − exact| in units of the float32 spacing at the exact value.</summary>
    private static double Ulps(float actual, double exact)
    {
        float rounded = (float)exact;
        double spacing = Math.Abs((double)MathF.BitIncrement(Math.Abs(rounded)) - Math.Abs(rounded));
        return Math.Abs(actual - exact) / spacing;
    }

    private static float[] Grid(float from, float to, int count, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)(from + ((to - from) * random.NextDouble()))).ToArray();
    }

    /// <summary>The largest error, in ulps, of <paramref name="f"/> against <paramref name="exact"/> over 200 000
    /// random points of [from, to].</summary>
    private static double WorstUlps(string name, Func<Vector<float>, Vector<float>> f, Func<double, double> exact, float from, float to, int seed)
    {
        var x = Grid(from, to, 200_000, seed);
        var y = Apply(f, x);
        double worst = x.Select((v, i) => Ulps(y[i], exact(v))).Max();
        TestContext.Out.WriteLine($"{name} on [{from}, {to}]: worst {worst:F3} ulp");
        return worst;
    }

    [TestCase(-87f, 88f)]
    [TestCase(0f, 64f)] // PCB's intra-balancing argument n·m², m in [0, 1], n ≤ 64 experts
    [TestCase(-1f, 1f)]
    [TestCase(-1e-6f, 1e-6f)]
    public void Exp_is_within_about_one_ulp(float from, float to) =>
        Assert.That(WorstUlps("exp", SimdMath.Exp, Math.Exp, from, to, seed: 1), Is.LessThanOrEqualTo(1.02));

    [Test]
    public void Exp_is_exact_where_the_result_is_a_float_and_keeps_nan()
    {
        var y = Apply(SimdMath.Exp, [0f, -0f, 1f, float.NaN]);
        Assert.That(y[0], Is.EqualTo(1f));
        Assert.That(y[1], Is.EqualTo(1f));
        Assert.That(Ulps(y[2], Math.E), Is.LessThanOrEqualTo(0.5), "e rounds correctly");
        Assert.That(float.IsNaN(y[3]), Is.True);
    }

    [TestCase(-12f, 12f)]
    [TestCase(-0.5f, 0.5f)] // both sides of the series limit 0.3
    [TestCase(-1e-3f, 1e-3f)]
    [TestCase(-1e-30f, 1e-30f)] // PCB's inter-balancing argument is often this small
    public void Tanh_is_within_0_55_ulp(float from, float to) =>
        Assert.That(WorstUlps("tanh", SimdMath.Tanh, Math.Tanh, from, to, seed: 2), Is.LessThanOrEqualTo(0.55));

    [Test]
    public void Tanh_is_odd_exact_at_zero_and_saturates()
    {
        var x = Grid(-5f, 5f, 10_000, 3);
        var y = Apply(SimdMath.Tanh, x);
        var negated = Apply(SimdMath.Tanh, x.Select(v => -v).ToArray());
        Assert.That(negated, Is.EqualTo(y.Select(v => -v).ToArray()));
        var special = Apply(SimdMath.Tanh, [0f, -0f, 20f, -20f, float.NaN]);
        Assert.That(BitConverter.SingleToInt32Bits(special[0]), Is.EqualTo(0));
        Assert.That(BitConverter.SingleToInt32Bits(special[1]), Is.EqualTo(BitConverter.SingleToInt32Bits(-0f)));
        Assert.That(special[2..4], Is.EqualTo(new[] { 1f, -1f }));
        Assert.That(float.IsNaN(special[4]), Is.True);
    }

    /// <summary>The 512-bit exp and tanh (one generic body with the <see cref="Vector{T}"/> ones) give the same
    /// bits lane for lane, over both functions' ranges, both tanh paths and the special values.</summary>
    [Test]
    public void The_512_bit_functions_give_the_same_bits()
    {
        Assume.That(Vector512.IsHardwareAccelerated, "no 512-bit vectors on this CPU");
        var x = Grid(-90f, 90f, 40_000, 4).Concat(Grid(-0.5f, 0.5f, 40_000, 5)).Concat(Grid(-1e-6f, 1e-6f, 8_000, 6))
            .Concat([0f, -0f, float.NaN, float.PositiveInfinity, float.NegativeInfinity, 0.3f, -0.3f, 88f, -87f, 1e-38f])
            .ToArray();
        var padded = new float[(x.Length + 15) / 16 * 16];
        x.CopyTo(padded, 0);
        foreach (var (name, narrow, wide) in new (string, Func<Vector<float>, Vector<float>>, Func<Vector512<float>, Vector512<float>>)[]
        {
            ("exp", SimdMath.Exp, SimdMath.Exp<Vector512Lanes, Vector512<float>>),
            ("tanh", SimdMath.Tanh, SimdMath.Tanh<Vector512Lanes, Vector512<float>>),
        })
        {
            var expected = Apply(narrow, padded);
            var actual = new float[padded.Length];
            for (int i = 0; i < padded.Length; i += 16)
            {
                wide(Vector512.Create(padded.AsSpan(i, 16))).CopyTo(actual.AsSpan(i, 16));
            }

            Assert.That(actual.Select(BitConverter.SingleToInt32Bits), Is.EqualTo(expected.Select(BitConverter.SingleToInt32Bits)), name);
        }
    }
}
