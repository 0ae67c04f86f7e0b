using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MergeLab.Selection;

/// <summary>
/// One order statistic to find: the entry at 0-based <see cref="Position"/> when the entries of
/// <see cref="Source"/> are sorted by (key, index), index ascending (a stable ascending sort) or
/// descending (so that, among equal keys, the lowest positions rank highest — "keep the largest k,
/// ties to the lowest positions"). The answer is the entry's composite (key &lt;&lt; 32 | index), or
/// (key &lt;&lt; 32 | ~index) for descending, which are unique, so a mask is one comparison per entry.
/// </summary>
internal sealed class SelectionQuery(KeySource source, long position, bool indexDescending = false)
{
    public KeySource Source { get; } = source;

    public long Position { get; } = position;

    public bool IndexDescending { get; } = indexDescending;

    /// <summary>The composite of the selected entry, set by <see cref="ExactSelector.Solve"/>.</summary>
    public ulong Composite { get; internal set; }

    /// <summary>The key of the selected entry.</summary>
    public uint Key => (uint)(Composite >> 32);

    /// <summary>The index of the selected entry.</summary>
    public long Index => IndexDescending ? uint.MaxValue - (uint)Composite : (uint)Composite;

    // Bracket-pass state: the key bracket, the count below it, and the keys inside it, stored block by
    // block (each block's keys contiguous, at an offset recorded per block).
    internal uint Low, High;
    internal long Less, Count, Capacity;
    internal nint Candidates;
    internal long[] SegmentStart = [];
    internal int[] SegmentCount = [];
    internal int[] LowTies = [], HighTies = [];
    internal long LowTieCount, HighTieCount;
    internal int Overflow;
}

/// <summary>
/// Exact selection over the CPU memory of large tensors in O(n), vectorized and multi-threaded.
/// </summary>
/// <remarks>
/// <para>The common case is one pass. A deterministic sample of the keys gives a bracket [lo, hi] that
/// holds the wanted rank with overwhelming probability; the pass counts, per block, the keys below lo,
/// equal to lo and equal to hi, and keeps the keys strictly inside. (Task vectors of bfloat16 models take
/// few distinct values, so the keys at the ends of the bracket can be a large share of all: they are
/// only counted.) A radix select among the kept keys gives the exact key v and how many entries lie below
/// it; the per-block counts say which block holds the wanted occurrence of v (ties are broken by
/// position), and re-reading that one block gives its index.</para>
/// <para>When the sample was unlucky (the rank lies outside the bracket) or the bracket holds too many
/// entries (vast ties), an exact radix select over all keys answers instead: the 16 high key bits, the
/// 16 low ones, then the tie's position (three passes). Either way the answer depends neither on the
/// thread count nor on timing; only the time does.</para>
/// </remarks>
internal static unsafe class ExactSelector
{
    public const int BlockSize = 16384;
    /// <summary>The most entries a source may have for the small path (every key materialized, no bracket pass).</summary>
    private const long SmallLimit = 1 << 17;
    private const int SampleRun = 16;

    /// <summary>The largest number of entries a source may have (indices must fit in 32 bits).</summary>
    public const long MaxLength = 1L << 32;

    /// <summary>Forces the histogram path (for tests).</summary>
    internal static bool ForceHistogram { get; set; }

    /// <summary>Whether <see cref="Solve"/> over sources of <paramref name="n"/> entries runs the bracket pass
    /// (so a key source's <see cref="KeySource.FillPacked"/> is called), rather than the small path or the
    /// forced histogram.</summary>
    internal static bool UsesBracketPass(long n) => n > SmallLimit && !ForceHistogram;

    private static long _bracketMisses;

    /// <summary>How many queries the bracket pass has left to the exact fallback since the process
    /// started (for tests: a sample that gives wrong brackets shows here, not in the answers).</summary>
    internal static long BracketMisses => Interlocked.Read(ref _bracketMisses);

    /// <summary>Whether the bracket pass may pack candidates with AVX-512 compress where the CPU has it;
    /// false takes the portable bit loop (for tests).</summary>
    internal static bool PackWithCompress { get; set; } = true;

    /// <summary>Whether the fused task-vector scan runs on 512-bit vectors (with AVX-512 compress) where
    /// the CPU has them: .NET keeps <see cref="Vector{T}"/> at 256 bits there. False takes the
    /// <see cref="Vector{T}"/> scan (for tests).</summary>
    internal static bool WideScan { get; set; } = Avx512F.IsSupported && Vector512.IsHardwareAccelerated && Vector<uint>.Count < Vector512<uint>.Count;

    /// <summary>Answers every query; all sources must have the same length.</summary>
    public static void Solve(IReadOnlyList<SelectionQuery> queries)
    {
        if (queries.Count == 0)
        {
            return;
        }

        long n = queries[0].Source.Length;
        foreach (var q in queries)
        {
            if (q.Source.Length != n || n > MaxLength || q.Position < 0 || q.Position >= n)
            {
                throw new ArgumentOutOfRangeException(nameof(queries), "Selection queries must share one source length and ask for a position inside it.");
            }
        }

        if (n <= SmallLimit)
        {
            SolveSmall(queries);
            return;
        }

        var pending = UsesBracketPass(n) ? SolveByBracket(queries, n) : queries.ToList();
        foreach (var q in pending)
        {
            SolveByHistogram(q, n);
        }
    }

    private static ulong Composite(uint key, long index, bool descending) =>
        ((ulong)key << 32) | (descending ? uint.MaxValue - (uint)index : (uint)index);

    // ---- Small inputs: materialize every composite and quickselect. --------------------------------

    private static void SolveSmall(IReadOnlyList<SelectionQuery> queries)
    {
        long n = queries[0].Source.Length;
        var buffer = NativeBufferPool.Rent(n * 8 + BlockSize * 12L);
        try
        {
            var composites = new Span<ulong>((void*)buffer, (int)n);
            var keys = (uint*)(buffer + n * 8);
            var scratch = (float*)(keys + BlockSize);
            foreach (var group in queries.GroupBy(q => (q.Source, q.IndexDescending)))
            {
                var source = group.Key.Source;
                for (long start = 0; start < n; start += BlockSize)
                {
                    int count = (int)Math.Min(BlockSize, n - start);
                    source.Fill(start, count, keys, scratch);
                    for (int i = 0; i < count; i++)
                    {
                        composites[(int)(start + i)] = Composite(keys[i], start + i, group.Key.IndexDescending);
                    }
                }

                var positions = group.Select(q => q.Position).Distinct().Order().ToArray();
                var values = Quickselect.SelectMany(composites, positions);
                foreach (var q in group)
                {
                    q.Composite = values[Array.IndexOf(positions, q.Position)];
                }
            }
        }
        finally
        {
            NativeBufferPool.Return(buffer);
        }
    }

    // ---- The bracket pass. ------------------------------------------------------------------------

    private static List<SelectionQuery> SolveByBracket(IReadOnlyList<SelectionQuery> queries, long n)
    {
        var sources = queries.Select(q => q.Source).Distinct().ToArray();
        var bySource = sources.Select(s => queries.Where(q => q.Source == s).ToArray()).ToArray();
        var samples = DrawSamples(sources, n);
        CpuParallel.For(sources.Length, s => SetBrackets(samples[s], bySource[s], n));

        // Below every bracket of a source, a key is only counted, so the source need not compute it exactly.
        var floors = bySource.Select(g => g.Min(q => q.Low)).ToArray();

        long blocks = CpuParallel.BlockCount(n, BlockSize);
        var pending = new List<SelectionQuery>();
        try
        {
            foreach (var q in queries)
            {
                // Room for the keys strictly inside the bracket: about (5/√S + 32/S)·n for a sample of S
                // keys, so under 6% of n (S ≥ 8192) and about 2% from n = 2^24 on (S = 65536); tie classes at its two ends
                // (bfloat16 task vectors take few distinct values) are only counted. Beyond it, the exact
                // fallback answers.
                q.Capacity = Math.Max(1L << 16, n / 8);
                q.Candidates = NativeBufferPool.Rent(q.Capacity * 4);
                q.Less = q.Count = q.LowTieCount = q.HighTieCount = 0;
                q.Overflow = 0;
                q.SegmentStart = new long[blocks];
                q.SegmentCount = new int[blocks];
                q.LowTies = new int[blocks];
                q.HighTies = new int[blocks];
            }

            // Task vectors of one base (TIES: one query per expert; PCB: two) are scanned straight from the inputs'
            // memory, the base block widened once for all of them; other sources fill a key block first.
            var differences = sources.OfType<DifferenceMagnitudeKeys>().ToArray();
            bool fused = differences.Length == sources.Length && bySource.All(g => g.Length <= 2)
                && differences.All(d => d.Base.Pointer == differences[0].Base.Pointer);
            bool wide = WideScan && PackWithCompress;

            // The fused scan reads every value of each expert and of the base; a key |θ − θ_base| below +∞
            // everywhere means both were finite, which it vouches for (FiniteWitness) when a witness listens.
            var nonFinite = fused && FiniteWitness.Listening ? new int[sources.Length] : null;
            CpuParallel.For(blocks, block =>
            {
                long start = block * BlockSize;
                int count = (int)Math.Min(BlockSize, n - start);
                var scratch = ThreadScratch.Get(BlockSize * 16L);
                var keys = (uint*)scratch;
                var local = (uint*)(scratch + BlockSize * 4L);
                var floats = (float*)(scratch + BlockSize * 8L);
                if (fused)
                {
                    var bse = differences[0].Base.Block(start, count, floats);
                    for (int s = 0; s < sources.Length; s++)
                    {
                        var group = bySource[s];
                        uint top = 0;
                        if (wide && group.Length == 2)
                        {
                            top = ScanDifferenceWide(group[0], group[1], block, differences[s].Expert, bse, start, count, local, keys);
                        }
                        else
                        {
                            foreach (var q in group)
                            {
                                top = wide
                                    ? ScanDifferenceWide(q, block, differences[s].Expert, bse, start, count, local)
                                    : ScanDifference(q, block, differences[s].Expert, bse, start, count, local);
                            }
                        }

                        if (nonFinite is not null && top >= FloatKeys.NonFiniteMagnitude)
                        {
                            Volatile.Write(ref nonFinite[s], 1);
                        }
                    }

                    return;
                }

                for (int s = 0; s < sources.Length; s++)
                {
                    // A source that leaves out keys below the floor writes only the others; those left out
                    // are below every bracket of the source.
                    int packed = sources[s].FillPacked(start, count, keys, floats, floors[s]);
                    if (packed < 0)
                    {
                        sources[s].FillFrom(start, count, keys, floats, floors[s]);
                    }

                    int scanned = packed < 0 ? count : packed;
                    foreach (var q in bySource[s])
                    {
                        if (wide)
                        {
                            ScanWide(q, block, keys, scanned, local, count - scanned);
                        }
                        else
                        {
                            Scan(q, block, keys, scanned, local, count - scanned);
                        }
                    }
                }
            });

            if (nonFinite is not null)
            {
                for (int s = 0; s < sources.Length; s++)
                {
                    if (nonFinite[s] == 0)
                    {
                        FiniteWitness.Vouch(differences[s].Expert);
                        FiniteWitness.Vouch(differences[s].Base);
                    }
                }
            }

            var resolved = new bool[queries.Count];
            CpuParallel.For(queries.Count, i =>
            {
                var q = queries[(int)i];
                long rank = q.Position - q.Less;
                if (q.Overflow == 0 && rank >= 0 && rank < q.LowTieCount + q.Count + q.HighTieCount)
                {
                    Resolve(q, n, rank);
                    resolved[i] = true;
                }
            });

            for (int i = 0; i < queries.Count; i++)
            {
                if (!resolved[i])
                {
                    pending.Add(queries[i]);
                    Interlocked.Increment(ref _bracketMisses);
                }
            }
        }
        finally
        {
            foreach (var q in queries)
            {
                if (q.Candidates != 0)
                {
                    NativeBufferPool.Return(q.Candidates);
                    q.Candidates = 0;
                }

                q.SegmentStart = [];
                q.SegmentCount = [];
                q.LowTies = q.HighTies = [];
            }
        }

        return pending;
    }

    /// <summary>Counts the keys below the bracket (and <paramref name="below"/> more, left out by the
    /// source) and at its two ends, and keeps those strictly inside it as this block's segment.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Scan(SelectionQuery q, long block, uint* keys, int count, uint* local, long below)
    {
        uint lo = q.Low, hi = q.High;
        bool wide = hi > lo;
        var vlo = new Vector<uint>(lo);
        var vhi = new Vector<uint>(hi);
        var highMask = wide ? Vector<uint>.AllBitsSet : Vector<uint>.Zero;
        Vector<uint> belowLanes = Vector<uint>.Zero, atLow = Vector<uint>.Zero, atHigh = Vector<uint>.Zero;
        int found = 0;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= count - w; i += w)
        {
            var k = Vector.Load(keys + i);
            belowLanes -= Vector.LessThan(k, vlo);
            atLow -= Vector.Equals(k, vlo);
            atHigh -= Vector.Equals(k, vhi) & highMask;
            var inside = Vector.GreaterThan(k, vlo) & Vector.LessThan(k, vhi);
            if (inside != Vector<uint>.Zero)
            {
                ulong bits = Kernels.LaneBits(inside);
                while (bits != 0)
                {
                    int lane = BitOperations.TrailingZeroCount(bits);
                    bits &= bits - 1;
                    local[found++] = keys[i + lane];
                }
            }
        }

        long lessCount = Vector.Sum(belowLanes) + below;
        int lowTies = (int)Vector.Sum(atLow), highTies = (int)Vector.Sum(atHigh);
        for (; i < count; i++)
        {
            Classify(keys[i], lo, hi, ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        Record(q, block, lessCount, lowTies, highTies, local, found);
    }

    /// <summary><see cref="Scan"/> on 512-bit vectors: the counts through mask registers and popcounts,
    /// the keys inside the bracket packed with AVX-512 compress (as <see cref="ScanDifferenceWide(SelectionQuery, long, CpuFloats, float*, long, int, uint*)"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ScanWide(SelectionQuery q, long block, uint* keys, int count, uint* local, long below)
    {
        uint lo = q.Low, hi = q.High;
        const int w = 16;
        var bracket = new WideBracket(lo, hi);
        long lessCount = below;
        int lowTies = 0, highTies = 0;
        int found = 0;
        int i = 0;
        for (; i <= count - 2 * w; i += 2 * w)
        {
            bracket.Classify(Vector512.Load(keys + i), Vector512.Load(keys + i + w), ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        if (hi <= lo)
        {
            highTies = 0;
        }

        for (; i < count; i++)
        {
            Classify(keys[i], lo, hi, ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        Record(q, block, lessCount, lowTies, highTies, local, found);
    }

    /// <summary><see cref="Scan"/> of the keys |θ − θ_base| computed in registers as they are read.
    /// Returns the largest key (at least <see cref="FloatKeys.NonFiniteMagnitude"/> when an input was NaN or ±∞).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint ScanDifference(SelectionQuery q, long block, CpuFloats expert, float* bse, long start, int count, uint* local)
    {
        uint lo = q.Low, hi = q.High;
        int w = Vector<float>.Count;
        var mask = new Vector<uint>(FloatKeys.MagnitudeMask);
        var vlo = new Vector<uint>(lo);
        var vhi = new Vector<uint>(hi);
        var highMask = hi > lo ? Vector<uint>.AllBitsSet : Vector<uint>.Zero;
        // Strictly inside ⟺ k − (lo + 1) < hi − lo − 1, unsigned.
        var insideFrom = new Vector<uint>(lo + 1);
        var insideSpan = new Vector<uint>(hi > lo ? hi - lo - 1 : 0);
        Vector<uint> below = Vector<uint>.Zero, atLow = Vector<uint>.Zero, atHigh = Vector<uint>.Zero, top = Vector<uint>.Zero;
        var pair = stackalloc uint[2 * w];
        bool compress = PackWithCompress && Avx512F.VL.IsSupported && Vector<uint>.Count == Vector256<uint>.Count;
        int found = 0;
        int i = 0;
        for (; i <= count - 2 * w; i += 2 * w)
        {
            DifferenceMagnitudeKeys.Load(expert, start + i, out var e0, out var e1);
            var k0 = Vector.AsVectorUInt32(e0 - Vector.Load(bse + i)) & mask;
            var k1 = Vector.AsVectorUInt32(e1 - Vector.Load(bse + i + w)) & mask;
            top = Vector.Max(top, Vector.Max(k0, k1));
            below -= Vector.LessThan(k0, vlo) + Vector.LessThan(k1, vlo);
            atLow -= Vector.Equals(k0, vlo) + Vector.Equals(k1, vlo);
            atHigh -= (Vector.Equals(k0, vhi) + Vector.Equals(k1, vhi)) & highMask;
            var in0 = Vector.LessThan(k0 - insideFrom, insideSpan);
            var in1 = Vector.LessThan(k1 - insideFrom, insideSpan);
            if (compress)
            {
                // Branch-free: each half's kept keys packed to the front and stored whole; `found` moves by
                // their count. found ≤ i before the pair, so both stores stay inside the block's
                // `count` ≤ BlockSize slots.
                Vector256.Store(Avx512F.VL.Compress(Vector256<uint>.Zero, in0.AsVector256(), k0.AsVector256()), local + found);
                found += BitOperations.PopCount(Kernels.LaneBits(in0));
                Vector256.Store(Avx512F.VL.Compress(Vector256<uint>.Zero, in1.AsVector256(), k1.AsVector256()), local + found);
                found += BitOperations.PopCount(Kernels.LaneBits(in1));
            }
            else if ((in0 | in1) != Vector<uint>.Zero)
            {
                Vector.Store(k0, pair);
                Vector.Store(k1, pair + w);
                ulong bits = Kernels.LaneBits(in0) | (Kernels.LaneBits(in1) << w);
                while (bits != 0)
                {
                    int lane = BitOperations.TrailingZeroCount(bits);
                    bits &= bits - 1;
                    local[found++] = pair[lane];
                }
            }
        }

        // Each equality mask lane is all ones (−1), so two of them add up to −2 per lane: the sums above
        // subtract 0, 1 or 2 per lane, as wanted.
        long lessCount = Vector.Sum(below);
        int lowTies = (int)Vector.Sum(atLow), highTies = (int)Vector.Sum(atHigh);
        uint largest = Kernels.Largest(top);
        for (; i < count; i++)
        {
            uint key = FloatKeys.Magnitude(expert.At(start + i) - bse[i]);
            largest = Math.Max(largest, key);
            Classify(key, lo, hi, ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        Record(q, block, lessCount, lowTies, highTies, local, found);
        return largest;
    }

    /// <summary><see cref="ScanDifference"/> on 512-bit vectors, candidates packed by AVX-512 compress; returns the largest key.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint ScanDifferenceWide(SelectionQuery q, long block, CpuFloats expert, float* bse, long start, int count, uint* local)
    {
        uint lo = q.Low, hi = q.High;
        const int w = 16;
        var bracket = new WideBracket(lo, hi);
        bool highEnd = hi > lo;
        bool bf16 = expert.IsBFloat16;
        nint pointer = (nint)expert.Pointer;
        long lessCount = 0;
        int lowTies = 0, highTies = 0;
        int found = 0;
        var top = Vector512<uint>.Zero;
        int i = 0;
        for (; i <= count - 2 * w; i += 2 * w)
        {
            DifferenceKeys(pointer, bf16, start + i, bse + i, out var k0, out var k1);
            top = Vector512.Max(top, Vector512.Max(k0, k1));
            bracket.Classify(k0, k1, ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        if (!highEnd)
        {
            highTies = 0;
        }

        uint largest = Kernels.Largest(top);
        for (; i < count; i++)
        {
            uint key = FloatKeys.Magnitude(expert.At(start + i) - bse[i]);
            largest = Math.Max(largest, key);
            Classify(key, lo, hi, ref lessCount, ref lowTies, ref highTies, local, ref found);
        }

        Record(q, block, lessCount, lowTies, highTies, local, found);
        return largest;
    }

    /// <summary><see cref="ScanDifferenceWide(SelectionQuery, long, CpuFloats, float*, long, int, uint*)"/>
    /// for two queries on one task vector (PCB's two clamp quantiles): each key computed once, classified
    /// against both brackets, packed into <paramref name="local0"/> and <paramref name="local1"/>. Returns the largest key.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint ScanDifferenceWide(SelectionQuery q0, SelectionQuery q1, long block, CpuFloats expert, float* bse, long start, int count, uint* local0, uint* local1)
    {
        const int w = 16;
        var bracket0 = new WideBracket(q0.Low, q0.High);
        var bracket1 = new WideBracket(q1.Low, q1.High);
        bool bf16 = expert.IsBFloat16;
        nint pointer = (nint)expert.Pointer;
        long less0 = 0, less1 = 0;
        int lowTies0 = 0, highTies0 = 0, lowTies1 = 0, highTies1 = 0;
        int found0 = 0, found1 = 0;
        var top = Vector512<uint>.Zero;
        int i = 0;
        for (; i <= count - 2 * w; i += 2 * w)
        {
            DifferenceKeys(pointer, bf16, start + i, bse + i, out var k0, out var k1);
            top = Vector512.Max(top, Vector512.Max(k0, k1));
            bracket0.ClassifyExtreme(k0, k1, ref less0, ref lowTies0, ref highTies0, local0, ref found0);
            bracket1.ClassifyExtreme(k0, k1, ref less1, ref lowTies1, ref highTies1, local1, ref found1);
        }

        highTies0 = q0.High > q0.Low ? highTies0 : 0;
        highTies1 = q1.High > q1.Low ? highTies1 : 0;
        uint largest = Kernels.Largest(top);
        for (; i < count; i++)
        {
            uint key = FloatKeys.Magnitude(expert.At(start + i) - bse[i]);
            largest = Math.Max(largest, key);
            Classify(key, q0.Low, q0.High, ref less0, ref lowTies0, ref highTies0, local0, ref found0);
            Classify(key, q1.Low, q1.High, ref less1, ref lowTies1, ref highTies1, local1, ref found1);
        }

        Record(q0, block, less0, lowTies0, highTies0, local0, found0);
        Record(q1, block, less1, lowTies1, highTies1, local1, found1);
        return largest;
    }

    /// <summary>The keys |θ − θ_base| of the 32 entries from <paramref name="index"/> of an expert's
    /// float32 or bfloat16 memory, against the base's float32 entries at <paramref name="bse"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void DifferenceKeys(nint expert, bool bf16, long index, float* bse, out Vector512<uint> k0, out Vector512<uint> k1)
    {
        // The expert's memory a page ahead, into the first-level cache: the hardware's own prefetch
        // starts over at each 4 KB page, and the scan would otherwise wait on memory there (about 15%
        // of TIES' time on 4096×11008 with 4 bfloat16 experts, about 12% with float32 ones).
        var ahead = (byte*)expert + (index << (bf16 ? 1 : 2)) + 4096;
        Sse.Prefetch0(ahead);
        if (!bf16)
        {
            Sse.Prefetch0(ahead + 64); // 32 float32 entries span two cache lines
        }

        var mask = Vector512.Create(FloatKeys.MagnitudeMask);
        Vector512Lanes.Load(expert, bf16, index, out var e0, out var e1);
        k0 = (e0 - Vector512.Load(bse)).AsUInt32() & mask;
        k1 = (e1 - Vector512.Load(bse + 16)).AsUInt32() & mask;
    }

    /// <summary>A bracket [lo, hi] broadcast to 512-bit vectors, for <see cref="ScanWide"/> and
    /// <see cref="ScanDifferenceWide(SelectionQuery, long, CpuFloats, float*, long, int, uint*)"/>.</summary>
    private readonly struct WideBracket(uint lo, uint hi)
    {
        private readonly Vector512<uint> _lo = Vector512.Create(lo);
        private readonly Vector512<uint> _hi = Vector512.Create(hi);

        // Strictly inside ⟺ k − (lo + 1) < hi − lo − 1, unsigned.
        private readonly Vector512<uint> _insideFrom = Vector512.Create(lo + 1);
        private readonly Vector512<uint> _insideSpan = Vector512.Create(hi > lo ? hi - lo - 1 : 0);
        private readonly bool _single = hi <= lo;

        /// <summary>Counts 32 keys below the bracket and at its two ends (the high end counted even when
        /// hi = lo: the caller drops it then), and packs those strictly inside it at
        /// <paramref name="local"/> + <paramref name="found"/>. The counts go through the comparisons' mask
        /// registers and scalar popcounts, which keeps the vector units (the bottleneck on bfloat16
        /// inputs) to the arithmetic and the packing. The caller guarantees found ≤ the index of
        /// <paramref name="k0"/> in its block, so both whole-vector stores stay inside the block's scratch.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Classify(Vector512<uint> k0, Vector512<uint> k1, ref long lessCount, ref int lowTies, ref int highTies, uint* local, ref int found)
        {
            lessCount += BitOperations.PopCount(Below(k0, k1));
            ClassifyAtOrAbove(k0, k1, ref lowTies, ref highTies, local, ref found);
        }

        /// <summary><see cref="Classify"/> for a bracket at an extreme rank (PCB's clamp quantiles), where
        /// most runs of 32 keys lie on one side of it: keys all below it are only counted, keys all above
        /// it need nothing more, and a bracket of one key (lo = hi, such as [0, 0] for the smallest
        /// magnitudes of bfloat16 task vectors, many of which are 0) has nothing inside it to pack.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void ClassifyExtreme(Vector512<uint> k0, Vector512<uint> k1, ref long lessCount, ref int lowTies, ref int highTies, uint* local, ref int found)
        {
            uint below = Below(k0, k1);
            lessCount += BitOperations.PopCount(below);
            if (below == uint.MaxValue)
            {
                return;
            }

            if (_single)
            {
                lowTies += BitOperations.PopCount(Equal(k0, k1, _lo));
                return;
            }

            if ((Vector512.ExtractMostSignificantBits(Vector512.GreaterThan(k0, _hi))
                & Vector512.ExtractMostSignificantBits(Vector512.GreaterThan(k1, _hi))) == 0xFFFF)
            {
                return;
            }

            ClassifyAtOrAbove(k0, k1, ref lowTies, ref highTies, local, ref found);
        }

        /// <summary>One bit per key of the 32, set where the key is below the bracket.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private uint Below(Vector512<uint> k0, Vector512<uint> k1) =>
            (uint)(Vector512.ExtractMostSignificantBits(Vector512.LessThan(k0, _lo)) | (Vector512.ExtractMostSignificantBits(Vector512.LessThan(k1, _lo)) << 16));

        /// <summary>One bit per key of the 32, set where the key is <paramref name="end"/> (a bracket end).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static uint Equal(Vector512<uint> k0, Vector512<uint> k1, Vector512<uint> end) =>
            (uint)(Vector512.ExtractMostSignificantBits(Vector512.Equals(k0, end)) | (Vector512.ExtractMostSignificantBits(Vector512.Equals(k1, end)) << 16));

        /// <summary>Everything <see cref="Classify"/> does but count the keys below the bracket.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private void ClassifyAtOrAbove(Vector512<uint> k0, Vector512<uint> k1, ref int lowTies, ref int highTies, uint* local, ref int found)
        {
            lowTies += BitOperations.PopCount(Equal(k0, k1, _lo));
            highTies += BitOperations.PopCount(Equal(k0, k1, _hi));
            var in0 = Vector512.LessThan(k0 - _insideFrom, _insideSpan);
            var in1 = Vector512.LessThan(k1 - _insideFrom, _insideSpan);
            Avx512F.Compress(Vector512<uint>.Zero, in0, k0).Store(local + found);
            found += BitOperations.PopCount(Vector512.ExtractMostSignificantBits(in0));
            Avx512F.Compress(Vector512<uint>.Zero, in1, k1).Store(local + found);
            found += BitOperations.PopCount(Vector512.ExtractMostSignificantBits(in1));
        }
    }

    /// <summary>One key of a block's scalar tail: below the bracket, at either end, or kept inside it.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Classify(uint k, uint lo, uint hi, ref long lessCount, ref int lowTies, ref int highTies, uint* local, ref int found)
    {
        if (k < lo)
        {
            lessCount++;
        }
        else if (k == lo)
        {
            lowTies++;
        }
        else if (k < hi)
        {
            local[found++] = k;
        }
        else if (k == hi)
        {
            highTies++;
        }
    }

    /// <summary>Adds one block's counts and kept keys to the query.</summary>
    private static void Record(SelectionQuery q, long block, long lessCount, int lowTies, int highTies, uint* local, int found)
    {
        Interlocked.Add(ref q.Less, lessCount);
        Interlocked.Add(ref q.LowTieCount, lowTies);
        Interlocked.Add(ref q.HighTieCount, highTies);
        q.LowTies[block] = lowTies;
        q.HighTies[block] = highTies;
        if (found == 0 || Volatile.Read(ref q.Overflow) != 0)
        {
            return;
        }

        long end = Interlocked.Add(ref q.Count, found);
        if (end > q.Capacity)
        {
            Volatile.Write(ref q.Overflow, 1);
            return;
        }

        q.SegmentStart[block] = end - found;
        q.SegmentCount[block] = found;
        Buffer.MemoryCopy(local, (uint*)q.Candidates + (end - found), found * 4L, found * 4L);
    }

    /// <summary>The exact key (the bracket's low end, a kept key, or its high end), then the block and
    /// index of the wanted tie.</summary>
    private static void Resolve(SelectionQuery q, long n, long rank)
    {
        long blocks = q.SegmentCount.Length;
        var perBlock = new long[blocks];
        uint key;
        long tie; // which occurrence of the key, in composite order
        if (rank < q.LowTieCount)
        {
            (key, tie) = (q.Low, rank);
            for (long b = 0; b < blocks; b++)
            {
                perBlock[b] = q.LowTies[b];
            }
        }
        else if (rank < q.LowTieCount + q.Count)
        {
            var keys = (uint*)q.Candidates;
            (key, long below) = SelectKey(keys, q.Count, rank - q.LowTieCount, q.Low, q.High);
            tie = rank - q.LowTieCount - below;
            for (long b = 0; b < blocks; b++)
            {
                perBlock[b] = new ReadOnlySpan<uint>(keys + q.SegmentStart[b], q.SegmentCount[b]).Count(key);
            }
        }
        else
        {
            (key, tie) = (q.High, rank - q.LowTieCount - q.Count);
            for (long b = 0; b < blocks; b++)
            {
                perBlock[b] = q.HighTies[b];
            }
        }

        long total = perBlock.Sum();
        q.Composite = Composite(key, LocateTie(q.Source, n, key, q.IndexDescending ? total - 1 - tie : tie, perBlock), q.IndexDescending);
    }

    /// <summary>The <paramref name="rank"/>-th smallest of <paramref name="count"/> keys (all in
    /// [<paramref name="low"/>, <paramref name="high"/>]) and how many keys are below it (<see cref="SelectKeys"/>).</summary>
    private static (uint Key, long Below) SelectKey(uint* keys, long count, long rank, uint low, uint high)
    {
        Span<(uint Key, long Below)> result = stackalloc (uint, long)[1];
        SelectKeys(keys, count, [rank], result, low, high);
        return result[0];
    }

    /// <summary>The keys at the 0-based, ascending <paramref name="ranks"/> among <paramref name="count"/>
    /// keys (all in [<paramref name="low"/>, <paramref name="high"/>]) and how many keys are below each, by a
    /// radix select on key − low, a digit of 8 to 16 bits at a time (an eighth to a quarter as many bins as
    /// keys between 1,024 and 2^18 keys, so that clearing the counts does not outweigh counting a small
    /// sample). The first digit is counted once for every rank; each further digit reads every key again
    /// but counts, for one rank, only the keys of the bin it lies in, which a vector compare finds. The
    /// counts live in reused thread scratch.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void SelectKeys(uint* keys, long count, ReadOnlySpan<long> ranks, Span<(uint Key, long Below)> results, uint low, uint high)
    {
        // Every key must lie in [low, high]: the bins are indexed by key − low without a check.
        System.Diagnostics.Debug.Assert(low <= high && ranks.Length == results.Length, "SelectKeys needs low <= high and a result per rank.");
        int digit = Math.Clamp(BitOperations.Log2((ulong)Math.Max(count, 1)) - 2, 8, 16);
        var counts = (long*)ThreadScratch.Get((1L << digit) * 8 + 64);
        uint span = high - low;
        int shift = Math.Max(0, 32 - BitOperations.LeadingZeroCount(span) - digit);
        new Span<long>(counts, (int)(span >> shift) + 1).Clear();
        for (long i = 0; i < count; i++)
        {
            counts[(keys[i] - low) >> shift]++;
        }

        // Each rank's bin and the keys below it, in one sweep (the ranks ascend).
        long below = 0;
        uint bin = 0;
        for (int r = 0; r < ranks.Length; r++)
        {
            System.Diagnostics.Debug.Assert(ranks[r] >= below && ranks[r] < count, "SelectKeys needs ascending ranks among the keys.");
            while (below + counts[bin] <= ranks[r])
            {
                below += counts[bin++];
            }

            results[r] = (low + (bin << shift), below);
        }

        for (int r = 0; r < ranks.Length; r++)
        {
            var (binLow, rankBelow) = results[r];
            for (int width = shift; width > 0;)
            {
                // The bin's keys are binLow + [0, 2^width); count them by their next digit.
                uint mask = (uint)((1UL << width) - 1);
                int next = Math.Max(0, width - digit);
                new Span<long>(counts, (int)(mask >> next) + 1).Clear();
                var lowest = new Vector<uint>(binLow);
                var widest = new Vector<uint>(mask);
                long i = 0;
                for (; i + Vector<uint>.Count <= count; i += Vector<uint>.Count)
                {
                    var offsets = *(Vector<uint>*)(keys + i) - lowest;
                    for (ulong bits = Kernels.LaneBits(Vector.LessThanOrEqual(offsets, widest)); bits != 0; bits &= bits - 1)
                    {
                        counts[offsets[BitOperations.TrailingZeroCount(bits)] >> next]++;
                    }
                }

                for (; i < count; i++)
                {
                    uint offset = keys[i] - binLow;
                    if (offset <= mask)
                    {
                        counts[offset >> next]++;
                    }
                }

                uint sub = 0;
                while (rankBelow + counts[sub] <= ranks[r])
                {
                    rankBelow += counts[sub++];
                }

                binLow += sub << next;
                width = next;
            }

            results[r] = (binLow, rankBelow);
        }
    }

    /// <summary>The index of occurrence <paramref name="ascending"/> (0-based, in index order) of
    /// <paramref name="key"/>, given its count in each block: re-reads the one block that holds it.</summary>
    private static long LocateTie(KeySource source, long n, uint key, long ascending, long[] perBlock)
    {
        long b = 0;
        while (ascending >= perBlock[b])
        {
            ascending -= perBlock[b++];
        }

        long begin = b * BlockSize;
        int length = (int)Math.Min(BlockSize, n - begin);
        var buffer = ThreadScratch.Get(BlockSize * 12L);
        var blockKeys = (uint*)buffer;
        source.Fill(begin, length, blockKeys, (float*)(buffer + BlockSize * 4L));
        for (int i = 0; i < length; i++)
        {
            if (blockKeys[i] == key && ascending-- == 0)
            {
                return begin + i;
            }
        }

        throw new InvalidOperationException("Selection lost a tie: the source changed while it was read.");
    }

    /// <summary>A deterministic sample of each source: one run of <see cref="SampleRun"/> consecutive
    /// entries (a cache line) from each of equal strata, at a pseudo-random offset within the stratum so
    /// periodic structure (rows, heads) cannot alias. The strata are the same for every source, and each
    /// run is filled for every source in turn, so sources that compute their keys together (PCB's score
    /// rows, whose block computes every row at once) or share an input (task vectors of one base) read and
    /// compute each run once.</summary>
    private static uint[][] DrawSamples(KeySource[] sources, long n)
    {
        int runs = (int)Math.Clamp(n / (SampleRun * 256), 512, 4096);
        long stride = n / runs;
        var samples = sources.Select(_ => new uint[runs * SampleRun]).ToArray();
        const int RunsPerTask = 64;
        CpuParallel.For(CpuParallel.BlockCount(runs, RunsPerTask), t =>
        {
            var floats = stackalloc float[2 * SampleRun];
            for (int j = (int)t * RunsPerTask; j < Math.Min(runs, (t + 1) * RunsPerTask); j++)
            {
                long offset = (long)(MergeLab.Stages.DropMask.SplitMix((ulong)j) % (ulong)(stride - SampleRun + 1));
                for (int s = 0; s < sources.Length; s++)
                {
                    fixed (uint* sample = samples[s])
                    {
                        sources[s].Fill(j * stride + offset, SampleRun, sample + j * SampleRun, floats);
                    }
                }
            }
        });

        return samples;
    }

    /// <summary>Picks each query's key bracket from <paramref name="sample"/>, its source's
    /// (<see cref="DrawSamples"/>).</summary>
    private static void SetBrackets(uint[] sample, SelectionQuery[] queries, long n)
    {
        int sampleCount = sample.Length;
        var bounds = new (long Lo, long Hi)[queries.Length];
        for (int i = 0; i < queries.Length; i++)
        {
            // Five standard deviations of the sample quantile (a little more than four for runs of
            // neighbours that may be correlated), plus a run.
            double q = (queries[i].Position + 0.5) / n;
            double center = q * sampleCount;
            double margin = 5 * Math.Sqrt(sampleCount * q * (1 - q)) + SampleRun;
            long lo = (long)Math.Floor(center - margin);
            long hi = (long)Math.Ceiling(center + margin);
            bounds[i] = (lo, hi);
        }

        // The sample's order statistics by a radix select (one count of the first digit for every rank, then
        // a vector pass over the sample per further digit and rank): several times faster than a
        // quickselect's data-dependent branches.
        fixed (uint* s = sample)
        {
            uint min = uint.MaxValue, max = 0;
            for (int j = 0; j < sampleCount; j++)
            {
                min = Math.Min(min, s[j]);
                max = Math.Max(max, s[j]);
            }

            // Every query's two ends in one radix select (the ends outside the sample are open).
            var ranks = new List<long>(2 * queries.Length);
            foreach (var (lo, hi) in bounds)
            {
                if (lo >= 0)
                {
                    ranks.Add(lo);
                }

                if (hi < sampleCount)
                {
                    ranks.Add(hi);
                }
            }

            ranks.Sort();
            var keys = new (uint Key, long Below)[ranks.Count];
            if (ranks.Count > 0)
            {
                SelectKeys(s, sampleCount, CollectionsMarshal.AsSpan(ranks), keys, min, max);
            }
            uint KeyAt(long rank) => keys[ranks.BinarySearch(rank)].Key;
            for (int i = 0; i < queries.Length; i++)
            {
                var (lo, hi) = bounds[i];
                queries[i].Low = lo < 0 ? 0 : KeyAt(lo);
                queries[i].High = hi >= sampleCount ? uint.MaxValue : KeyAt(hi);
            }
        }
    }

    // ---- The exact fallback: radix select over the key bits, then the tie's position. -------------

    private static void SolveByHistogram(SelectionQuery q, long n)
    {
        var source = q.Source;
        long blocks = CpuParallel.BlockCount(n, BlockSize);

        // Pass 1: the 16 high key bits.
        var high = Histogram(source, n, blocks, -1);
        long seen = 0;
        int bin = 0;
        while (seen + high[bin] <= q.Position)
        {
            seen += high[bin++];
        }

        // Pass 2: the 16 low bits inside that bin pin the key.
        var low = Histogram(source, n, blocks, bin);
        int lowBits = 0;
        while (seen + low[lowBits] <= q.Position)
        {
            seen += low[lowBits++];
        }

        uint key = ((uint)bin << 16) | (uint)lowBits;
        long tie = q.Position - seen; // which occurrence of the key, in composite order

        // Pass 3: occurrences of the key per block, then the tie's index.
        var perBlock = new long[blocks];
        source.ForEachBlock((block, _, count, keys) => perBlock[block] = new ReadOnlySpan<uint>(keys, count).Count(key));

        long total = perBlock.Sum();
        q.Composite = Composite(key, LocateTie(source, n, key, q.IndexDescending ? total - 1 - tie : tie, perBlock), q.IndexDescending);
    }

    /// <summary>A histogram of the high 16 key bits (<paramref name="highBin"/> −1) or of the low 16 bits
    /// of the keys whose high bits are <paramref name="highBin"/>, counted per thread and summed.</summary>
    private static long[] Histogram(KeySource source, long n, long blocks, int highBin)
    {
        var total = new long[1 << 16];
        var gate = new object();
        int threads = CpuParallel.CountingTasks(blocks, BlockSize);
        long perThread = CpuParallel.BlockCount(blocks, threads);
        CpuParallel.For(threads, t =>
        {
            var counts = new uint[1 << 16];
            var scratch = ThreadScratch.Get(BlockSize * 12L);
            var keys = (uint*)scratch;
            var floats = (float*)(scratch + BlockSize * 4L);
            for (long block = t * perThread; block < Math.Min(blocks, (t + 1) * perThread); block++)
            {
                long start = block * BlockSize;
                int count = (int)Math.Min(BlockSize, n - start);
                source.Fill(start, count, keys, floats);
                Count(keys, count, highBin, counts);
            }

            lock (gate)
            {
                for (int i = 0; i < counts.Length; i++)
                {
                    total[i] += counts[i];
                }
            }
        });

        return total;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Count(uint* keys, int count, int highBin, uint[] counts)
    {
        fixed (uint* c = counts)
        {
            if (highBin < 0)
            {
                for (int i = 0; i < count; i++)
                {
                    c[keys[i] >> 16]++;
                }
            }
            else
            {
                for (int i = 0; i < count; i++)
                {
                    if (keys[i] >> 16 == (uint)highBin)
                    {
                        c[keys[i] & 0xFFFF]++;
                    }
                }
            }
        }
    }
}

/// <summary>Hoare quickselect with median-of-three pivots: O(n) expected, in place.</summary>
internal static class Quickselect
{
    /// <summary>Reorders <paramref name="values"/> so that entry <paramref name="k"/> is the k-th smallest
    /// (0-based), everything before it ≤ and everything after ≥, and returns it.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static T Select<T>(Span<T> values, int k)
        where T : unmanaged, IBinaryInteger<T>
    {
        int lo = 0, hi = values.Length - 1;
        while (hi - lo > 16)
        {
            int mid = lo + ((hi - lo) >> 1);
            if (values[mid] < values[lo])
            {
                (values[mid], values[lo]) = (values[lo], values[mid]);
            }

            if (values[hi] < values[lo])
            {
                (values[hi], values[lo]) = (values[lo], values[hi]);
            }

            if (values[hi] < values[mid])
            {
                (values[hi], values[mid]) = (values[mid], values[hi]);
            }

            T pivot = values[mid];
            int i = lo, j = hi;
            while (i <= j)
            {
                while (values[i] < pivot)
                {
                    i++;
                }

                while (values[j] > pivot)
                {
                    j--;
                }

                if (i <= j)
                {
                    (values[i], values[j]) = (values[j], values[i]);
                    i++;
                    j--;
                }
            }

            if (k <= j)
            {
                hi = j;
            }
            else if (k >= i)
            {
                lo = i;
            }
            else
            {
                return values[k];
            }
        }

        for (int a = lo + 1; a <= hi; a++)
        {
            T v = values[a];
            int b = a - 1;
            while (b >= lo && values[b] > v)
            {
                values[b + 1] = values[b];
                b--;
            }

            values[b + 1] = v;
        }

        return values[k];
    }

    /// <summary>The values at several sorted 0-based <paramref name="positions"/> (ascending, distinct).</summary>
    public static T[] SelectMany<T>(Span<T> values, IReadOnlyList<long> positions)
        where T : unmanaged, IBinaryInteger<T>
    {
        var result = new T[positions.Count];
        int start = 0;
        for (int p = 0; p < positions.Count; p++)
        {
            int k = (int)positions[p];
            result[p] = Select(values[start..], k - start);
            start = k + 1;
        }

        return result;
    }
}
