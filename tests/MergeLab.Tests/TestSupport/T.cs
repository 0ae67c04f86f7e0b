using MergeLab.Methods;
using MergeLab.Tensors;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests;

/// <summary>Small builders and tolerance-aware assertions shared by the tests.</summary>
internal static class T
{
    public const double Tol = 1e-6;

    public static Tensor Vec(params float[] values) => tensor(values);

    public static Tensor Mat(float[] values, long rows, long cols) => tensor(values, [rows, cols]);

    public static float[] Values(Tensor t) => t.to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();

    public static void Near(Tensor actual, IEnumerable<double> expected, double tol = Tol)
    {
        var a = Values(actual);
        var e = expected.ToArray();
        Assert.That(a.Length, Is.EqualTo(e.Length), "element count");
        for (int i = 0; i < a.Length; i++)
        {
            Assert.That(a[i], Is.EqualTo(e[i]).Within(tol), $"entry {i}: got [{string.Join(", ", a)}], expected [{string.Join(", ", e)}]");
        }
    }

    public static void Near(Tensor actual, Tensor expected, double tol = Tol) =>
        Near(actual, Values(expected).Select(v => (double)v), tol);

    public static void BitEqual(Tensor actual, Tensor expected)
    {
        Assert.That(actual.shape, Is.EqualTo(expected.shape), "shape");
        Assert.That(actual.dtype, Is.EqualTo(expected.dtype), "dtype");
        Assert.That(Same(actual, expected), Is.True, "tensors differ");
    }

    /// <summary>Same shape, dtype and every element bit-equal (NaN never equals).</summary>
    public static bool Same(Tensor a, Tensor b)
    {
        if (!a.shape.SequenceEqual(b.shape) || a.dtype != b.dtype)
        {
            return false;
        }

        using var eq = a.eq(b);
        using var all = eq.all();
        return all.item<bool>();
    }

    /// <summary>Merges one tensor group of a base of zeros and experts whose task vectors are <paramref name="taus"/>.</summary>
    public static Tensor MergeDeltas(MergeMethod method, params float[][] taus)
    {
        using var scope = NewDisposeScope();
        var b = zeros(taus[0].Length);
        var experts = taus.Select(t => tensor(t)).ToArray();
        var group = new TensorGroup("w", b, experts);
        ModelStatistic? stat = method.CreateStatistic(taus.Length);
        while (stat is { IsComplete: false })
        {
            stat.Observe(group);
            stat.EndPass();
        }

        return method.MergeTensor(group, stat).MoveToOuterDisposeScope();
    }

    /// <summary>A random model: a few tensors of varied shapes, seeded.</summary>
    public static StateDict RandomModel(long seed, ScalarType dtype = ScalarType.Float32, double scale = 1.0)
    {
        using var g = new Generator((ulong)seed);
        var sd = new StateDict();
        sd.Add("embed.weight", (randn([16, 8], generator: g) * scale).to(dtype));
        sd.Add("layers.0.weight", (randn([8, 8], generator: g) * scale).to(dtype));
        sd.Add("layers.0.bias", (randn([8], generator: g) * scale).to(dtype));
        sd.Add("layers.1.weight", (randn([4, 8], generator: g) * scale).to(dtype));
        return sd;
    }

    /// <summary>base + a seeded random delta of the given scale, per tensor.</summary>
    public static StateDict Expert(StateDict baseModel, long seed, double scale = 0.1)
    {
        using var g = new Generator((ulong)seed);
        return baseModel.Map(t => (t.to(ScalarType.Float32) + randn(t.shape, generator: g) * scale).to(t.dtype));
    }
}
