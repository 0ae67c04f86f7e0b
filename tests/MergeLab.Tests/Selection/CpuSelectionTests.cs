using MergeLab.Selection;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.Selection;

/// <summary>
/// The CPU selection kernels against the libtorch formulations they replace (<c>kthvalue</c>, the
/// cumsum top-k mask, the stable-sort rank window), on inputs built to break them: heavy ties, zeros of
/// both signs, tiny and huge magnitudes, bfloat16, sizes on both sides of the small/bracket threshold,
/// the exact histogram fallback, and one and two threads.
/// </summary>
public class CpuSelectionTests
{
    /// <summary>Random values with every awkward feature: ±0, ties, subnormal-adjacent tiny values.</summary>
    private static Tensor Awkward(long n, long seed)
    {
        using var scope = NewDisposeScope();
        using var g = new Generator((ulong)seed);
        var x = randn([n], generator: g);
        var u = rand([n], generator: g);
        x = where(u < 0.1, zeros_like(x), x);                                // +0
        x = where((u >= 0.1) & (u < 0.15), -zeros_like(x), x);             // −0
        x = where((u >= 0.15) & (u < 0.35), x.round(), x);                 // heavy ties at small integers
        x = where((u >= 0.35) & (u < 0.37), x * 1e-38, x);                 // tiny and subnormal
        return x.MoveToOuterDisposeScope();
    }

    private static IEnumerable<long> Sizes() => [1, 7, 1000, 300_001];

    [Test]
    public void Kth_smallest_equals_kthvalue_for_signed_and_magnitude_values([ValueSource(nameof(Sizes))] long n)
    {
        using var x = Awkward(n, 100 + n);
        using var magnitudes = x.abs();
        foreach (var values in new[] { x, magnitudes })
        {
            foreach (long k in new[] { 1, Math.Max(1, n / 3), Math.Max(1, n / 2), Math.Max(1, n - n / 5), n })
            {
                float expected = values.kthvalue(k, 0, false).values.item<float>();
                Assert.That(MagnitudeThreshold.KthSmallest(values, k), Is.EqualTo(expected), $"n = {n}, k = {k}");
            }
        }
    }

    [Test]
    public void Kth_smallest_reads_bfloat16_and_float16_exactly()
    {
        using var x = Awkward(200_003, 5);
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float16 })
        {
            using var narrow = x.abs().to(dtype);
            using var wide = narrow.to(ScalarType.Float32);
            foreach (long k in new long[] { 1, 50_000, 160_000, 200_003 })
            {
                float expected = wide.kthvalue(k, 0, false).values.item<float>();
                Assert.That(MagnitudeThreshold.KthSmallest(narrow, k), Is.EqualTo(expected), $"{dtype}, k = {k}");
            }
        }
    }

    [Test]
    public void Top_k_mask_equals_the_libtorch_mask([ValueSource(nameof(Sizes))] long n)
    {
        using var x = Awkward(n, 200 + n);
        using var m = x.abs().view(n == 300_001 ? [300_001] : [n]);
        foreach (long keep in new[] { 1, Math.Max(1, n / 5), Math.Max(1, n / 2), n - 1 })
        {
            if (keep < 1 || keep >= n)
            {
                continue;
            }

            using var fast = MagnitudeThreshold.TopKMask(m, keep);
            using var reference = T.Libtorch(() => MagnitudeThreshold.TopKMask(m, keep));
            Assert.That(fast.sum().item<long>(), Is.EqualTo(keep), $"n = {n}, keep = {keep}");
            T.BitEqual(fast, reference);
        }
    }

    [Test]
    public void Top_k_mask_keeps_the_lowest_positions_among_ties_in_many_dimensions()
    {
        using var g = new Generator(7);
        using var m = randint(0, 5, [40, 50, 70], generator: g).to(ScalarType.Float32); // 140k entries, five values
        foreach (long keep in new long[] { 1, 27_999, 70_000, 139_999 })
        {
            using var fast = MagnitudeThreshold.TopKMask(m, keep);
            using var reference = T.Libtorch(() => MagnitudeThreshold.TopKMask(m, keep));
            T.BitEqual(fast, reference);
        }
    }

    [Test]
    public void Rank_window_equals_the_stable_sort_ranks()
    {
        using var x = Awkward(96 * 1000, 9);
        foreach (var shape in new long[][] { [96, 1000], [1000, 96], [96_000], [4, 24, 1000] })
        {
            using var m = x.abs().reshape(shape);
            long d = shape[^1];
            foreach (var (low, high) in new[] { (0L, d), (0L, d / 2), (d / 3, d - d / 10), (d - 1, d), (5L, 5L), (-3L, d + 7) })
            {
                using var fast = MagnitudeThreshold.RankWindowMask(m, low, high);
                using var reference = T.Libtorch(() => MagnitudeThreshold.RankWindowMask(m, low, high));
                T.BitEqual(fast, reference);
            }
        }
    }

    [Test]
    public void Rank_window_of_a_row_longer_than_the_row_kernel_uses_the_whole_buffer_selector()
    {
        using var x = Awkward((1 << 20) + 17, 10).abs().view(1, -1);
        long d = x.shape[1];
        using var fast = MagnitudeThreshold.RankWindowMask(x, d / 4, d - d / 8);
        using var reference = T.Libtorch(() => MagnitudeThreshold.RankWindowMask(x, d / 4, d - d / 8));
        T.BitEqual(fast, reference);
    }

    /// <summary>500,017 entries: the last 16,384-key block holds 8,497 keys, which leave a scalar tail to the
    /// classifying loops (17 keys in the 32-wide scan, 1 in the <c>Vector&lt;T&gt;</c> loop).</summary>
    [TestCase(500_000)]
    [TestCase(500_017)]
    public void Bracket_and_histogram_paths_select_the_same_entries_in_both_tie_orders(int n)
    {
        using var x = Awkward(n, 11);
        long misses = ExactSelector.BracketMisses;
        unsafe
        {
            var floats = CpuTensors.Floats(x, out var copy);
            using (copy)
            {
                var source = new MagnitudeKeys(floats);
                foreach (bool descending in new[] { false, true })
                {
                    foreach (long position in new long[] { 0, 1, 123_456, 250_000, 400_000, n - 1 })
                    {
                        var bracket = new SelectionQuery(source, position, descending);
                        ExactSelector.Solve([bracket]);
                        var histogram = new SelectionQuery(source, position, descending);
                        using (T.ForceHistogram(true))
                        {
                            ExactSelector.Solve([histogram]);
                        }

                        Assert.That(histogram.Composite, Is.EqualTo(bracket.Composite), $"position {position}, descending {descending}");
                    }
                }
            }
        }

        // The sample's brackets held every rank, so the bracket pass answered each query itself.
        Assert.That(ExactSelector.BracketMisses, Is.EqualTo(misses));
    }

    [Test]
    public void Radix_select_of_several_ranks_equals_the_sorted_keys()
    {
        var random = new Random(5);
        foreach (var (low, high, count) in new (uint, uint, int)[] { (0, uint.MaxValue, 70_001), (0x3C00_0000, 0x3C00_FFFF, 5_003), (1000, 1000 + 40_000, 65_536), (0, 0x00FF_FFFF, 300_000), (0, uint.MaxValue, 33), (7, 7, 33) })
        {
            // Keys in [low, high], both ends present, heavy ties on a few values, and runs that fill vectors; the
            // counts take digits of 8 (33 keys over 32 bits: three further digits), 10, 14 and 16 bits.
            var keys = new uint[count];
            for (int i = 0; i < count; i++)
            {
                keys[i] = (i % 5) switch
                {
                    0 => low + (uint)random.NextInt64((long)(high - low) + 1),
                    1 => low + (uint)((high - low) / 3),
                    _ => low + (uint)random.NextInt64(Math.Min((long)(high - low) + 1, 64)),
                };
            }

            keys[count / 2] = low;
            keys[count - 1] = high;
            var sorted = keys.Order().ToArray();
            long[] ranks = [0, 1, count / 3, count / 3, count / 2, count - 2, count - 1];
            var results = new (uint Key, long Below)[ranks.Length];
            unsafe
            {
                fixed (uint* k = keys)
                {
                    ExactSelector.SelectKeys(k, count, ranks, results, low, high);
                }
            }

            for (int r = 0; r < ranks.Length; r++)
            {
                uint expected = sorted[ranks[r]];
                Assert.That(results[r], Is.EqualTo((expected, (long)Array.IndexOf(sorted, expected))), $"keys in [{low}, {high}], rank {ranks[r]}");
            }
        }
    }

    [TestCase(ScalarType.Float32)]
    [TestCase(ScalarType.BFloat16)]
    public void Task_vector_brackets_select_the_same_entries_with_and_without_vector_packing(ScalarType dtype)
    {
        // Two experts over one base take the fused |θ_k − θ_base| scan: on 512-bit vectors with AVX-512
        // compress, on Vector<T> with 256-bit compress, or with a bit loop, by what the CPU has; every way
        // must agree with the exact histogram path.
        using var bse = Awkward(300_001, 21).to(dtype);
        using var e1 = (bse + Awkward(300_001, 22) * 0.01).to(dtype);
        using var e2 = (bse + (Awkward(300_001, 23) * 0.01).to(ScalarType.BFloat16).to(ScalarType.Float32)).to(dtype);
        unsafe
        {
            var b = CpuTensors.Floats(bse, out var c0);
            var x1 = CpuTensors.Floats(e1, out var c1);
            var x2 = CpuTensors.Floats(e2, out var c2);
            using (c0)
            using (c1)
            using (c2)
            {
                foreach (long position in new long[] { 0, 150_000, 240_000, 300_000 })
                {
                    ulong[] Select(bool wide, bool compress, bool histogram) => SolveWith(
                        [new SelectionQuery(new DifferenceMagnitudeKeys(x1, b), position, true), new SelectionQuery(new DifferenceMagnitudeKeys(x2, b), position, true)],
                        wide, compress, histogram);

                    var exact = Select(wide: false, compress: true, histogram: true);
                    if (System.Runtime.Intrinsics.X86.Avx512F.IsSupported)
                    {
                        Assert.That(Select(wide: true, compress: true, histogram: false), Is.EqualTo(exact), $"512-bit, position {position}");
                    }

                    Assert.That(Select(wide: false, compress: true, histogram: false), Is.EqualTo(exact), $"Vector<T> packed, position {position}");
                    Assert.That(Select(wide: false, compress: false, histogram: false), Is.EqualTo(exact), $"bit loop, position {position}");
                }
            }
        }
    }

    [TestCase(ScalarType.Float32)]
    [TestCase(ScalarType.BFloat16)]
    public void Key_block_brackets_select_the_same_entries_at_every_scan_width(ScalarType dtype)
    {
        // Two positions on one source (Breadcrumbs' window, PCB's clamp bounds) fill a key block and scan
        // it once per query: on 512-bit vectors with AVX-512 compress where the CPU has it, else on
        // Vector<T>; both must agree with the exact histogram path.
        using var bse = Awkward(300_001, 31).to(dtype);
        using var e1 = (bse + (Awkward(300_001, 32) * 0.01).to(ScalarType.BFloat16).to(ScalarType.Float32)).to(dtype);
        unsafe
        {
            var b = CpuTensors.Floats(bse, out var c0);
            var x1 = CpuTensors.Floats(e1, out var c1);
            using (c0)
            using (c1)
            {
                var source = new DifferenceMagnitudeKeys(x1, b);
                foreach (var (low, high) in new (long, long)[] { (0, 300_000), (150_000, 240_000), (210_000, 270_000) })
                {
                    ulong[] Select(bool wide, bool histogram) =>
                        SolveWith([new SelectionQuery(source, low, true), new SelectionQuery(source, high, true)], wide, compress: true, histogram);

                    var exact = Select(wide: false, histogram: true);
                    if (System.Runtime.Intrinsics.X86.Avx512F.IsSupported)
                    {
                        Assert.That(Select(wide: true, histogram: false), Is.EqualTo(exact), $"512-bit, positions {low}, {high}");
                    }

                    Assert.That(Select(wide: false, histogram: false), Is.EqualTo(exact), $"Vector<T>, positions {low}, {high}");
                }
            }
        }
    }

    /// <summary>Solves <paramref name="queries"/> with the selector's scan width, packing and histogram-only
    /// switches set as given (then restored), and returns their composites.</summary>
    private static ulong[] SolveWith(SelectionQuery[] queries, bool wide, bool compress, bool histogram)
    {
        using (T.WideScan(wide))
        using (T.Setting(() => ExactSelector.PackWithCompress, v => ExactSelector.PackWithCompress = v, compress))
        using (T.ForceHistogram(histogram))
        {
            ExactSelector.Solve(queries);
        }

        return queries.Select(q => q.Composite).ToArray();
    }

    /// <summary>Rows built to hit every path of the row selector: widths 1, 2 and odd ones, all-equal
    /// rows, ±0, few distinct keys (bfloat16-like, ties across both boundaries), more than eight octaves
    /// (targets in the catch-all bucket 0), and signed keys near the top of the key range.</summary>
    private static IEnumerable<(string Name, uint[] Keys)> SelectorRows()
    {
        var random = new Random(7);
        foreach (int width in new[] { 1, 2, 3, 5, 17, 33, 129, 1000, 4097 })
        {
            var gaussian = new uint[width];
            var bf16 = new uint[width];
            var few = new uint[width];
            var wide = new uint[width];
            var zeros = new uint[width];
            var signed = new uint[width];
            for (int i = 0; i < width; i++)
            {
                double u1 = 1 - random.NextDouble(), u2 = random.NextDouble();
                float z = (float)(Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
                gaussian[i] = FloatKeys.Magnitude(z);
                bf16[i] = FloatKeys.Magnitude(z) & 0xFFFF_0000;
                few[i] = FloatKeys.Magnitude(random.Next(4) * 0.25f);
                wide[i] = FloatKeys.Magnitude(z * MathF.Pow(2, random.Next(-60, 5)));
                zeros[i] = FloatKeys.Magnitude(random.Next(2) == 0 ? 0f : -0f);
                signed[i] = random.Next(3) == 0 ? uint.MaxValue - (uint)random.Next(3) : (uint)random.Next(2) + 0xFFFF_0000u;
            }

            yield return ($"gaussian {width}", gaussian);
            yield return ($"bf16 {width}", bf16);
            yield return ($"few {width}", few);
            yield return ($"wide {width}", wide);
            yield return ($"zeros {width}", zeros);
            yield return ($"equal {width}", Enumerable.Repeat(FloatKeys.Magnitude(0.5f), width).ToArray());
            yield return ($"signed {width}", signed);
        }
    }

    [Test]
    public unsafe void Row_selector_equals_a_stable_sort_for_every_position_pair()
    {
        foreach (var (name, keys) in SelectorRows())
        {
            int width = keys.Length;
            var sorted = keys.Select((k, i) => ((ulong)k << 32) | (uint)i).Order().ToArray();
            var scratch = new byte[RowSelector.ScratchBytes(width) + 64];
            var positions = width <= 40
                ? Enumerable.Range(0, width).ToArray()
                : new[] { 0, 1, width / 10, width / 3, width / 2, width - width / 10 - 1, width - 2, width - 1 };
            fixed (uint* k = keys)
            fixed (byte* s = scratch)
            {
                var aligned = (byte*)(((nint)s + 63) & ~(nint)63);
                foreach (int a in positions)
                {
                    foreach (int b in positions.Where(p => p >= a))
                    {
                        int[] wanted = a == b ? [a] : [a, b];
                        var results = new ulong[wanted.Length];
                        RowSelector.Select(k, width, wanted, results, aligned);
                        for (int p = 0; p < wanted.Length; p++)
                        {
                            Assert.That(results[p], Is.EqualTo(sorted[wanted[p]]), $"{name}: position {wanted[p]} of ({a}, {b})");
                        }
                    }
                }
            }
        }
    }

    /// <summary>A standard normal draw (Box–Muller) from <paramref name="random"/>.</summary>
    private static float StandardNormal(Random random) =>
        (float)(Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble()));

    /// <summary>The float32 value of bfloat16 bits.</summary>
    private static float Widened(ushort bf16) => BitConverter.UInt32BitsToSingle((uint)bf16 << 16);

    /// <summary>Series of rows sharing one <see cref="RowHint"/>, as the rows of a task vector do: alike
    /// (Gaussian magnitudes), bfloat16 task vectors (a few heavily repeated keys, the pivot path), a scale
    /// that jumps every few rows (misses and widening), a scale of its own for every row (as in real task
    /// vectors: the sampled brackets), few distinct keys, keys at both ends of the key range (bracket
    /// arithmetic near 0 and 2³²), and a series that changes kind halfway.</summary>
    private static IEnumerable<(string Name, uint[][] Rows)> HintedSeries()
    {
        var random = new Random(11);
        float Normal() => StandardNormal(random);
        static float Bf16(float x) => Widened(Kernels.ToBFloat16(x));

        foreach (int width in new[] { 37, 1000, 4096, 11008 })
        {
            const int rows = 24;
            uint[][] Series(Func<int, int, uint> key) =>
                Enumerable.Range(0, rows).Select(r => Enumerable.Range(0, width).Select(i => key(r, i)).ToArray()).ToArray();

            yield return ($"gaussian {width}", Series((_, _) => FloatKeys.Magnitude(Normal())));
            yield return ($"bf16 deltas {width}", Series((_, _) =>
            {
                float b = Bf16(Normal());
                return FloatKeys.Magnitude(Bf16(b + (0.01f * Normal())) - b);
            }));
            var scales = Enumerable.Range(0, rows).Select(r => MathF.Pow(2, random.Next(-8, 9) * (r / 3 % 2))).ToArray();
            yield return ($"scale jumps {width}", Series((r, _) => FloatKeys.Magnitude(Normal() * scales[r])));
            var rowScales = Enumerable.Range(0, rows).Select(_ => MathF.Pow(2, 0.5f * Normal())).ToArray();
            yield return ($"row scales {width}", Series((r, _) => FloatKeys.Magnitude(Normal() * rowScales[r])));
            yield return ($"row scales, bf16 {width}", Series((r, _) =>
            {
                float b = Bf16(Normal());
                return FloatKeys.Magnitude(Bf16(b + (0.01f * rowScales[r] * Normal())) - b);
            }));
            yield return ($"few {width}", Series((_, _) => FloatKeys.Magnitude(random.Next(4) * 0.25f)));
            yield return ($"extremes {width}", Series((_, _) => random.Next(2) == 0 ? (uint)random.Next(40) : uint.MaxValue - (uint)random.Next(40)));
            yield return ($"changing {width}", Series((r, _) => r < rows / 2 ? FloatKeys.Magnitude(Normal()) : FloatKeys.Magnitude(random.Next(3) * 0.5f)));
        }
    }

    [Test]
    public unsafe void Row_selector_with_a_hint_equals_a_stable_sort_row_after_row()
    {
        bool bracketPass = System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated && System.Runtime.Intrinsics.X86.Avx512F.IsSupported;
        foreach (var (name, rows) in HintedSeries())
        {
            int width = rows[0].Length;
            var scratch = new byte[RowSelector.ScratchBytes(width) + 64];
            // Breadcrumbs' window (β 0.2, γ 0.1), the ends, one position, and two adjacent positions.
            int[][] wanted = [[(width * 7 / 10) - 1, (width * 9 / 10) - 1], [0, width - 1], [width / 2], [width / 3, (width / 3) + 1]];
            foreach (var positions in wanted)
            {
                var hint = new RowHint { Owner = name };
                fixed (byte* s = scratch)
                {
                    var aligned = (byte*)(((nint)s + 63) & ~(nint)63);
                    foreach (var keys in rows)
                    {
                        var sorted = keys.Select((k, i) => ((ulong)k << 32) | (uint)i).Order().ToArray();
                        var results = new ulong[positions.Length];
                        fixed (uint* k = keys)
                        {
                            RowSelector.Select(k, width, positions, results, aligned, ref hint);
                        }

                        for (int p = 0; p < positions.Length; p++)
                        {
                            Assert.That(results[p], Is.EqualTo(sorted[positions[p]]), $"{name}: position {positions[p]}");
                        }
                    }
                }

                Assert.That(hint.Hits + hint.Misses + hint.Sampled, Is.EqualTo(bracketPass ? rows.Length : 0), name);
                if (bracketPass && width >= 1000 && positions == wanted[0] && (name.StartsWith("gaussian", StringComparison.Ordinal) || name.StartsWith("bf16", StringComparison.Ordinal)))
                {
                    Assert.That(hint.Hits, Is.GreaterThan(rows.Length / 2), $"{name}: rows alike should mostly be answered within their brackets");
                }

                if (bracketPass && name.StartsWith("scale", StringComparison.Ordinal))
                {
                    Assert.That(hint.Misses + hint.Sampled, Is.GreaterThan(1), $"{name}: a jump in scale leaves the last answers' brackets");
                }

                if (bracketPass && width >= 4096 && positions == wanted[0] && name.Contains("row scales", StringComparison.Ordinal))
                {
                    Assert.That(hint.Sampled, Is.GreaterThan(rows.Length / 2), $"{name}: rows of differing scales take sampled brackets");
                    if (!name.Contains("bf16", StringComparison.Ordinal))
                    {
                        // Rows that differ only in scale: once a row has set the ratios, the sample's mean predicts the answers.
                        Assert.That(hint.Scaled, Is.GreaterThan(rows.Length / 2), $"{name}: rows of differing scales take the brackets their sample's mean predicts");
                    }
                }
            }
        }
    }

    [Test]
    public unsafe void Row_selector_computing_keys_from_the_inputs_equals_a_stable_sort_of_them()
    {
        // Breadcrumbs' rows: |expert − base| computed by the bracket pass itself (bfloat16 and float32
        // experts). A scale jump every seventh row makes rows miss, so the histogram path must find every
        // key written by that pass; the first row of each series fills the keys without a pass.
        var random = new Random(5);
        float Normal() => StandardNormal(random);
        foreach (int width in new[] { 37, 1003, 4096 })
        {
            foreach (bool bf16 in new[] { true, false })
            {
                var hint = new RowHint { Owner = (width, bf16) };
                var scratch = new byte[RowSelector.ScratchBytes(width) + 64];
                var keys = new uint[width];
                int[] positions = [(width * 7 / 10) - 1, (width * 9 / 10) - 1];
                for (int row = 0; row < 40; row++)
                {
                    float scale = row % 7 == 6 ? 50f : 0.01f;
                    var baseRow = Enumerable.Range(0, width).Select(_ => Normal()).ToArray();
                    var expert = baseRow.Select(b => b + (scale * Normal())).ToArray();
                    var wide = bf16 ? expert.Select(e => BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(e) & 0xFFFF_0000)).ToArray() : expert;
                    var narrow = wide.Select(e => (ushort)(BitConverter.SingleToUInt32Bits(e) >> 16)).ToArray();
                    var expected = wide.Select((e, i) => FloatKeys.Magnitude(e - baseRow[i])).ToArray();
                    var sorted = expected.Select((k, i) => ((ulong)k << 32) | (uint)i).Order().ToArray();
                    var results = new ulong[2];
                    Array.Clear(keys);
                    fixed (float* b = baseRow)
                    fixed (float* e = wide)
                    fixed (ushort* h = narrow)
                    fixed (uint* k = keys)
                    fixed (byte* s = scratch)
                    {
                        var aligned = (byte*)(((nint)s + 63) & ~(nint)63);
                        if (bf16)
                        {
                            RowSelector.Select(new DifferenceRowKeys<BFloat16Row>(new CpuFloats(h, width, true), b), k, width, positions, results, aligned, ref hint);
                        }
                        else
                        {
                            RowSelector.Select(new DifferenceRowKeys<Float32Row>(new CpuFloats(e, width, false), b), k, width, positions, results, aligned, ref hint);
                        }
                    }

                    Assert.That(keys, Is.EqualTo(expected), $"width {width}, bf16 {bf16}, row {row}: the keys written");
                    Assert.That(results, Is.EqualTo(new[] { sorted[positions[0]], sorted[positions[1]] }), $"width {width}, bf16 {bf16}, row {row}");
                }

                if (System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated && System.Runtime.Intrinsics.X86.Avx512F.IsSupported && width >= 1000)
                {
                    Assert.That(hint.Hits + hint.Sampled, Is.GreaterThan(10), "alike rows take a bracket pass");
                    Assert.That(hint.Misses + hint.Sampled, Is.GreaterThan(4), "scale jumps leave the last answers' brackets");
                    Assert.That(hint.Misses, Is.GreaterThan(0), "the first row takes the histogram path");
                    if (width >= 4096)
                    {
                        Assert.That(hint.Sampled, Is.GreaterThan(0), "a row after a jump takes sampled brackets, its keys from the inputs");
                    }
                }
            }
        }
    }

    [Test]
    public unsafe void Row_selector_reading_bfloat16_keys_in_halves_equals_a_stable_sort_of_them()
    {
        // bfloat16 experts against a base row split by parity: the bracket pass reads each key as its top and
        // bottom 16 bits (see RowSelector.Halves.cs). The series: deltas of one scale (the pick at the last
        // answer's top half), a share of experts collapsed to near 0 (their keys |base| carry low bits, so the
        // wanted top half holds several bottom halves), zero deltas (one key), a scale jump every seventh row
        // (misses: the keys are then filled for the histogram path, or sampled), and a scale per row. Widths:
        // below the halves pass's floor, with a tail of 31 keys, the benchmark's, and its widest.
        var random = new Random(17);
        float Normal() => StandardNormal(random);
        static ushort Bf16(float x) => Kernels.ToBFloat16(x);

        static float Wide(ushort h) => Widened(h);
        bool halves = false;
        bool mixedAnswers = false;
        foreach (int width in new[] { 63, 1023, 4096, 11008, 65536 })
        {
            foreach (string kind in new[] { "deltas", "collapsed", "zero", "jumps", "row scales" })
            {
                int[][] wanted = [[(width * 7 / 10) - 1, (width * 9 / 10) - 1], [0, width - 1], [width / 3]];
                foreach (var positions in wanted)
                {
                    var hint = new RowHint { Owner = (width, kind, positions.Length) };
                    var scratch = new byte[RowSelector.ScratchBytes(width) + 64];
                    var keys = new uint[width];
                    var split = new float[width];
                    int rows = width > 20000 ? 4 : 16;
                    for (int row = 0; row < rows; row++)
                    {
                        float scale = kind switch
                        {
                            "zero" => 0f,
                            "jumps" when row % 7 == 6 => 50f,
                            "row scales" => 0.01f * MathF.Pow(2, 0.5f * Normal()),
                            _ => 0.01f,
                        };
                        var baseRow = Enumerable.Range(0, width).Select(_ => Wide(Bf16(Normal()))).ToArray();
                        var expert = baseRow.Select(b => Bf16(kind == "collapsed" && random.Next(3) == 0 ? 0.001f * Normal() : b + (scale * Normal()))).ToArray();
                        var expected = expert.Select((e, i) => FloatKeys.Magnitude(Wide(e) - baseRow[i])).ToArray();
                        var sorted = expected.Select((k, i) => ((ulong)k << 32) | (uint)i).Order().ToArray();
                        var results = new ulong[positions.Length];
                        fixed (float* b = baseRow)
                        fixed (float* sp = split)
                        fixed (ushort* h = expert)
                        fixed (uint* k = keys)
                        fixed (byte* sc = scratch)
                        {
                            RowSelector.SplitByParity(b, sp, width);
                            var aligned = (byte*)(((nint)sc + 63) & ~(nint)63);
                            RowSelector.Select(new DifferenceRowKeys<BFloat16Row>(new CpuFloats(h, width, true), b, sp), k, width, positions, results, aligned, ref hint);
                        }

                        for (int p = 0; p < positions.Length; p++)
                        {
                            Assert.That(results[p], Is.EqualTo(sorted[positions[p]]), $"width {width}, {kind}, row {row}, position {positions[p]}");
                            mixedAnswers |= hint.Halves > 0 && (sorted[positions[p]] & 0xFFFF_0000_0000) != 0;
                        }
                    }

                    halves |= hint.Halves > 0;
                    Assert.That(hint.Halves, RowSelector.ReadsHalves(width) ? Is.GreaterThan(rows / 2) : Is.Zero, $"width {width}, {kind}: passes over halves");
                    if (RowSelector.ReadsHalves(width) && width is >= 4096 and < 20000 && kind == "row scales" && positions == wanted[0])
                    {
                        // The sampled brackets (their ends at sub-bucket edges over halves) must hold these rows.
                        Assert.That(hint.Sampled, Is.GreaterThan(rows / 2), $"width {width}: rows of differing scales answered within sampled brackets");
                    }
                }
            }
        }

        if (halves)
        {
            Assert.That(mixedAnswers, Is.True, "some answers have low bits, so their top half held several keys");
        }
        else
        {
            Assert.Ignore("This CPU has no AVX-512 VBMI2: every pass read whole keys (the results still checked).");
        }
    }

    [Test]
    public void Sorted_and_constant_inputs_still_select_exactly()
    {
        // A sorted input makes the strata of the sample correlated with position; a constant one makes
        // every entry a tie. Both must still give kthvalue's answer.
        using var sorted = linspace(-5, 5, 400_000);
        using var constant = full(300_000, 0.25f);
        foreach (var values in new[] { sorted, constant })
        {
            long n = values.numel();
            foreach (long k in new[] { 1, n / 7, n / 2, n })
            {
                Assert.That(MagnitudeThreshold.KthSmallest(values, k), Is.EqualTo(values.kthvalue(k, 0, false).values.item<float>()));
            }
        }

        using var mask = MagnitudeThreshold.TopKMask(constant, 1000);
        Assert.That(mask[..1000].all().item<bool>() && !mask[1000..].any().item<bool>(), Is.True, "ties go to the lowest positions");
    }

    [Test]
    public void Results_do_not_depend_on_the_thread_count()
    {
        using var drawn = Awkward(700_000, 12);
        using var x = drawn.abs();
        using var grid = x.view(700, 1000);
        using var oneThread = T.Threads(1);
        using var one = MagnitudeThreshold.TopKMask(x, 140_000);
        using var oneWindow = MagnitudeThreshold.RankWindowMask(grid, 600, 900);
        float oneKth = MagnitudeThreshold.KthSmallest(x, 560_000);

        using var twoThreads = T.Threads(2); // disposed first, back to one thread, then to the count before
        using var two = MagnitudeThreshold.TopKMask(x, 140_000);
        using var twoWindow = MagnitudeThreshold.RankWindowMask(grid, 600, 900);
        T.BitEqual(two, one);
        T.BitEqual(twoWindow, oneWindow);
        Assert.That(MagnitudeThreshold.KthSmallest(x, 560_000), Is.EqualTo(oneKth));
    }

    [Test]
    public void Counting_tasks_split_where_one_task_would_count_two_to_the_32_entries()
    {
        using (T.Threads(1))
        {
            Assert.That(CpuParallel.CountingTasks(262_143, ExactSelector.BlockSize), Is.EqualTo(1), "262,143 blocks of 16,384: 2^32 - 16,384 entries");
            Assert.That(CpuParallel.CountingTasks(262_144, ExactSelector.BlockSize), Is.EqualTo(2), "2^32 entries would wrap a counter");
            Assert.That(CpuParallel.CountingTasks(1_048_576, 1), Is.EqualTo(1));
        }

        using (T.Threads(2))
        {
            Assert.That(CpuParallel.CountingTasks(600_000, ExactSelector.BlockSize), Is.EqualTo(3));
            Assert.That(CpuParallel.CountingTasks(10, ExactSelector.BlockSize), Is.EqualTo(2));
        }
    }

    [Test]
    public void NaN_ranks_above_every_number_on_both_paths()
    {
        // A NaN at the boundary and NaNs above a finite boundary with ties: the libtorch mask compared with
        // > and ==, which NaN fails, so it kept none ([NaN, 1, 2], 1) or a tie instead of the NaN.
        float nan = float.NaN;
        foreach (var (values, keep, expected) in new (float[], long, bool[])[]
        {
            ([nan, 1, 2], 1, [true, false, false]),
            ([nan, 1, 1, 1], 2, [true, true, false, false]),
            ([3, nan, 1, nan, 3], 3, [true, true, false, true, false]),
        })
        {
            using var m = tensor(values);
            using var fast = MagnitudeThreshold.TopKMask(m, keep);
            using var reference = T.Libtorch(() => MagnitudeThreshold.TopKMask(m, keep));
            Assert.That(fast.data<bool>().ToArray(), Is.EqualTo(expected), $"CPU, keep {keep} of [{string.Join(", ", values)}]");
            Assert.That(reference.data<bool>().ToArray(), Is.EqualTo(expected), $"libtorch, keep {keep} of [{string.Join(", ", values)}]");
        }
    }

    [Test]
    public void Float64_values_are_compared_as_float32_on_both_paths()
    {
        // 1 + 1e-12 rounds to 1 in float32, so the two tie and the lower position wins; libtorch compared the
        // float64 values with the float32 boundary and kept neither.
        using var m = tensor(new[] { 1.0, 1 + 1e-12, 0.1, 0.1 });
        foreach (var (keep, expected) in new (long, bool[])[] { (1, [true, false, false, false]), (3, [true, true, true, false]) })
        {
            using var fast = MagnitudeThreshold.TopKMask(m, keep);
            using var reference = T.Libtorch(() => MagnitudeThreshold.TopKMask(m, keep));
            Assert.That(fast.data<bool>().ToArray(), Is.EqualTo(expected), $"CPU, keep {keep}");
            Assert.That(reference.data<bool>().ToArray(), Is.EqualTo(expected), $"libtorch, keep {keep}");
        }

        using var rows = tensor(new[] { 1 + 1e-12, 1.0, 0.5 });
        using var window = MagnitudeThreshold.RankWindowMask(rows, 2, 3);
        using var windowReference = T.Libtorch(() => MagnitudeThreshold.RankWindowMask(rows, 2, 3));
        Assert.That(window.data<bool>().ToArray(), Is.EqualTo(new[] { false, true, false }), "the tie ranks by position");
        T.BitEqual(windowReference, window);
    }

    [Test]
    public void An_empty_tensor_gets_an_empty_rank_window_of_its_shape()
    {
        foreach (var shape in new long[][] { [0], [3, 0], [0, 5] })
        {
            using var m = zeros(shape);
            using var mask = MagnitudeThreshold.RankWindowMask(m, 0, 1);
            using var reference = T.Libtorch(() => MagnitudeThreshold.RankWindowMask(m, 0, 1));
            Assert.That(mask.shape, Is.EqualTo(shape));
            Assert.That(mask.dtype, Is.EqualTo(ScalarType.Bool));
            T.BitEqual(reference, mask);
        }
    }

    [TestCase(false)]
    [TestCase(true)]
    public void Radix_select_over_large_bfloat16_chunks_equals_kthvalue(bool signedValues)
    {
        using var scope = NewDisposeScope(); // the chunks and every intermediate
        var chunks = new[] { Awkward(300_000, 13).to(ScalarType.BFloat16), Awkward(70_000, 14), Awkward(5, 15) };
        T.RadixSelectMatchesKthvalue(chunks, signedValues, n => [1, n / 10, n / 2, n - 3, n]);
    }

    /// <summary>Selections observed together, block by block over their own sources (with their own ranks,
    /// so each has its own fine bins), give each one's <c>kthvalue</c> over two chunks.</summary>
    [Test]
    public unsafe void Radix_selects_observed_together_each_get_their_own_values()
    {
        using var scope = NewDisposeScope(); // the chunks and every intermediate
        var sources = Enumerable.Range(0, 3).Select(s => new[] { Awkward(200_000, 30 + s), Awkward(1_001, 40 + s) }).ToArray();
        var chunks = Enumerable.Range(0, 2).Select(c => sources.Select(s => (KeySource)new SignedKeys(new CpuFloats(CpuTensors.Pointer(s[c]), s[c].numel(), bfloat16: false))).ToArray()).ToArray();
        var selects = sources.Select(_ => new RadixSelect(signed: true)).ToArray();
        var ranks = new long[][] { [1, 70_000], [100_000, 201_001], [5, 150_000] };
        foreach (var c in chunks)
        {
            RadixSelect.ObserveCoarse(selects, c);
        }

        for (int s = 0; s < selects.Length; s++)
        {
            selects[s].EndCoarse(ranks[s]);
        }

        foreach (var c in chunks)
        {
            RadixSelect.ObserveFine(selects, c);
        }

        for (int s = 0; s < selects.Length; s++)
        {
            using var all = cat(sources[s]);
            var result = selects[s].EndFine();
            for (int r = 0; r < ranks[s].Length; r++)
            {
                Assert.That(result[r], Is.EqualTo(all.kthvalue(ranks[s][r], 0, false).values.item<float>()), $"select {s}, rank {ranks[s][r]}");
            }
        }
    }

    [Test]
    public void All_finite_equals_isfinite_all_for_every_position_of_a_bad_value()
    {
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            foreach (long n in new long[] { 1, 33, 70_001, (1 << 20) + 3 })
            {
                using var clean = Awkward(n, 16).to(dtype);
                Assert.That(FiniteValues.AllFinite(clean), Is.True, $"{dtype}, n = {n}");
                foreach (long at in new[] { 0, n / 2, n - 1 })
                {
                    foreach (float bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity })
                    {
                        using var t = clean.clone();
                        t[at] = tensor(bad).to(dtype);
                        bool expected = t.isfinite().all().item<bool>();
                        Assert.That(expected, Is.False);
                        Assert.That(FiniteValues.AllFinite(t), Is.EqualTo(expected), $"{dtype}, n = {n}, {bad} at {at}");
                    }
                }
            }
        }

        using var half = ones(10, ScalarType.Float16);
        Assert.That(FiniteValues.AllFinite(half), Is.Null, "float16 is left to libtorch");
    }

    /// <summary>The libtorch path (float16, or strides the direct check does not read) checks views of at
    /// most ChunkElements entries: contiguous slices, blocks of whole rows, or single rows larger than a
    /// chunk. A chunk of 7 entries makes every route run on small tensors; each poisoned entry must be found.</summary>
    [Test]
    public void The_libtorch_finite_check_finds_every_non_finite_entry_chunk_by_chunk()
    {
        using var chunks = T.Setting(() => FiniteValues.ChunkElements, v => FiniteValues.ChunkElements = v, 7);
        using var entries = tensor(Enumerable.Range(0, 4 * 5 * 6).Select(i => (float)i).ToArray());
        using var source = entries.reshape(4, 5, 6);
        var views = new Func<Tensor, Tensor>[]
        {
            t => t.to(ScalarType.Float16),                          // contiguous: slices of the entries
            t => t.permute(2, 0, 1),                               // [6, 4, 5]: each row of 20 alone, then its rows
            t => t.transpose(0, 1).narrow(1, 1, 2),               // [5, 2, 6]: each row of 12 alone, likewise
            t => t.view(40, 3).narrow(1, 0, 2),                    // [40, 2]: blocks of three rows
            t => t.view(-1).slice(0, 0, 120, 3),                   // one dimension, stride 3: slices
        };
        for (int index = 0; index < views.Length; index++)
        {
            using var viewScope = NewDisposeScope(); // a view's intermediate views too
            var view = views[index];
            var clean = view(source); // in viewScope
            Assert.That(FiniteValues.IsAllFinite(clean), Is.True, $"view {index}");
            // The source's values are their positions: the view's entries, in its own order, say where each lies.
            var positions = T.Values(clean);
            for (int at = 0; at < positions.Length; at++)
            {
                using var scope = NewDisposeScope();
                var poisoned = source.clone();
                poisoned.view(-1)[(long)positions[at]] = tensor(float.PositiveInfinity);
                Assert.That(FiniteValues.IsAllFinite(view(poisoned)), Is.False, $"view {index}, entry {at} of {positions.Length}");
            }
        }
    }

    [Test]
    public void Pooled_tensors_return_their_memory_when_freed()
    {
        SettlePool();
        var shape = new long[] { 1000, 1000 };
        var t = NativeBufferPool.Empty(shape, ScalarType.Float32);
        t.fill_(3);
        Assert.That(t.sum().item<float>(), Is.EqualTo(3e6f));
        using (var view = t.view(-1))
        {
            t.Dispose();
            Assert.That(NativeBufferPool.IdleBytes, Is.EqualTo(0), "a view still holds the memory");
        }

        Assert.That(NativeBufferPool.IdleBytes, Is.GreaterThanOrEqualTo(4_000_000));
        using var again = NativeBufferPool.Empty(shape, ScalarType.Float32);
        Assert.That(NativeBufferPool.IdleBytes, Is.EqualTo(0), "the buffer is reused");
    }

    [Test]
    public unsafe void Kernel_results_are_placed_at_the_remainder_of_the_file_offset_they_are_bound_for()
    {
        static long Remainder(Tensor t) => (long)CpuTensors.Pointer(t) % NativeBufferPool.Alignment;
        var shape = new long[] { 300, 7 };
        static void Fill(nint address, bool bf16) => new Span<float>((void*)address, 2100).Fill(2);
        using (var unplaced = CpuTensors.WriteKernelResult(shape, ScalarType.Float32, Fill))
        {
            Assert.That(Remainder(unplaced), Is.Zero, "pooled memory starts on a page");
        }

        using (CpuTensors.PlaceResults(5 * 4096 + 1234))
        {
            using var placed = CpuTensors.WriteKernelResult(shape, ScalarType.Float32, Fill);
            using (CpuTensors.PlaceResults(70))
            {
                using var inner = CpuTensors.WriteKernelResult(shape, ScalarType.Float32, Fill);
                Assert.That(Remainder(inner), Is.EqualTo(70));
            }

            using var again = CpuTensors.WriteKernelResult(shape, ScalarType.Float32, Fill);
            using var half = CpuTensors.WriteKernelResult(shape, ScalarType.Float16, Fill); // converted from float32
            using var sum = placed.sum();
            using var halfSum = half.to(ScalarType.Float32).sum();
            Assert.Multiple(() =>
            {
                Assert.That(Remainder(placed), Is.EqualTo(1234));
                Assert.That(Remainder(again), Is.EqualTo(1234), "the inner scope restores the outer placement");
                Assert.That(Remainder(half), Is.EqualTo(1234), "a converted result is placed too");
                Assert.That(half.dtype, Is.EqualTo(ScalarType.Float16));
                Assert.That(sum.item<float>(), Is.EqualTo(4200));
                Assert.That(halfSum.item<float>(), Is.EqualTo(4200));
            });
        }

        using var after = CpuTensors.WriteKernelResult(shape, ScalarType.Float32, Fill);
        Assert.That(Remainder(after), Is.Zero);
        Assert.Throws<ArgumentOutOfRangeException>(() => NativeBufferPool.Empty(shape, ScalarType.Float32, NativeBufferPool.Alignment));
    }

    /// <summary>Empties the pool, first letting pooled tensors that earlier tests left to the finalizer hand
    /// their buffers back (they would otherwise do it mid-test).</summary>
    private static void SettlePool()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        NativeBufferPool.Trim();
    }

    [Test]
    public unsafe void A_placed_tensor_gives_its_whole_buffer_back_when_freed()
    {
        SettlePool();
        var placed = NativeBufferPool.Empty([1 << 20], ScalarType.Float32, phase: 4000);
        long start = (long)CpuTensors.Pointer(placed) - 4000;
        placed.Dispose();
        Assert.That(NativeBufferPool.IdleBytes, Is.GreaterThanOrEqualTo((4L << 20) + 4000), "the buffer, not the placed tensor's bytes");
        nint again = NativeBufferPool.Rent(4L << 20);
        try
        {
            Assert.That((long)again, Is.EqualTo(start), "its buffer serves the next request from its start");
        }
        finally
        {
            NativeBufferPool.Return(again);
            NativeBufferPool.Trim();
        }
    }

    [Test]
    public void The_pool_serves_a_request_from_its_own_size_else_the_smallest_larger_idle_buffer_within_its_slack()
    {
        SettlePool();
        const long Mib = 1 << 20;
        nint small = NativeBufferPool.Rent(2 * Mib), medium = NativeBufferPool.Rent(4 * Mib), large = NativeBufferPool.Rent(8 * Mib);
        nint exact = 0, larger = 0, tiny = 0, fresh = 0;
        try
        {
            foreach (var p in new[] { large, medium, small })
            {
                NativeBufferPool.Return(p);
            }

            exact = NativeBufferPool.Rent(2 * Mib);
            larger = NativeBufferPool.Rent(3 * Mib);
            Assert.Multiple(() =>
            {
                Assert.That(exact, Is.EqualTo(small), "an idle buffer of the same size comes first");
                Assert.That(larger, Is.EqualTo(medium), "else the smallest idle buffer that is large enough");
                Assert.That(NativeBufferPool.IdleBytes, Is.EqualTo(8 * Mib));
            });

            tiny = NativeBufferPool.Rent(Mib / 2);
            Assert.That(tiny, Is.Not.EqualTo(large), "16 times the request is beyond the slack");
            NativeBufferPool.Return(larger);
            larger = 0;
            Assert.That(NativeBufferPool.IdleBytes, Is.EqualTo(12 * Mib), "a buffer comes back at its own size, not the request's");
            fresh = NativeBufferPool.Rent(16 * Mib);
            Assert.That(fresh, Is.Not.EqualTo(large).And.Not.EqualTo(medium), "no idle buffer is large enough");
        }
        finally
        {
            foreach (var p in new[] { exact, larger, tiny, fresh }.Where(p => p != 0))
            {
                NativeBufferPool.Return(p);
            }

            NativeBufferPool.Trim();
        }
    }
}
