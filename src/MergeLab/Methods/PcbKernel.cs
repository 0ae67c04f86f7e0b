using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using MergeLab.Selection;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// PCB-Merging on CPU memory (float32 or bfloat16 inputs): the formulation of <see cref="PcbMerge"/> in
/// three passes over fixed blocks instead of about thirty libtorch operations over [n, d] temporaries.
/// <list type="number">
/// <item>the clamp bounds of each |τ_k| by exact selection straight from the inputs (per tensor), or the
/// whole-model statistic's;</item>
/// <item>per tensor, each row's score threshold and maximum by exact selection among the scores
/// exp(n·minmax(|τ̂_k|)²)·tanh(τ_k·Σ_j τ_j), computed block by block as the selection reads them, never
/// stored whole (with the whole model's thresholds known, this pass is skipped);</item>
/// <item>the merge: each block's scores computed again (or, per tensor on AVX-512 CPUs, taken from the
/// candidates the selection kept: PcbKernel.KeptCandidates.cs), τ̂_k·s_k and s_k summed in expert order,
/// divided, λ, plus the base, stored in the output dtype.</item>
/// </list>
/// Every operation other than exp and tanh is libtorch's, in libtorch's order, so with
/// <see cref="LibTorchTranscendentals"/> the result is bit for bit the libtorch formulation's; by default
/// exp and tanh are <see cref="SimdMath"/>'s (about 1 ulp, as libtorch's are), which makes the scores a
/// pass instead of the slowest part of the merge. On AVX-512 CPUs the selection and the merge score
/// exactly only the entries whose cheap bound reaches their cutoff (PcbKernel.Candidates.cs), with the
/// same bits. Results never depend on the thread count.
/// </summary>
internal static unsafe partial class PcbKernel
{
    private const int Block = FusedPipeline.Block;

    /// <summary>float32 lanes of a 512-bit vector, the width of the AVX-512 paths.</summary>
    private const int Lanes = 16;

    /// <summary><paramref name="count"/> rounded up to whole 512-bit vectors.</summary>
    private static int WholeVectors(int count) => (count + Lanes - 1) / Lanes * Lanes;

    /// <inheritdoc cref="WholeVectors(int)"/>
    private static long WholeVectors(long count) => (count + Lanes - 1) / Lanes * Lanes;

    /// <summary>Whether <paramref name="count"/> entries are whole 512-bit vectors, so that a chunk of them
    /// can be read (bfloat16 widened as it is read) or written in place instead of through a staging row.</summary>
    private static bool IsWholeVectors(long count) => count % Lanes == 0;

    /// <summary>Take exp and tanh from libtorch (the result is then bit-identical to the libtorch
    /// formulation on this machine), for tests.</summary>
    internal static bool LibTorchTranscendentals { get; set; }

    /// <summary>Merges <paramref name="group"/> into <paramref name="outputType"/>, or returns null when the
    /// kernel does not apply (not on the CPU, too many experts, no base).</summary>
    /// <param name="method">The method (its options and quantile ranks).</param>
    /// <param name="group">The tensor group.</param>
    /// <param name="whole">The completed whole-model statistic, or null for per-tensor scope.</param>
    /// <param name="outputType">The result's dtype.</param>
    public static Tensor? TryMerge(PcbMerge method, TensorGroup group, PcbStatistic? whole, ScalarType outputType)
    {
        using var inputs = FusedPipeline.Inputs.Acquire(group, needsBase: true);
        if (inputs is null)
        {
            return null;
        }

        long d = inputs.Length;
        var (low, high, threshold, top) = whole?.Values ?? default;

        // Per tensor, the selection's bracket pass scores a superset of the merge's candidates; kept, they
        // spare the merge a second read of every input (PcbKernel.KeptCandidates.cs). The store is taken
        // before the clamp quantiles' selection gives its buffers back, which would otherwise push the
        // store's memory (the pool's least recently returned) out of the pool between two tensors.
        bool buffered = LibTorchTranscendentals || ScoreBuffer;
        bool candidatesOnly = !buffered && ScoreCandidatesOnly;
        int n = inputs.Experts.Length;
        using var store = whole is null && candidatesOnly && KeepCandidates && n <= MaxBoundedExperts && ExactSelector.UsesBracketPass(d)
            ? new CandidateStore(n, d, method.Options.Ratio)
            : null;
        if (whole is null)
        {
            (low, high) = Quantiles(inputs, method.LowRank(d), method.HighRank(d));
        }

        // Per tensor, each row's threshold and maximum are selected among scores computed block by block
        // as the selection reads them; the merge then takes the kept candidates, or computes each block's
        // scores again. Only libtorch's exp and tanh (a whole-tensor operation) need the scores in an
        // [n, d] buffer.
        float[] maxima = [];
        using var scores = buffered ? Scores(inputs, low, high, out maxima) : null;
        if (whole is null)
        {
            (threshold, top) = scores is null
                ? ScoreQuantiles(new ScoreRows(inputs, low, high, store), method.ThresholdRank(d))
                : (RowValues(scores, method.ThresholdRank(d)), maxima);
        }

        var lambda = method.Options.Lambda;
        var bounds = new Bounds(low, high, threshold, top);
        float? factor = lambda == 1.0 ? null : (float)lambda;
        return candidatesOnly
            ? MergeCandidates(inputs, bounds, factor, outputType, group.Reference.shape, store)
            : Merge(inputs, bounds, scores, factor, outputType, group.Reference.shape);
    }

    /// <summary>Puts the scores in an [n, d] buffer, as with <see cref="LibTorchTranscendentals"/>, instead of
    /// computing them block by block where they are read (for tests: the results must be the same bits).</summary>
    internal static bool ScoreBuffer { get; set; }

    /// <summary>The scores of <paramref name="group"/> given each task's clamp bounds, as one signed key
    /// source per task over inputs that <paramref name="inputs"/> holds until disposed, or null when the
    /// kernel does not apply (or takes libtorch's exp and tanh, which the libtorch formulation has too).</summary>
    public static KeySource[]? TryScoreRows(TensorGroup group, float[] low, float[] high, out IDisposable? inputs)
    {
        var acquired = LibTorchTranscendentals ? null : FusedPipeline.Inputs.Acquire(group, needsBase: true);
        inputs = acquired;
        if (acquired is null)
        {
            return null;
        }

        var rows = new ScoreRows(acquired, low, high);
        return Enumerable.Range(0, acquired.Experts.Length).Select(rows.Row).ToArray();
    }

    /// <summary>Each task's score at the 1-based <paramref name="rank"/> and its maximum (NaN if any score
    /// is), selected exactly among the scores as <paramref name="rows"/> computes them.</summary>
    private static (float[] Threshold, float[] Top) ScoreQuantiles(ScoreRows rows, long rank)
    {
        int n = rows.Experts;
        var queries = new SelectionQuery[2 * n];
        for (int k = 0; k < n; k++)
        {
            var keys = rows.Row(k);
            queries[2 * k] = new SelectionQuery(keys, rank - 1);
            queries[(2 * k) + 1] = new SelectionQuery(keys, keys.Length - 1);
        }

        ExactSelector.Solve(queries);
        return (Values(queries, 0, signed: true), Values(queries, 1, signed: true));
    }

    /// <summary>Each task's |τ_k| at the 1-based ranks <paramref name="lowRank"/> and <paramref name="highRank"/>.</summary>
    private static (float[] Low, float[] High) Quantiles(FusedPipeline.Inputs inputs, long lowRank, long highRank)
    {
        var queries = inputs.Experts.SelectMany(e =>
        {
            var keys = new DifferenceMagnitudeKeys(e, inputs.Base);
            return new[] { new SelectionQuery(keys, lowRank - 1), new SelectionQuery(keys, highRank - 1) };
        }).ToArray();
        ExactSelector.Solve(queries);
        return (Values(queries, 0, signed: false), Values(queries, 1, signed: false));
    }

    /// <summary>Each score row's value at the 1-based <paramref name="rank"/>.</summary>
    private static float[] RowValues(Tensor scores, long rank)
    {
        long n = scores.shape[0], d = scores.shape[1];
        var floats = new CpuFloats(CpuTensors.Pointer(scores), n * d, bfloat16: false);
        var queries = new SelectionQuery[n];
        for (long k = 0; k < n; k++)
        {
            queries[k] = new SelectionQuery(new SignedKeys(floats.Slice(k * d, d)), rank - 1);
        }

        ExactSelector.Solve(queries);
        return queries.Select(q => FloatKeys.Value(q.Key, signed: true)).ToArray();
    }

    private static float[] Values(SelectionQuery[] pairs, int which, bool signed) =>
        Enumerable.Range(0, pairs.Length / 2).Select(k => FloatKeys.Value(pairs[(2 * k) + which].Key, signed)).ToArray();

    /// <summary>The [n, d] scores intra ⊙ inter in pooled memory, and each row's maximum.</summary>
    private static Tensor Scores(FusedPipeline.Inputs inputs, float[] low, float[] high, out float[] maxima)
    {
        int n = inputs.Experts.Length;
        long d = inputs.Length;
        bool libtorch = LibTorchTranscendentals;
        var scores = NativeBufferPool.Empty([n, d], ScalarType.Float32);
        var inter = libtorch ? NativeBufferPool.Empty([n, d], ScalarType.Float32) : null;
        long blocks = CpuParallel.BlockCount(d, Block);
        var blockMaxima = new float[blocks * n];
        try
        {
            var intraOut = (float*)CpuTensors.Pointer(scores);
            var interOut = inter is null ? null : (float*)CpuTensors.Pointer(inter);
            CpuParallel.For(blocks, b =>
            {
                var block = new BlockView(inputs, b, n, d, withTotal: true);
                for (int k = 0; k < n; k++)
                {
                    var rowMax = new Vector<float>(float.NegativeInfinity);
                    var terms = new ScoreTerms<VectorLanes, Vector<float>>(low[k], high[k], n);
                    var intraRow = block.Output(intraOut, k);
                    var interRow = interOut is null ? null : block.Output(interOut, k, second: true);
                    var tau = block.Tau(k);
                    for (int i = 0; i < block.Padded; i += Vector<float>.Count)
                    {
                        var t = *(Vector<float>*)(tau + i);
                        var intra = terms.IntraArgument(t);
                        var product = t * *(Vector<float>*)(block.Total + i);
                        if (interRow is null)
                        {
                            var score = ScoreTerms<VectorLanes, Vector<float>>.Score(intra, product);
                            *(Vector<float>*)(intraRow + i) = score;
                            rowMax = Vector.Max(rowMax, block.Valid(i, score)); // NaN propagates, as in amax
                        }
                        else
                        {
                            *(Vector<float>*)(intraRow + i) = intra;
                            *(Vector<float>*)(interRow + i) = product;
                        }
                    }

                    blockMaxima[(b * n) + k] = Max(rowMax);
                    block.Flush(intraOut, k, intraRow);
                    if (interRow is not null)
                    {
                        block.Flush(interOut, k, interRow);
                    }
                }
            });

            if (inter is not null)
            {
                scores.exp_().mul_(inter.tanh_());
                using var amax = scores.amax([1]);
                maxima = amax.data<float>().ToArray();
            }
            else
            {
                maxima = Enumerable.Range(0, n).Select(k => Enumerable.Range(0, (int)blocks).Select(b => blockMaxima[(b * n) + k]).Aggregate(float.NegativeInfinity, Math.Max)).ToArray();
            }

            return scores;
        }
        catch
        {
            scores.Dispose();
            throw;
        }
        finally
        {
            inter?.Dispose();
        }
    }

    /// <summary>Σ_k τ̂_k·s_k / max(Σ_k s_k, 1e-12), ·λ, + θ_base, in <paramref name="outputType"/>.</summary>
    private static Tensor Merge(FusedPipeline.Inputs inputs, Bounds bounds, Tensor? scores, float? lambda, ScalarType outputType, long[] shape)
    {
        int n = inputs.Experts.Length;
        long d = inputs.Length;
        var score = scores is null ? null : (float*)CpuTensors.Pointer(scores);
        return CpuTensors.WriteKernelResult(shape, outputType, (address, bf16) =>
        {
            var output = (void*)address;
            CpuParallel.For(CpuParallel.BlockCount(d, Block), b =>
            {
                var block = new BlockView(inputs, b, n, d, withTotal: score is null); // Σ τ only to compute scores
                var num = block.Accumulator(0);
                var den = block.Accumulator(1);
                for (int k = 0; k < n; k++)
                {
                    float range = bounds.Top[k] - bounds.Threshold[k];
                    var threshold = new Vector<float>(bounds.Threshold[k]);
                    var top = new Vector<float>(bounds.Top[k]);
                    var width = new Vector<float>(range);
                    var tau = block.Tau(k);
                    var row = score is null ? null : block.Input(score, k);
                    var terms = new ScoreTerms<VectorLanes, Vector<float>>(bounds.Low[k], bounds.High[k], n);
                    for (int i = 0; i < block.Padded; i += Vector<float>.Count)
                    {
                        var t = *(Vector<float>*)(tau + i);
                        var clamped = terms.SignedClamped(t);
                        var sc = row is null ? ScoreTerms<VectorLanes, Vector<float>>.Score(terms.IntraArgument(t), t * *(Vector<float>*)(block.Total + i)) : *(Vector<float>*)(row + i);
                        var s = range == 0 ? Vector<float>.Zero : Weight<VectorLanes, Vector<float>>(sc, threshold, top, width);
                        *(Vector<float>*)(num + i) += clamped * s;
                        *(Vector<float>*)(den + i) += s;
                    }
                }

                var merged = block.Destination(output, bf16, num);
                for (int i = 0; i < block.Padded; i += Vector<float>.Count)
                {
                    *(Vector<float>*)(merged + i) = Merged<VectorLanes, Vector<float>>(
                        *(Vector<float>*)(num + i), *(Vector<float>*)(den + i), *(Vector<float>*)(block.Base + i), lambda);
                }

                block.Store(output, bf16, merged);
            });
        });
    }

    /// <summary>The largest lane (NaN if any lane is NaN).</summary>
    private static float Max(Vector<float> v)
    {
        float max = float.NegativeInfinity;
        for (int i = 0; i < Vector<float>.Count; i++)
        {
            max = Math.Max(max, v[i]);
        }

        return max;
    }

    /// <summary>A score's weight s = minmax(clamp(score, threshold, top)) = (clamp − threshold)/width, as
    /// libtorch's clamp for threshold ≤ top, NaN staying NaN (the native x86 min and max return their
    /// second operand when either is NaN, so the score goes second).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static TV Weight<TL, TV>(TV score, TV threshold, TV top, TV width)
        where TL : struct, ISimdLanes<TV>
        where TV : unmanaged =>
        TL.Divide(TL.Subtract(TL.MinNative(top, TL.MaxNative(threshold, score)), threshold), width);

    /// <summary>θ_base + λ·Σ_k τ̂_k·s_k / max(Σ_k s_k, 1e-12) from the sums <paramref name="num"/> and
    /// <paramref name="den"/> (clamp_min keeps a NaN sum).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static TV Merged<TL, TV>(TV num, TV den, TV bse, float? lambda)
        where TL : struct, ISimdLanes<TV>
        where TV : unmanaged
    {
        var m = TL.Divide(num, TL.MaxNative(TL.Broadcast(1e-12f), den));
        if (lambda is { } l)
        {
            m = TL.Multiply(m, TL.Broadcast(l));
        }

        return TL.Add(bse, m);
    }

    /// <summary>One task's score terms at lane width <typeparamref name="TL"/>: the argument
    /// n·minmax(clamp(|τ|, low, high))² of intra-balancing's exp (a constant row's minmax being 0), and the
    /// score exp(·)·tanh(τ·Σ_j τ_j). Every width gives the same bits.</summary>
    internal readonly struct ScoreTerms<TL, TV>(float low, float high, int experts)
        where TL : struct, ISimdLanes<TV>
        where TV : unmanaged
    {
        private readonly TV _low = TL.Broadcast(low), _high = TL.Broadcast(high), _width = TL.Broadcast(high - low), _experts = TL.Broadcast((float)experts);
        private readonly bool _constant = high - low == 0;

        /// <summary>The clamp bounds and the number of experts.</summary>
        public (float Low, float High, int Experts) Parameters { get; } = (low, high, experts);

        /// <summary>|τ̂| = clamp(|τ|, low, high).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public TV ClampedMagnitude(TV t) => Clamp(t, _low, _high);

        /// <summary>clamp(|τ|, low, high) for given bounds (the bound loop keeps them in registers).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static TV Clamp(TV t, TV low, TV high) => TL.MinNative(high, TL.MaxNative(low, TL.Abs(t)));

        /// <summary>τ̂ = clamp(|τ|, low, high)·sign(τ), the value a task's weight multiplies.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public TV SignedClamped(TV t) => TL.Multiply(ClampedMagnitude(t), FusedPipeline.SignOf<TL, TV>(t));

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public TV IntraArgument(TV t)
        {
            var m = _constant ? TL.Zero : TL.Divide(TL.Subtract(ClampedMagnitude(t), _low), _width);
            return TL.Multiply(TL.Multiply(m, m), _experts);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static TV Score(TV intraArgument, TV product) =>
            TL.Multiply(SimdMath.Exp<TL, TV>(intraArgument), SimdMath.Tanh<TL, TV>(product));
    }

    /// <summary>
    /// The [n, d] scores of one tensor, never stored whole: a block's n rows are computed together (as the
    /// merge pass computes them, so the same bits) into the calling thread's cache, as signed keys. A
    /// selection that fills row 0, 1, …, n − 1 of a block in turn computes the block once. Where the
    /// selection asks for keys from a floor on (<see cref="KeySource.FillFrom"/>, as the whole-model
    /// histogram does) and the CPU has AVX-512, a row scores only its candidates instead, from the block's
    /// base and Σ_k τ_k cached the same way; where it only counts the keys below the floor
    /// (<see cref="KeySource.FillPacked"/>, as <see cref="ExactSelector"/>'s bracket pass does), the row
    /// writes only its candidates' keys, so the bracket pass classifies about a tenth of the entries.
    /// </summary>
    private sealed class ScoreRows(FusedPipeline.Inputs inputs, float[] low, float[] high, CandidateStore? store = null)
    {
        private static long _instances;

        [ThreadStatic]
        private static byte[]? _cache;

        [ThreadStatic]
        private static long _cachedOwner, _cachedStart;

        [ThreadStatic]
        private static int _cachedCount;

        [ThreadStatic]
        private static byte[]? _sums;

        [ThreadStatic]
        private static long _sumsOwner, _sumsStart;

        [ThreadStatic]
        private static int _sumsCount;

        // Never 0, which a thread's empty cache holds.
        private readonly long _id = Interlocked.Increment(ref _instances);

        /// <summary>Every input has the base's dtype (bfloat16 or float32), so whole chunks are summed in place.</summary>
        private readonly bool _oneDType = inputs.Experts.All(e => e.IsBFloat16 == inputs.Base.IsBFloat16);

        public int Experts => inputs.Experts.Length;

        public long Length => inputs.Length;

        public KeySource Row(int k) => new RowKeys(this, k);

        /// <summary>The keys of entries [start, start + count), row k at k·<paramref name="stride"/>, in this
        /// thread's cache (its own buffer: the selection that reads them holds the shared scratch).</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private uint* Compute(long start, int count, out int stride)
        {
            int n = Experts;
            stride = (count + Vector<float>.Count - 1) / Vector<float>.Count * Vector<float>.Count;
            long bytes = (((long)n * stride) + BlockView.ScratchFloats(n)) * sizeof(float);
            var keys = (uint*)ThreadScratch.Get(ref _cache, bytes, out bool fresh);
            if (!fresh && _cachedOwner == _id && _cachedStart == start && _cachedCount == count)
            {
                return keys;
            }

            var scratch = (float*)(keys + ((long)n * stride));
            for (long s = start; s < start + count; s += Block)
            {
                var block = new BlockView(inputs, s, (int)Math.Min(Block, start + count - s), n, inputs.Length, withTotal: true, scratch);
                for (int k = 0; k < n; k++)
                {
                    var terms = new ScoreTerms<VectorLanes, Vector<float>>(low[k], high[k], n);
                    var tau = block.Tau(k);
                    var row = keys + ((long)k * stride) + (s - start);
                    for (int i = 0; i < block.Padded; i += Vector<float>.Count)
                    {
                        var t = *(Vector<float>*)(tau + i);
                        var score = ScoreTerms<VectorLanes, Vector<float>>.Score(terms.IntraArgument(t), t * *(Vector<float>*)(block.Total + i));
                        *(Vector<uint>*)(row + i) = FloatKeys.Signed(score);
                    }
                }
            }

            (_cachedOwner, _cachedStart, _cachedCount) = (_id, start, count);
            return keys;
        }

        /// <summary>Row <paramref name="k"/> as a key source.</summary>
        private sealed class RowKeys(ScoreRows rows, int k) : KeySource
        {
            public override long Length => rows.Length;

            public override bool IsSigned => true;

            public override void Fill(long start, int count, uint* keys, float* scratch)
            {
                var computed = rows.Compute(start, count, out int stride);
                Buffer.MemoryCopy(computed + ((long)k * stride), keys, count * 4L, count * 4L);
            }

            public override uint KeyAt(long i) => rows.Compute(i, 1, out int stride)[(long)k * stride];

            public override int FillPacked(long start, int count, uint* keys, float* scratch, uint floor) =>
                Bounded(floor, out float cutoff) ? rows.FillCandidates(k, start, count, keys, cutoff, packed: true) : -1;

            public override void FillFrom(long start, int count, uint* keys, float* scratch, uint floor)
            {
                if (Bounded(floor, out float cutoff))
                {
                    _ = rows.FillCandidates(k, start, count, keys, cutoff);
                }
                else
                {
                    Fill(start, count, keys, scratch);
                }
            }

            /// <summary>Whether the row can score only the candidates at the <paramref name="floor"/>'s value
            /// (<paramref name="cutoff"/>).</summary>
            private bool Bounded(uint floor, out float cutoff)
            {
                cutoff = FloatKeys.Value(floor, signed: true);
                return ScoreCandidatesOnly && Which(cutoff, 1, rows.Experts) == Candidates.Bounded;
            }
        }

        /// <summary>Row <paramref name="k"/>'s keys of entries [start, start + count), exact where the score
        /// can reach <paramref name="cutoff"/> (&gt; 0) and 0 (below every such key) elsewhere; or, when
        /// <paramref name="packed"/>, only the exact ones, packed in index order. Returns how many keys it
        /// wrote.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private int FillCandidates(int k, long start, int count, uint* keys, float cutoff, bool packed = false)
        {
            int written = 0;
            var sums = Sums(start, count, out int stride, out var scratch);
            var terms = new ScoreTerms<Vector512Lanes, Vector512<float>>(low[k], high[k], Experts);
            var bound = new ScoreBound(terms);
            var keeping = packed ? store : null; // only a packed fill is the selection's bracket pass
            float level = ScoreBound.Level(cutoff);
            for (int offset = 0; offset < count; offset += CandidateChunk.Length)
            {
                var chunk = new CandidateChunk(start + offset, Math.Min(CandidateChunk.Length, count - offset), sums + offset, sums + stride + offset, scratch);
                int found = chunk.PackBounded(inputs.Experts[k], bound, level);
                if (keeping is not null)
                {
                    keeping.ScoreAndKeep(k, chunk, found, terms, cutoff);
                }
                else
                {
                    chunk.Score(found, terms);
                }

                var scores = chunk.Packed;
                for (int j = 0; j < found; j += Lanes)
                {
                    FloatKeys.Signed(Vector512.Load(scores + j)).Store((uint*)scores + j);
                }

                if (packed)
                {
                    Buffer.MemoryCopy(scores, keys + written, found * 4L, found * 4L);
                    written += found;
                    continue;
                }

                bool whole = IsWholeVectors(chunk.Count);
                var destination = whole ? keys + offset : (uint*)chunk.Staging;
                int taken = 0;
                for (int i = 0; i < chunk.Padded; i += Lanes)
                {
                    chunk.Unpack(i, ref taken).AsUInt32().Store(destination + i);
                }

                if (!whole)
                {
                    Buffer.MemoryCopy(destination, keys + offset, chunk.Count * 4L, chunk.Count * 4L);
                }

                written += chunk.Count;
            }

            keeping?.Publish();
            return written;
        }

        /// <summary>The base (at <paramref name="sums"/>) and Σ_k τ_k (at sums + <paramref name="stride"/>) of
        /// entries [start, start + count) (whole vectors), every input read in place as
        /// <typeparamref name="TRow"/> (bfloat16 widened as it is read): the values of
        /// <see cref="CandidateChunk.Read"/>, in the same order, without staging every expert.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void SumInPlace<TRow>(long start, int count, float* sums, int stride)
            where TRow : unmanaged, IRowReader<TRow>
        {
            int n = Experts;
            var experts = stackalloc TRow[n];
            for (int k = 0; k < n; k++)
            {
                experts[k] = TRow.InPlace(inputs.Experts[k], start);
            }

            var baseRow = TRow.InPlace(inputs.Base, start);
            var total = sums + stride;
            for (int i = 0; i < count; i += Lanes)
            {
                var b = baseRow.Load(i);
                b.Store(sums + i);
                TaskVectorSum(experts, n, i, b).Store(total + i);
            }
        }

        /// <summary>The base (at the result) and Σ_k τ_k (at the result + <paramref name="stride"/>) of entries
        /// [start, start + count) as float32, zero-padded to whole 512-bit vectors, in this thread's cache; and
        /// scratch for one candidate chunk.</summary>
        private float* Sums(long start, int count, out int stride, out float* scratch)
        {
            stride = (count + CandidateChunk.Length - 1) / CandidateChunk.Length * CandidateChunk.Length;
            long floats = (2L * stride) + CandidateChunk.ScratchFloats(Experts);
            var sums = (float*)ThreadScratch.Get(ref _sums, floats * sizeof(float), out bool fresh);
            scratch = sums + (2L * stride);
            if (!fresh && _sumsOwner == _id && _sumsStart == start && _sumsCount == count)
            {
                return sums;
            }

            if (IsWholeVectors(count) && _oneDType)
            {
                if (inputs.Base.IsBFloat16)
                {
                    SumInPlace<BFloat16Reader>(start, count, sums, stride);
                }
                else
                {
                    SumInPlace<Float32Reader>(start, count, sums, stride);
                }
            }
            else
            {
                for (int offset = 0; offset < count; offset += CandidateChunk.Length)
                {
                    var chunk = CandidateChunk.Read(inputs, start + offset, Math.Min(CandidateChunk.Length, count - offset), scratch);
                    Buffer.MemoryCopy(chunk.Base, sums + offset, chunk.Padded * 4L, chunk.Padded * 4L);
                    Buffer.MemoryCopy(chunk.Total, sums + stride + offset, chunk.Padded * 4L, chunk.Padded * 4L);
                }
            }

            (_sumsOwner, _sumsStart, _sumsCount) = (_id, start, count);
            return sums;
        }
    }

    /// <summary>Each task's clamp bounds, score threshold and score maximum.</summary>
    private sealed record Bounds(float[] Low, float[] High, float[] Threshold, float[] Top);

    /// <summary>
    /// One block of a pass in the calling thread's scratch: the base and every τ_k as float32 (zero-padded
    /// to whole vectors), Σ_k τ_k when asked for, two accumulators, and a staging row for a partial block's
    /// outputs.
    /// </summary>
    private readonly struct BlockView
    {
        private readonly float* _scratch;
        private readonly int _experts;
        private readonly float* _base;

        /// <summary>Block <paramref name="block"/> of the pass, in the calling thread's scratch.</summary>
        public BlockView(FusedPipeline.Inputs inputs, long block, int experts, long length, bool withTotal)
            : this(inputs, block * Block, (int)Math.Min(Block, length - (block * Block)), experts, length, withTotal,
                (float*)ThreadScratch.Get(ScratchFloats(experts) * sizeof(float)))
        {
        }

        /// <summary>Entries [<paramref name="start"/>, start + <paramref name="count"/>) (at most one block),
        /// in <paramref name="scratch"/> (<see cref="ScratchFloats"/> floats).</summary>
        public BlockView(FusedPipeline.Inputs inputs, long start, int count, int experts, long length, bool withTotal, float* scratch)
        {
            Start = start;
            Count = count;
            Padded = (Count + Vector<float>.Count - 1) / Vector<float>.Count * Vector<float>.Count;
            Length = length;
            _experts = experts;
            _scratch = scratch;
            _base = Read(inputs.Base, _scratch);
            var total = Total;
            if (withTotal)
            {
                new Span<float>(total, Padded).Clear();
            }

            for (int k = 0; k < experts; k++)
            {
                var tau = Tau(k);
                var expert = Read(inputs.Experts[k], tau);
                for (int i = 0; i < Padded; i += Vector<float>.Count)
                {
                    var t = *(Vector<float>*)(expert + i) - *(Vector<float>*)(_base + i);
                    *(Vector<float>*)(tau + i) = t;
                    if (withTotal)
                    {
                        *(Vector<float>*)(total + i) += t; // x.sum(0): 0 + τ_0 + τ_1 + …, in expert order
                    }
                }
            }
        }

        public long Start { get; }

        public int Count { get; }

        /// <summary>The scratch a view of <paramref name="experts"/> experts takes, in floats.</summary>
        public static long ScratchFloats(int experts) => (experts + 6L) * Block;

        /// <summary><see cref="Count"/> rounded up to whole vectors.</summary>
        public int Padded { get; }

        public long Length { get; }

        public float* Base => _base;

        /// <summary>Σ_k τ_k (only when the view was made with it).</summary>
        public float* Total => _scratch + Block;

        private bool Partial => Padded != Count;

        public float* Tau(int k) => _scratch + ((2L + k) * Block);

        /// <summary><paramref name="values"/> at entries [i, i + lanes), −∞ in the padding past the block's end.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Vector<float> Valid(int i, Vector<float> values) =>
            i + Vector<float>.Count <= Count ? values
                : Vector.ConditionalSelect(Vector.LessThan(new Vector<int>(i) + Vector<int>.Indices, new Vector<int>(Count)), values, new Vector<float>(float.NegativeInfinity));

        /// <summary>A zeroed accumulator row (0 or 1).</summary>
        public float* Accumulator(int which)
        {
            var row = _scratch + ((2L + _experts + which) * Block);
            new Span<float>(row, Padded).Clear();
            return row;
        }

        /// <summary>Where row <paramref name="k"/> of an [n, d] output is written: in place, or a staging
        /// row for a partial block (then <see cref="Flush"/> copies it).</summary>
        public float* Output(float* rows, int k, bool second = false) =>
            Partial ? _scratch + ((4L + _experts + (second ? 1 : 0)) * Block) : rows + (k * Length) + Start;

        public void Flush(float* rows, int k, float* written)
        {
            if (Partial)
            {
                Buffer.MemoryCopy(written, rows + (k * Length) + Start, Count * 4L, Count * 4L);
            }
        }

        /// <summary>Row <paramref name="k"/> of an [n, d] input, zero-padded for a partial block.</summary>
        public float* Input(float* rows, int k)
        {
            var source = rows + (k * Length) + Start;
            if (!Partial)
            {
                return source;
            }

            var staged = _scratch + ((4L + _experts) * Block);
            Buffer.MemoryCopy(source, staged, Count * 4L, Count * 4L);
            new Span<float>(staged + Count, Padded - Count).Clear();
            return staged;
        }

        /// <summary>Where the block's float32 result is computed: the float32 output itself for a whole
        /// block, else <paramref name="staging"/> (then <see cref="Store"/> narrows or copies it).</summary>
        public float* Destination(void* output, bool bf16, float* staging) =>
            bf16 || Partial ? staging : (float*)output + Start;

        /// <summary>Moves the block's float32 <paramref name="values"/> into the output where
        /// <see cref="Destination"/> did not write them in place.</summary>
        public void Store(void* output, bool bf16, float* values)
        {
            if (bf16)
            {
                Kernels.NarrowToBFloat16(values, (ushort*)output + Start, Count);
            }
            else if (values != (float*)output + Start)
            {
                Buffer.MemoryCopy(values, (float*)output + Start, Count * 4L, Count * 4L);
            }
        }

        private float* Read(CpuFloats source, float* staging) => ReadPadded(source, Start, Count, Padded, staging);
    }

    /// <summary>Entries [<paramref name="start"/>, start + <paramref name="count"/>) of <paramref name="source"/>
    /// as float32, zero-padded to <paramref name="padded"/>: in place for float32 when no padding is needed,
    /// else widened or copied into <paramref name="staging"/>.</summary>
    private static float* ReadPadded(CpuFloats source, long start, int count, int padded, float* staging)
    {
        var values = source.Block(start, count, staging);
        if (padded == count)
        {
            return values;
        }

        if (values != staging)
        {
            Buffer.MemoryCopy(values, staging, count * 4L, count * 4L);
        }

        new Span<float>(staging + count, padded - count).Clear();
        return staging;
    }
}
