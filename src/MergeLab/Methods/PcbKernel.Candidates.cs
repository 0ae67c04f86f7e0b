using System.Diagnostics;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MergeLab.Selection;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// PCB's scores computed exactly only where they can matter, on CPUs with AVX-512. A pass that needs
/// only the scores at or above a cutoff c &gt; 0 (the merge: each task's score threshold; the threshold's
/// selection: the low end of its bracket) first bounds every score's logarithm from above with a few
/// multiplications and no exponential (<see cref="ScoreBound"/>). Only the entries whose bound reaches c
/// (about the kept share, 10% by default) are packed (AVX-512 compress), scored exactly by the same exp
/// and tanh as everywhere else, and unpacked (expand) into place; the others take the value a score below
/// c gives (a factor of 0, a key below the floor). So the results keep their bits, while exp and tanh run
/// on a tenth of the entries.
/// </summary>
internal static unsafe partial class PcbKernel
{
    /// <summary>Whether the passes that can score only their candidates do (AVX-512 CPUs); false takes the
    /// full-score passes (for tests: both must give the same bits).</summary>
    internal static bool ScoreCandidatesOnly { get; set; } = Avx512F.IsSupported && Vector512.IsHardwareAccelerated;

    /// <summary>When set, the candidate passes count in <see cref="Scored"/> the entries they score exactly
    /// and in <see cref="Offered"/> those they look at (for tests: that the bound skips most).</summary>
    internal static bool CountCandidates { get; set; }

    internal static long Scored, Offered;

    /// <summary>Which entries a task's candidate pass scores exactly.</summary>
    private enum Candidates
    {
        /// <summary>Those whose bound reaches the cutoff.</summary>
        Bounded,

        /// <summary>Every entry (the cutoff is not positive, the score range is not positive or is NaN, or
        /// there are more than <see cref="MaxBoundedExperts"/> experts).</summary>
        All,

        /// <summary>None (the score range is empty, so every factor is 0).</summary>
        None,
    }

    /// <summary>
    /// One chunk of at most <see cref="Length"/> entries in the calling thread's scratch, for the candidate
    /// passes: the base and each expert as float32 (zero-padded to whole 512-bit vectors), Σ_k τ_k, the
    /// packed candidates, their bits, and two accumulators.
    /// </summary>
    private readonly struct CandidateChunk
    {
        /// <summary>The most entries a chunk holds (its rows stay in the first-level cache).</summary>
        public const int Length = 1024;

        /// <summary>The floats of one row of a chunk's scratch (a whole chunk and two vectors of slack).</summary>
        public const int RowFloats = Length + (2 * Lanes);
        private readonly float* _scratch;

        /// <summary>A chunk of entries [<paramref name="start"/>, start + <paramref name="count"/>) whose base
        /// and Σ_k τ_k are at <paramref name="bse"/> and <paramref name="total"/> (zero-padded to whole
        /// vectors), with <paramref name="scratch"/> (<see cref="ScratchFloats"/> floats) for the rest.</summary>
        public CandidateChunk(long start, int count, float* bse, float* total, float* scratch)
        {
            Start = start;
            Count = count;
            Padded = WholeVectors(count);
            _scratch = scratch;
            Base = bse;
            Total = total;
        }

        /// <summary>Reads entries [<paramref name="start"/>, start + <paramref name="count"/>) of every input
        /// into <paramref name="scratch"/> (<see cref="ScratchFloats"/> floats) and sums the task vectors.</summary>
        public static CandidateChunk Read(FusedPipeline.Inputs inputs, long start, int count, float* scratch)
        {
            int n = inputs.Experts.Length;
            var probe = new CandidateChunk(start, count, scratch, scratch + RowFloats, scratch);
            var bse = probe.ReadRow(inputs.Base, probe.Row(0));
            var view = new CandidateChunk(start, count, bse, scratch + RowFloats, scratch);
            var experts = view.Experts;
            for (int k = 0; k < n; k++)
            {
                experts[k] = new Float32Reader(view.ReadRow(inputs.Experts[k], view.Row(9 + k)));
            }

            var total = view.Total;
            for (int i = 0; i < view.Padded; i += Lanes)
            {
                TaskVectorSum(experts, n, i, Vector512.Load(bse + i)).Store(total + i);
            }

            return view;
        }

        public long Start { get; }

        public int Count { get; }

        /// <summary><see cref="Count"/> rounded up to whole 512-bit vectors.</summary>
        public int Padded { get; }

        public float* Base { get; }

        /// <summary>Σ_k τ_k.</summary>
        public float* Total { get; }

        /// <summary>The packed task-vector entries (then their scores, or what is made of them).</summary>
        public float* Packed => Row(2);

        /// <summary>The packed products τ_k·Σ_j τ_j.</summary>
        public float* PackedProducts => Row(3);

        /// <summary>The candidate bits of each vector (bit j: entry j of the vector).</summary>
        public ushort* Bits => (ushort*)Row(4);

        public float* Numerator => Row(5);

        public float* Denominator => Row(6);

        /// <summary>A staging row for the outputs of a chunk that is not whole pairs of vectors.</summary>
        public float* Staging => Row(7);

        /// <summary>The scratch a chunk read from <paramref name="experts"/> experts takes, in floats.</summary>
        public static long ScratchFloats(int experts) => (experts + 9L) * RowFloats;

        /// <summary>Expert <paramref name="k"/>'s entries (in a chunk made by <see cref="Read"/>).</summary>
        public float* Expert(int k) => Experts[k].First;

        /// <summary>A row for one expert's entries (in a chunk not made by <see cref="Read"/>).</summary>
        private float* ExpertStaging => Row(8);

        private Float32Reader* Experts => (Float32Reader*)Row(8);

        /// <summary>τ of entries [i, i + 16), for the expert at <paramref name="expert"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> Tau(float* expert, int i) => Vector512.Load(expert + i) - Vector512.Load(Base + i);

        /// <summary>
        /// Packs the entries and products of the candidates of the task whose expert is at
        /// <paramref name="expert"/> into
        /// <see cref="Packed"/> and <see cref="PackedProducts"/>, records each vector's candidate bits in
        /// <see cref="Bits"/>, and returns how many there are. <paramref name="level"/> is
        /// <see cref="ScoreBound.Level"/> of the cutoff (taken once per pass: it is a logarithm).
        /// </summary>
        public int Pack(float* expert, in ScoreBound bound, Candidates which, float level) =>
            Counted(which == Candidates.Bounded ? PackBounded(new Float32Reader(expert), bound, level) : PackAll(expert, which == Candidates.All));

        /// <summary><see cref="Pack"/> of the bounded candidates of the task whose expert is
        /// <paramref name="source"/>, read straight from its memory (bfloat16 widened as it is read) where the
        /// chunk is whole vectors, else through <see cref="ExpertStaging"/>.</summary>
        public int PackBounded(CpuFloats source, in ScoreBound bound, float level) =>
            Counted(source.IsBFloat16 && IsWholeVectors(Count)
                ? PackBounded(BFloat16Reader.InPlace(source, Start), bound, level)
                : PackBounded(new Float32Reader(ReadRow(source, ExpertStaging)), bound, level));

        private int Counted(int found)
        {
            if (CountCandidates)
            {
                Interlocked.Add(ref Scored, found);
                Interlocked.Add(ref Offered, Count);
            }

            return found;
        }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private int PackBounded<TRow>(TRow expert, in ScoreBound bound, float level)
            where TRow : struct, IRowReader<TRow>
        {
            var packed = Packed;
            var products = PackedProducts;
            var bits = Bits;
            var total = Total;
            var bse = Base;
            var levels = Vector512.Create(level);
            var (low, high, scale) = bound.Vectors;
            nint found = 0, padded = Padded; // native-sized indices: no sign extension in the loop
            for (nint i = 0, v = 0; i < padded; i += Lanes, v++)
            {
                var t = expert.Load(i) - Vector512.Load(bse + i);
                var product = t * Vector512.Load(total + i);
                var mask = ~Vector512.LessThan(ScoreBound.Compute(t, product, low, high, scale), levels); // NaN: a candidate
                uint set = (uint)Vector512.ExtractMostSignificantBits(mask);
                bits[v] = (ushort)set;
                Avx512F.Compress(Vector512<float>.Zero, mask, t).Store(packed + found);
                Avx512F.Compress(Vector512<float>.Zero, mask, product).Store(products + found);
                found += BitOperations.PopCount(set);
            }

            return (int)found;
        }

        /// <summary>Packs every entry (<paramref name="all"/>) or none.</summary>
        private int PackAll(float* expert, bool all)
        {
            var bits = Bits;
            int vectors = Padded / Lanes;
            if (!all)
            {
                new Span<ushort>(bits, vectors).Clear();
                return 0;
            }

            var packed = Packed;
            var products = PackedProducts;
            var total = Total;
            for (int v = 0; v < vectors; v++)
            {
                int i = v * Lanes;
                var t = Tau(expert, i);
                t.Store(packed + i);
                (t * Vector512.Load(total + i)).Store(products + i);
                bits[v] = ushort.MaxValue;
            }

            return Padded;
        }

        /// <summary>Replaces the first <paramref name="found"/> packed task-vector entries by their exact scores.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Score(int found, in ScoreTerms<Vector512Lanes, Vector512<float>> terms)
        {
            for (int j = 0; j < found; j += Lanes)
            {
                _ = ScoreAt(j, terms);
            }
        }

        /// <summary>Replaces the 16 packed task-vector entries at <paramref name="j"/> by their exact scores,
        /// and returns them.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> ScoreAt(int j, in ScoreTerms<Vector512Lanes, Vector512<float>> terms)
        {
            var argument = terms.IntraArgument(Vector512.Load(Packed + j));
            var score = ScoreTerms<Vector512Lanes, Vector512<float>>.Score(argument, Vector512.Load(PackedProducts + j));
            score.Store(Packed + j);
            return score;
        }

        /// <summary>The packed values of vector <paramref name="i"/> (entries [i, i + 16)) put back in
        /// place, 0 where an entry is no candidate; <paramref name="taken"/> counts the packed values used.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> Unpack(int i, ref int taken)
        {
            uint set = Bits[i / Lanes];
            var values = Expand(MaskOf(set), Packed + taken);
            taken += BitOperations.PopCount(set);
            return values;
        }

        private float* Row(int r) => _scratch + ((long)r * RowFloats);

        /// <summary>This chunk's entries of <paramref name="source"/> as float32 whole vectors: in place for a
        /// whole float32 chunk, else widened or copied into <paramref name="staging"/> and zero-padded.</summary>
        private float* ReadRow(CpuFloats source, float* staging) => ReadPadded(source, Start, Count, Padded, staging);
    }

    /// <summary>
    /// A bound of one task's computed score exp(a)·tanh(p), a = n·minmax(clamp(|τ|))², in the log domain and
    /// without a division or an exponential: <see cref="Of"/> is below <see cref="Level"/>(c) only where the
    /// score is below c, for every cutoff c ≥ <see cref="MinCutoff"/>. With y = a·log₂e and q = min(p, 1),
    /// the score is at most 0 where p ≤ 0 and at most 2^y·q otherwise (the computed tanh(p) is at most
    /// min(p, 1) for p &gt; 0: the series rounds x − |x³|/3 + …, the float64 path a value below both). The
    /// bits of a float q &gt; 0 read as an integer, times 2^-23, are at least log₂q + 127 − 0.0861
    /// (log₂(1 + m) − m ≤ 0.0861 for m in [0, 1); subnormals too); those of a negative q read as a negative
    /// integer, which times 2^-23 is at most −129 + log₂|q| (−255 or less for −0 and subnormals): below
    /// every level for |p| &lt; 2^63, as y ≤ n·log₂e (a larger |p| only makes the entry a candidate), so the
    /// minimum is taken on the bits, as integers. So <see cref="Of"/> = y + bits(q)·2^-23 and
    /// <see cref="Level"/>(c) = log₂c + 127 − 0.0861 − 2^-10, whose 2^-10 is room for the rounding of y (a
    /// reciprocal here, a division in the score: a few ulp of a ≤ n), of the integer's conversion, of
    /// the exp (about 1 ulp) and of the product, which stays in the normal range for c ≥ 2^-100. NaN where
    /// τ or p is (or p is infinite), so such an entry is always a candidate. y is computed as the score
    /// computes minmax, clamp then subtract then scale, so its rounding stays relative: a multiply-add of |τ|
    /// and −low·k would err by about k·low·2^-24 absolute, beyond the room once low is hundreds of times
    /// high − low (clamp shares near one half allow that). Looser than the score by at most 2^0.087 ≈ 6%;
    /// about half the instructions of bounding exp(a) by a polynomial, as it did before.
    /// </summary>
    internal readonly struct ScoreBound
    {
        /// <summary>The smallest cutoff the bound serves (below it a pass scores every entry).</summary>
        public const float MinCutoff = 7.888609e-31f; // 2^-100

        private const double Room = 0.0860713320559342 + (1.0 / 1024);
        private readonly Vector512<float> _low, _high, _scale;

        public ScoreBound(in ScoreTerms<Vector512Lanes, Vector512<float>> terms)
        {
            (float low, float high, int experts) = terms.Parameters;
            _low = Vector512.Create(low);
            _high = Vector512.Create(high);
            // y = (√(n·log₂e)·minmax)², so one multiplication scales and normalises.
            _scale = Vector512.Create(high - low == 0 ? 0 : (float)(Math.Sqrt(experts * 1.4426950408889634) / ((double)high - low)));
        }

        /// <summary>The clamp bounds and the scale, for a loop that keeps them in registers
        /// (<see cref="Compute"/>).</summary>
        public (Vector512<float> Low, Vector512<float> High, Vector512<float> Scale) Vectors => (_low, _high, _scale);

        /// <summary>The level below which <see cref="Of"/> proves a score below <paramref name="cutoff"/>
        /// (≥ <see cref="MinCutoff"/>).</summary>
        public static float Level(float cutoff) => cutoff >= MinCutoff ? (float)(Math.Log2(cutoff) + 127 - Room) : float.NegativeInfinity;

        /// <summary>The bound of 16 entries of this task (loops take <see cref="Vectors"/> once and call
        /// <see cref="Compute"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> Of(Vector512<float> t, Vector512<float> product) => Compute(t, product, _low, _high, _scale);

        /// <summary><see cref="Of"/> of a task whose clamp bounds and scale are <see cref="Vectors"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Compute(Vector512<float> t, Vector512<float> product, Vector512<float> low, Vector512<float> high, Vector512<float> scale)
        {
            // The native min and max return their second operand where either is NaN: NaN stays NaN.
            var u = (ScoreTerms<Vector512Lanes, Vector512<float>>.Clamp(t, low, high) - low) * scale;
            var y = Vector512.FusedMultiplyAdd(u, u, product * Vector512<float>.Zero); // NaN where p is NaN or infinite
            var q = Vector512.Min(product.AsInt32(), Vector512.Create(0x3F800000)); // bits(min(p, 1)) for p ≥ 0; negative for p < 0
            return Vector512.FusedMultiplyAdd(Vector512.ConvertToSingle(q), Vector512.Create(1.1920929E-07f), y); // 2^-23
        }
    }

    /// <summary>Reads a row of one input 16 entries at a time as float32 (not to be confused with the
    /// selection's row element tags, <see cref="MergeLab.Selection.BFloat16Row"/> and its kin).</summary>
    /// <typeparam name="TSelf">The implementing reader type.</typeparam>
    private interface IRowReader<TSelf>
        where TSelf : IRowReader<TSelf>
    {
        /// <summary>The row of <paramref name="source"/> from entry <paramref name="start"/> on, read in place
        /// (the source has the reader's dtype).</summary>
        static abstract TSelf InPlace(CpuFloats source, long start);

        Vector512<float> Load(nint i);
    }

    /// <summary>Reads a float32 row in place.</summary>
    private readonly struct Float32Reader(float* first) : IRowReader<Float32Reader>
    {
        public float* First => first;

        public static Float32Reader InPlace(CpuFloats source, long start)
        {
            Debug.Assert(!source.IsBFloat16, "a float32 row of a bfloat16 source");
            return new((float*)source.Pointer + start);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> Load(nint i) => Vector512.Load(first + i);
    }

    /// <summary>Reads a bfloat16 row, widened as it is read (the bits shifted into a float32's high half).</summary>
    private readonly struct BFloat16Reader(ushort* first) : IRowReader<BFloat16Reader>
    {
        public static BFloat16Reader InPlace(CpuFloats source, long start)
        {
            Debug.Assert(source.IsBFloat16, "a bfloat16 row of a float32 source");
            return new((ushort*)source.Pointer + start);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector512<float> Load(nint i) => Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512UInt32(Vector256.Load(first + i)), 16).AsSingle();
    }

    /// <summary>Σ_k τ_k of the 16 entries at <paramref name="i"/> of <paramref name="n"/> experts' rows, whose
    /// base entries are <paramref name="bse"/>: 0 + τ_0 + τ_1 + …, in expert order, as libtorch's x.sum(0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> TaskVectorSum<TRow>(TRow* experts, int n, nint i, Vector512<float> bse)
        where TRow : unmanaged, IRowReader<TRow>
    {
        var sum = Vector512<float>.Zero;
        for (int k = 0; k < n; k++)
        {
            sum += experts[k].Load(i) - bse;
        }

        return sum;
    }

    /// <summary>The lanes of a 512-bit vector whose bits are set in <paramref name="set"/>, as a mask for an
    /// integer expand (which then takes it straight from the comparison; a float expand had it converted to a
    /// vector and back).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<uint> MaskOf(uint set)
    {
        var laneBits = Vector512.Create(1u, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768);
        return Vector512.Equals(Vector512.Create(set) & laneBits, laneBits);
    }

    /// <summary>The packed floats at <paramref name="packed"/> put in the lanes of <paramref name="mask"/>
    /// (<see cref="MaskOf"/>), in order, 0 elsewhere.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Expand(Vector512<uint> mask, float* packed) =>
        Avx512F.Expand(Vector512<uint>.Zero, mask, Vector512.Load((uint*)packed)).AsSingle();

    /// <summary>Which entries of a task a pass with score cutoff <paramref name="cutoff"/> must score, given
    /// the score range's width (<paramref name="range"/>, 1 where it plays no part) and the number of experts.</summary>
    private static Candidates Which(float cutoff, float range, int experts) =>
        range == 0 ? Candidates.None : cutoff >= ScoreBound.MinCutoff && range > 0 && experts <= MaxBoundedExperts ? Candidates.Bounded : Candidates.All;

    /// <summary>The most experts for which <see cref="ScoreBound"/>'s room for rounding holds (its a ≤ n,
    /// and the rounding of a·log₂e grows with a).</summary>
    private const int MaxBoundedExperts = 64;

    /// <summary><see cref="Merge"/> on AVX-512 CPUs, scoring only the entries whose score can exceed their
    /// task's threshold (the others get a factor of exactly 0, as their score would give them).</summary>
    private static Tensor MergeCandidates(FusedPipeline.Inputs inputs, Bounds bounds, float? lambda, ScalarType outputType, long[] shape, CandidateStore? store)
    {
        int n = inputs.Experts.Length;
        long d = inputs.Length;
        // The kept candidates serve where every task scores only its candidates (or none: a score range of
        // 0, every factor 0); those that score some must have kept the chunk.
        var which = Enumerable.Range(0, n).Select(k => Which(bounds.Threshold[k], bounds.Top[k] - bounds.Threshold[k], n)).ToArray();
        var kept = which.Contains(Candidates.All) ? null : store;
        var covered = Enumerable.Range(0, n).Where(k => which[k] == Candidates.Bounded).ToArray();
        long floats = CandidateChunk.ScratchFloats(n); // (n + 9) rows: more than MergeKept's six
        return CpuTensors.WriteKernelResult(shape, outputType, (address, bf16) =>
        {
            var levels = bounds.Threshold.Select(ScoreBound.Level).ToArray();
            var termsOf = Enumerable.Range(0, n).Select(k => new ScoreTerms<Vector512Lanes, Vector512<float>>(bounds.Low[k], bounds.High[k], n)).ToArray();
            var boundOf = termsOf.Select(t => new ScoreBound(t)).ToArray();
            CpuParallel.For(CpuParallel.BlockCount(d, Block), b =>
            {
                var scratch = (float*)ThreadScratch.Get(floats * sizeof(float));
                long end = Math.Min(d, (b + 1) * Block);
                for (long start = b * Block; start < end; start += CandidateChunk.Length)
                {
                    if (kept is not null && kept.Covers(start / CandidateChunk.Length, covered, bounds))
                    {
                        MergeKept(inputs, kept, covered, bounds, lambda, start, (int)Math.Min(CandidateChunk.Length, end - start), address, bf16, scratch);
                        continue;
                    }

                    var chunk = CandidateChunk.Read(inputs, start, (int)Math.Min(CandidateChunk.Length, end - start), scratch);
                    var num = chunk.Numerator;
                    var den = chunk.Denominator;
                    new Span<float>(num, chunk.Padded).Clear();
                    new Span<float>(den, chunk.Padded).Clear();
                    for (int k = 0; k < n; k++)
                    {
                        var threshold = Vector512.Create(bounds.Threshold[k]);
                        var top = Vector512.Create(bounds.Top[k]);
                        var width = Vector512.Create(bounds.Top[k] - bounds.Threshold[k]);
                        ref readonly var terms = ref termsOf[k];
                        var expert = chunk.Expert(k);
                        int found = chunk.Pack(expert, boundOf[k], which[k], levels[k]);
                        chunk.Score(found, terms);
                        var packed = chunk.Packed;
                        for (int j = 0; j < found; j += Lanes)
                        {
                            var score = Vector512.Load(packed + j);
                            Weight<Vector512Lanes, Vector512<float>>(score, threshold, top, width).Store(packed + j);
                        }

                        int taken = 0;
                        for (int i = 0; i < chunk.Padded; i += Lanes)
                        {
                            var t = chunk.Tau(expert, i);
                            var clamped = terms.SignedClamped(t);
                            var s = chunk.Unpack(i, ref taken);
                            (Vector512.Load(num + i) + (clamped * s)).Store(num + i);
                            (Vector512.Load(den + i) + s).Store(den + i);
                        }
                    }

                    AddBase(new Float32Reader(chunk.Base), num, den, chunk.Padded, lambda);
                    StorePairs(num, chunk.Start, chunk.Count, chunk.Padded, address, bf16, chunk.Staging);
                }
            });
        });
    }
}
