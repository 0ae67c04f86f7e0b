using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Text;
using MergeLab.Selection;
using static TorchSharp.torch;

namespace MergeLab.Stages;

/// <summary>
/// Seeded random keep-masks for DARE-style dropping, from a counter-based generator: the uniform number of
/// entry i of a stream is a pure function of (stream seed, i), so a mask can be computed in any order, on
/// any number of threads, block by block, vectorized, and is always the same.
/// </summary>
/// <remarks>
/// The generator is SplitMix64 (Steele, Lea &amp; Flood, 2014) read as a counter-based one: word c of
/// stream s is mix(s + (c + 1)·0x9E3779B97F4A7C15), and each 64-bit word gives two entries (its low 32
/// bits to entry 2c, its high 32 bits to entry 2c + 1). Entry i's uniform is u_i = (bits &gt;&gt; 8)·2⁻²⁴ in
/// [0, 1), and it is kept when u_i ≥ p, i.e. when bits &gt;&gt; 8 ≥ ⌈p·2²⁴⌉ (exact: p·2²⁴ is exact in
/// double).
/// </remarks>
internal static unsafe class DropMask
{
    private const ulong Gamma = 0x9E3779B97F4A7C15UL;

    /// <summary>
    /// A 64-bit seed for one (seed, tensor, expert) stream: FNV-1a of the UTF-8 name mixed with the
    /// seed and index by SplitMix64, so each tensor's mask is independent of merge order.
    /// </summary>
    public static long StreamSeed(long seed, string tensorName, int expertIndex)
    {
        ulong h = 14695981039346656037UL;
        foreach (byte b in Encoding.UTF8.GetBytes(tensorName))
        {
            h = (h ^ b) * 1099511628211UL;
        }

        return (long)(SplitMix(SplitMix((ulong)seed ^ h) + (ulong)expertIndex) >> 1);
    }

    /// <summary>⌈p·2²⁴⌉: an entry is kept when its 24-bit uniform is at least this.</summary>
    public static uint KeepThreshold(double dropRate) => (uint)Math.Ceiling(dropRate * 16777216.0);

    /// <summary>Whether entry <paramref name="index"/> of stream <paramref name="streamSeed"/> is kept.</summary>
    public static bool IsKept(long streamSeed, long index, uint threshold)
    {
        ulong word = SplitMix((ulong)streamSeed + (ulong)(index >> 1) * Gamma);
        uint half = (index & 1) == 0 ? (uint)word : (uint)(word >> 32);
        return half >> 8 >= threshold;
    }

    /// <summary>
    /// Multiplies <paramref name="values"/>[0..count) by their keep mask (1 or 0, as
    /// <c>τ * mask</c> does) for entries [start, start + count) of the stream.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Apply(long streamSeed, uint threshold, long start, int count, float* values)
    {
        int i = 0;
        if ((start & 1) != 0)
        {
            values[0] *= IsKept(streamSeed, start, threshold) ? 1f : 0f;
            i = 1;
        }

        int lanes = Vector<float>.Count;
        if (Vector.IsHardwareAccelerated)
        {
            var one = new Vector<float>(1f);
            for (; i <= count - 2 * lanes; i += 2 * lanes)
            {
                var (low, high) = KeepMasks(streamSeed, threshold, start + i); // start + i is even here
                Vector.Store(Vector.Load(values + i) * Vector.ConditionalSelect(Vector.AsVectorInt32(low), one, Vector<float>.Zero), values + i);
                Vector.Store(Vector.Load(values + i + lanes) * Vector.ConditionalSelect(Vector.AsVectorInt32(high), one, Vector<float>.Zero), values + i + lanes);
            }
        }

        for (; i < count; i++)
        {
            values[i] *= IsKept(streamSeed, start + i, threshold) ? 1f : 0f;
        }
    }

    /// <summary>Keep masks (all bits set = keep) of the 2·lanes entries starting at <paramref name="index"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static (Vector<uint> Low, Vector<uint> High) KeepMasks(long streamSeed, uint threshold, long index)
    {
        if ((index & 1) != 0 || !Vector.IsHardwareAccelerated)
        {
            return (ScalarMask(streamSeed, threshold, index), ScalarMask(streamSeed, threshold, index + Vector<uint>.Count));
        }

        ulong state = FirstState(streamSeed, index);
        var t = new Vector<uint>(threshold);
        return (KeepMask(LaneStates(state), t), KeepMask(LaneStates(state + StateStep(Vector<uint>.Count)), t));
    }

    /// <summary>The generator state of the word that holds entry <paramref name="index"/> (even):
    /// seed + (c + 1)·γ with c = index / 2.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ulong FirstState(long streamSeed, long index) => (ulong)streamSeed + ((ulong)(index >> 1) + 1) * Gamma;

    /// <summary>How far the state moves over <paramref name="entries"/> (even) entries.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ulong StateStep(int entries) => (ulong)(entries >> 1) * Gamma;

    /// <summary>The states of a vector's words from the first one's, state + lane·γ (mod 2⁶⁴): one scalar
    /// product plus lane·γ, no vector product.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<ulong> LaneStates(ulong state) => new Vector<ulong>(state) + LaneSteps;

    /// <summary><see cref="LaneStates(ulong)"/> for a 512-bit vector.</summary>
    public static Vector512<ulong> LaneStates512(ulong state) => Vector512.Create(state) + (Vector512<ulong>.Indices * Vector512.Create(Gamma));

    /// <summary>Keep mask (all bits set = keep) of the entries of a vector of words with states
    /// <paramref name="states"/> (<see cref="LaneStates(ulong)"/>): 24-bit uniform ≥ threshold.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<uint> KeepMask(Vector<ulong> states, Vector<uint> threshold) =>
        Vector.GreaterThanOrEqual(Vector.ShiftRightLogical(Words(states), 8), threshold);

    /// <summary><see cref="KeepMask(Vector{ulong}, Vector{uint})"/> for a 512-bit vector; use only where
    /// <see cref="Vector512.IsHardwareAccelerated"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<uint> KeepMask(Vector512<ulong> states, Vector512<uint> threshold)
    {
        var z = states;
        z = (z ^ Vector512.ShiftRightLogical(z, 30)) * Vector512.Create(Mix1);
        z = (z ^ Vector512.ShiftRightLogical(z, 27)) * Vector512.Create(Mix2);
        z ^= Vector512.ShiftRightLogical(z, 31);
        return Vector512.GreaterThanOrEqual(Vector512.ShiftRightLogical(z.AsUInt32(), 8), threshold);
    }

    private const ulong Mix1 = 0xBF58476D1CE4E5B9UL, Mix2 = 0x94D049BB133111EBUL;

    /// <summary>lane·γ for each lane of a vector of words.</summary>
    private static readonly Vector<ulong> LaneSteps = Vector<ulong>.Indices * new Vector<ulong>(Gamma);

    /// <summary>SplitMix64's output mix of each state z = seed + (counter + 1)·γ.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<uint> Words(Vector<ulong> z)
    {
        z = (z ^ Vector.ShiftRightLogical(z, 30)) * new Vector<ulong>(Mix1);
        z = (z ^ Vector.ShiftRightLogical(z, 27)) * new Vector<ulong>(Mix2);
        z ^= Vector.ShiftRightLogical(z, 31);
        return Vector.AsVectorUInt32(z);
    }

    private static Vector<uint> ScalarMask(long streamSeed, uint threshold, long index)
    {
        Span<uint> lanes = stackalloc uint[Vector<uint>.Count];
        for (int i = 0; i < lanes.Length; i++)
        {
            lanes[i] = IsKept(streamSeed, index + i, threshold) ? uint.MaxValue : 0;
        }

        return new Vector<uint>(lanes);
    }

    /// <summary>
    /// A float mask (1 keep, 0 drop) of <paramref name="like"/>'s shape on its device: entry i (flat) is
    /// kept when u_i ≥ p. Computed on the CPU, so it is the same on every device and thread count.
    /// </summary>
    public static Tensor Keep(Tensor like, double dropRate, long streamSeed)
    {
        long n = like.numel();
        var mask = NativeBufferPool.Empty(like.shape, ScalarType.Float32);
        if (n > 0)
        {
            var p = (float*)CpuTensors.Pointer(mask);
            uint threshold = KeepThreshold(dropRate);
            const int block = 1 << 16;
            CpuParallel.For(CpuParallel.BlockCount(n, block), b =>
            {
                long start = b * block;
                int count = (int)Math.Min(block, n - start);
                new Span<float>(p + start, count).Fill(1f);
                Apply(streamSeed, threshold, start, count, p + start);
            });
        }

        if (CpuTensors.OnCpu(like))
        {
            return mask;
        }

        using (mask)
        {
            return mask.to(like.device);
        }
    }

    /// <summary>The block size of the L1 norms: each block is summed in float64 in index order, then the
    /// blocks in order, so the norms do not depend on the thread count.</summary>
    public const int NormBlock = 16384;

    /// <summary>Σ|τ| and Σ|masked τ| over one block, in float64, in index order.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static (double Before, double After) BlockNorms(float* tau, float* masked, int count)
    {
        double before = 0, after = 0;
        for (int i = 0; i < count; i++)
        {
            before += Math.Abs(tau[i]);
            after += Math.Abs(masked[i]);
        }

        return (before, after);
    }

    /// <summary>Blocks whose norms <see cref="BlockNorms8"/> sums at once.</summary>
    public const int NormLanes = 8;

    /// <summary>Whether <see cref="BlockNorms8"/> sums its blocks side by side (AVX-512); otherwise it sums
    /// them one after another, and callers gain nothing by grouping them.</summary>
    public static bool SideBySideNorms => Avx512F.IsSupported;

    /// <summary>
    /// <see cref="BlockNorms"/> of <see cref="NormLanes"/> blocks of <paramref name="count"/> entries (a
    /// multiple of 8) at once, block j's values at <paramref name="tau"/> and <paramref name="masked"/> +
    /// j·<paramref name="stride"/>: each block is one lane of float64 vectors, summed in its own index order,
    /// so every result has the bits of <see cref="BlockNorms"/>. One sum alone is a chain of dependent
    /// additions; eight side by side take a fraction of the time. Eight entries of each block are loaded
    /// and transposed in registers, so that each vector holds one index of all eight blocks.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void BlockNorms8(float* tau, float* masked, int stride, int count, (double Before, double After)* norms)
    {
        if (!SideBySideNorms || count % 8 != 0)
        {
            for (int j = 0; j < NormLanes; j++)
            {
                norms[j] = BlockNorms(tau + ((long)j * stride), masked + ((long)j * stride), count);
            }

            return;
        }

        var before = Vector512<double>.Zero;
        var after = Vector512<double>.Zero;
        var columns = stackalloc Vector256<float>[8];
        for (int i = 0; i < count; i += 8)
        {
            Transpose(tau + i, stride, columns);
            for (int k = 0; k < 8; k++)
            {
                before += Widen(Vector256.Abs(columns[k]));
            }

            Transpose(masked + i, stride, columns);
            for (int k = 0; k < 8; k++)
            {
                after += Widen(Vector256.Abs(columns[k]));
            }
        }

        for (int j = 0; j < NormLanes; j++)
        {
            norms[j] = (before.GetElement(j), after.GetElement(j));
        }
    }

    /// <summary>The 8×8 floats at <paramref name="p"/> + j·<paramref name="stride"/> (rows j) transposed:
    /// <paramref name="columns"/>[k] holds entry k of every row, row j in lane j.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose(float* p, int stride, Vector256<float>* columns)
    {
        var r0 = Vector256.Load(p);
        var r1 = Vector256.Load(p + stride);
        var r2 = Vector256.Load(p + (2L * stride));
        var r3 = Vector256.Load(p + (3L * stride));
        var r4 = Vector256.Load(p + (4L * stride));
        var r5 = Vector256.Load(p + (5L * stride));
        var r6 = Vector256.Load(p + (6L * stride));
        var r7 = Vector256.Load(p + (7L * stride));
        var t0 = Avx.UnpackLow(r0, r1);
        var t1 = Avx.UnpackHigh(r0, r1);
        var t2 = Avx.UnpackLow(r2, r3);
        var t3 = Avx.UnpackHigh(r2, r3);
        var t4 = Avx.UnpackLow(r4, r5);
        var t5 = Avx.UnpackHigh(r4, r5);
        var t6 = Avx.UnpackLow(r6, r7);
        var t7 = Avx.UnpackHigh(r6, r7);
        var u0 = Avx.Shuffle(t0, t2, 0x44);
        var u1 = Avx.Shuffle(t0, t2, 0xEE);
        var u2 = Avx.Shuffle(t1, t3, 0x44);
        var u3 = Avx.Shuffle(t1, t3, 0xEE);
        var u4 = Avx.Shuffle(t4, t6, 0x44);
        var u5 = Avx.Shuffle(t4, t6, 0xEE);
        var u6 = Avx.Shuffle(t5, t7, 0x44);
        var u7 = Avx.Shuffle(t5, t7, 0xEE);
        columns[0] = Avx.Permute2x128(u0, u4, 0x20);
        columns[1] = Avx.Permute2x128(u1, u5, 0x20);
        columns[2] = Avx.Permute2x128(u2, u6, 0x20);
        columns[3] = Avx.Permute2x128(u3, u7, 0x20);
        columns[4] = Avx.Permute2x128(u0, u4, 0x31);
        columns[5] = Avx.Permute2x128(u1, u5, 0x31);
        columns[6] = Avx.Permute2x128(u2, u6, 0x31);
        columns[7] = Avx.Permute2x128(u3, u7, 0x31);
    }

    /// <summary>Eight float32 values as float64 (exact).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<double> Widen(Vector256<float> x) => Avx512F.ConvertToVector512Double(x);

    /// <summary>The block norms summed in block order.</summary>
    public static (double Before, double After) SumNorms(ReadOnlySpan<(double Before, double After)> blocks)
    {
        double before = 0, after = 0;
        foreach (var (b, a) in blocks)
        {
            before += b;
            after += a;
        }

        return (before, after);
    }

    /// <summary>The L1 factor of a materialized τ and its masked copy (<paramref name="masked"/>, float32, as many
    /// entries as τ): both norms summed in float64 block by block (<see cref="NormBlock"/>), the blocks in
    /// parallel and their sums in block order, as the fused kernel sums them.</summary>
    public static float L1Factor(CpuFloats tau, float* masked)
    {
        long n = tau.Length;
        var norms = new (double Before, double After)[CpuParallel.BlockCount(n, NormBlock)];
        CpuParallel.For(norms.Length, b =>
        {
            long start = b * NormBlock;
            int count = (int)Math.Min(NormBlock, n - start);
            var scratch = (float*)ThreadScratch.Get(NormBlock * 4L);
            norms[b] = BlockNorms(tau.Block(start, count, scratch), masked + start, count);
        });
        var (before, after) = SumNorms(norms);
        return L1Factor(before, after);
    }

    /// <summary>
    /// The float32 factor of the L1 rescale, ‖τ‖₁ / ‖masked‖₁ from the two norms: 1 when either is below
    /// 1e-7 (mergekit then leaves the masked tensor unscaled); a NaN (from a NaN or infinite τ) always as
    /// the same bits, since the JIT may swap the operands of the sums behind it between compilations,
    /// which changes the NaN that comes out.
    /// </summary>
    public static float L1Factor(double before, double after)
    {
        if (before < 1e-7 || after < 1e-7)
        {
            return 1f;
        }

        double factor = before / after;
        return double.IsNaN(factor) ? float.NaN : (float)factor;
    }

    /// <summary>x / factor (<paramref name="divide"/>) or x · factor, in place, in float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Rescale(float* values, int count, float factor, bool divide)
    {
        int i = 0;
        var f = new Vector<float>(factor);
        for (; i <= count - Vector<float>.Count; i += Vector<float>.Count)
        {
            var v = Vector.Load(values + i);
            Vector.Store(divide ? v / f : v * f, values + i);
        }

        for (; i < count; i++)
        {
            values[i] = divide ? values[i] / factor : values[i] * factor;
        }
    }

    /// <summary>SplitMix64's output function of <paramref name="x"/> (also the selector's sample positions).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static ulong SplitMix(ulong x)
    {
        x += Gamma;
        x = (x ^ (x >> 30)) * Mix1;
        x = (x ^ (x >> 27)) * Mix2;
        return x ^ (x >> 31);
    }
}
