using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Selection;
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

    /// <summary>Asserts that a <see cref="RadixSelect"/> over <paramref name="chunks"/> (float32 or bfloat16),
    /// observed chunk by chunk in both passes, gives libtorch's <c>kthvalue</c> over their concatenation
    /// (as magnitudes unless <paramref name="signedValues"/>) at each of the 1-based <paramref name="ranks"/>
    /// of the n values.</summary>
    public static void RadixSelectMatchesKthvalue(Tensor[] chunks, bool signedValues, Func<long, long[]> ranks)
    {
        using var scope = NewDisposeScope();
        var all = cat(chunks.Select(c => c.to(ScalarType.Float32)).ToArray());
        var values = signedValues ? all : all.abs();
        var asked = ranks(values.numel());
        var select = new RadixSelect(signedValues);
        foreach (var c in chunks)
        {
            select.ObserveCoarse(c);
        }

        select.EndCoarse(asked);
        foreach (var c in chunks)
        {
            select.ObserveFine(c);
        }

        var result = select.EndFine();
        for (int r = 0; r < asked.Length; r++)
        {
            Assert.That(result[r], Is.EqualTo(values.kthvalue(asked[r], 0, false).values.item<float>()), $"rank {asked[r]}");
        }
    }

    public static float[] Values(Tensor t)
    {
        using var scope = NewDisposeScope();
        return t.to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
    }

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
        using var scope = NewDisposeScope();
        using var s = scale.ToScalar();
        var sd = new StateDict();
        sd.Add("embed.weight", randn([16, 8], generator: g).mul(s).to(dtype).MoveToOuterDisposeScope());
        sd.Add("layers.0.weight", randn([8, 8], generator: g).mul(s).to(dtype).MoveToOuterDisposeScope());
        sd.Add("layers.0.bias", randn([8], generator: g).mul(s).to(dtype).MoveToOuterDisposeScope());
        sd.Add("layers.1.weight", randn([4, 8], generator: g).mul(s).to(dtype).MoveToOuterDisposeScope());
        return sd;
    }

    /// <summary>A model of the given tensors, each drawn from N(0, 1) in turn by one generator seeded with
    /// <paramref name="seed"/> (in float32), then stored in its dtype: the tests' larger models, whose sizes
    /// decide which kernel paths run.</summary>
    public static StateDict DrawnModel(long seed, params (string Name, long[] Shape, ScalarType DType)[] tensors)
    {
        using var g = new Generator((ulong)seed);
        return DrawnModel(g, tensors);
    }

    /// <summary><see cref="DrawnModel(long, ValueTuple{string, long[], ScalarType}[])"/> drawn from
    /// <paramref name="g"/>, which goes on to draw whatever the caller draws next.</summary>
    public static StateDict DrawnModel(Generator g, params (string Name, long[] Shape, ScalarType DType)[] tensors)
    {
        var sd = new StateDict();
        foreach (var (name, shape, dtype) in tensors)
        {
            sd.Add(name, Drawn(g, shape, dtype));
        }

        return sd;
    }

    /// <summary>A tensor of <paramref name="shape"/> drawn from N(0, 1) by <paramref name="g"/> in float32,
    /// then stored in <paramref name="dtype"/> (the float32 draw disposed).</summary>
    public static Tensor Drawn(Generator g, long[] shape, ScalarType dtype)
    {
        using var drawn = randn(shape, generator: g);
        return drawn.to(dtype, copy: true);
    }

    /// <summary>base + a seeded random delta of the given scale, per tensor.</summary>
    public static StateDict Expert(StateDict baseModel, long seed, double scale = 0.1)
    {
        using var g = new Generator((ulong)seed);
        using var s = scale.ToScalar();
        return baseModel.Map(t =>
        {
            using var scope = NewDisposeScope();
            return t.to(ScalarType.Float32).add(randn(t.shape, generator: g).mul(s)).to(t.dtype).MoveToOuterDisposeScope();
        });
    }

    /// <summary>Turns MergeLab's CPU kernels on or off until disposed (off: the libtorch formulation,
    /// which other devices run); restores the previous setting.</summary>
    public static IDisposable CpuKernels(bool enabled) =>
        Setting(() => MagnitudeThreshold.CpuKernelsEnabled, v => MagnitudeThreshold.CpuKernelsEnabled = v, enabled);

    /// <summary>The lane widths the fused kernels' loops can run at here: <see cref="System.Numerics.Vector{T}"/>'s (false),
    /// and 512-bit where the CPU has it (true); <see cref="WideLanes"/> picks one.</summary>
    public static bool[] LaneWidths => System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated ? [false, true] : [false];

    /// <summary>Runs the fused kernels' loops on 512-bit vectors (<paramref name="wide"/>) or on
    /// <see cref="System.Numerics.Vector{T}"/>'s until disposed; then restores the previous setting.</summary>
    public static IDisposable WideLanes(bool wide) =>
        Setting(() => FusedPipeline.UseWideLanes, v => FusedPipeline.UseWideLanes = v, wide);

    /// <summary>Two merge ids of the form a merge writes into its hidden folders' names (a <see cref="Guid"/>
    /// in "N" form).</summary>
    public const string MergeId = "0123456789abcdef0123456789abcdef", OtherMergeId = "fedcba9876543210fedcba9876543210";

    /// <summary>Makes the selector solve by histograms alone (<paramref name="on"/>) until disposed.</summary>
    public static IDisposable ForceHistogram(bool on) =>
        Setting(() => ExactSelector.ForceHistogram, v => ExactSelector.ForceHistogram = v, on);

    /// <summary>Runs the selector's scan on 512-bit vectors (<paramref name="wide"/>) or narrower until disposed.</summary>
    public static IDisposable WideScan(bool wide) => Setting(() => ExactSelector.WideScan, v => ExactSelector.WideScan = v, wide);

    /// <summary>Sets a switch (a static test setting) to <paramref name="value"/> until disposed, then puts
    /// back the value it had.</summary>
    public static IDisposable Setting<TValue>(Func<TValue> get, Action<TValue> set, TValue value)
    {
        var before = get();
        set(value);
        return new Restore(() => set(before));
    }

    /// <summary><paramref name="f"/>'s result with the CPU kernels off.</summary>
    public static TResult Libtorch<TResult>(Func<TResult> f) => With(CpuKernels(false), f);

    /// <summary><paramref name="f"/>'s result under <paramref name="setting"/> (from <see cref="Setting"/>),
    /// which is disposed after it.</summary>
    public static TResult With<TResult>(IDisposable setting, Func<TResult> f)
    {
        using (setting)
        {
            return f();
        }
    }

    /// <summary>Disposes each of <paramref name="items"/> (a test's experts, say; taken as they are now, not
    /// enumerated again) when disposed itself.</summary>
    public static IDisposable DisposingAll(IEnumerable<IDisposable> items)
    {
        var owned = items.ToArray();
        return new Restore(() =>
        {
            foreach (var item in owned)
            {
                item.Dispose();
            }
        });
    }

    /// <summary>Sets torch's thread count (which MergeLab's kernels follow) until disposed.</summary>
    public static IDisposable Threads(int count) => Setting(get_num_threads, set_num_threads, count);

    /// <summary>Asserts that <paramref name="merge"/> gives the same bits on 2 and 3 threads as on 1.</summary>
    public static void SameOnAnyThreadCount(Func<StateDict> merge, string label = "")
    {
        StateDict one;
        using (Threads(1))
        {
            one = merge();
        }

        using (one)
        {
            foreach (int n in new[] { 2, 3 })
            {
                using var threads = Threads(n);
                using var other = merge();
                foreach (var name in one.Names)
                {
                    BitEqual(other[name], one[name], $"{name}{(label.Length == 0 ? "" : ", " + label)}, {n} threads");
                }
            }
        }
    }

    private sealed class Restore(Action restore) : IDisposable
    {
        public void Dispose() => restore();
    }
}
