using MergeLab.IO;
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

    /// <summary>Asserts the same dtype, shape and bytes (so the sign of a zero and a NaN's payload count).</summary>
    public static void BitEqual(Tensor actual, Tensor expected, string name = "")
    {
        string of = name.Length == 0 ? "" : $" of {name}";
        using (Assert.EnterMultipleScope())
        {
            Assert.That(actual.dtype, Is.EqualTo(expected.dtype), "dtype" + of);
            Assert.That(actual.shape, Is.EqualTo(expected.shape), "shape" + of);
            Assert.That(RawBytes(actual), Is.EqualTo(RawBytes(expected)), "bytes" + of);
        }
    }

    /// <summary>Same shape, dtype and bytes: −0 differs from +0, and a NaN equals a NaN of the same bits.</summary>
    public static bool Same(Tensor a, Tensor b) =>
        a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && RawBytes(a).AsSpan().SequenceEqual(RawBytes(b));

    /// <summary>The tensor's bytes, in row-major order, copied to the host.</summary>
    public static byte[] RawBytes(Tensor t)
    {
        using var cpu = t.cpu();
        using var contiguous = cpu.contiguous();
        return contiguous.bytes.ToArray();
    }

    /// <summary>Asserts that the checkpoint in <paramref name="directory"/> holds every tensor of
    /// <paramref name="expected"/> with the same bytes (and, when <paramref name="sameNames"/>, no other).</summary>
    public static void CheckpointHolds(string directory, StateDict expected, bool sameNames = false)
    {
        using var written = SafetensorsCheckpoint.Open(directory);
        if (sameNames)
        {
            Assert.That(written.TensorNames.Order(), Is.EqualTo(expected.Names.Order()));
        }

        foreach (var name in expected.Names)
        {
            using var actual = written.ReadTensor(name);
            BitEqual(actual, expected[name], name);
        }
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
