using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MergeLab.Selection;

namespace MergeLab.Methods;

/// <summary>
/// Per tensor, the score threshold's selection already scores exactly every entry whose bound reaches the
/// low end of its bracket, which lies at or below the threshold whenever the bracket holds it: then a
/// superset of the entries the merge must score (after a bracket miss the merge checks the cutoff and
/// scores again). <see cref="CandidateStore"/> keeps what that selection computed for them (which entries,
/// clamp(|τ|)·sign(τ) and the exact score), so the merge reads the base and the kept candidates instead
/// of every input again, and computes no bound, no exp and no tanh. A chunk the store could not keep (its
/// memory is bounded) is merged as before. The bits are the same either way: an entry left out has a
/// score below the threshold, so a factor of exactly 0, whose terms leave the sums unchanged.
/// </summary>
internal static unsafe partial class PcbKernel
{
    /// <summary>Whether the per-tensor merge keeps the selection's candidates (AVX-512 CPUs); false scores
    /// them again in the merge (for tests: both must give the same bits).</summary>
    internal static bool KeepCandidates { get; set; } = true;

    /// <summary>The most bytes a tensor's kept candidates take (a chunk beyond them is scored again by the
    /// merge): 512 MiB, which holds them for 8 experts of 4096×11008 at the default ratio (about 400 MiB).</summary>
    internal static long MaxKeptArenaBytes { get; set; } = 512L << 20;

    /// <summary>The arena size above which the candidates are written with non-temporal stores (16 MiB): an
    /// arena larger than the caches goes to memory anyway, and such stores spare reading each line first.
    /// Settable for tests.</summary>
    internal static long StreamingArenaBytes { get; set; } = 16L << 20;

    /// <summary>
    /// The candidates of one tensor's score threshold selection, per task and chunk of
    /// <see cref="CandidateChunk.Length"/> entries: each vector's candidate bits, and, packed in index order,
    /// clamp(|τ|)·sign(τ) and the exact score of each candidate, with the cutoff the selection packed them at.
    /// Its memory is bounded (<see cref="MaxKeptArenaBytes"/>); a chunk that does not fit is not kept.
    /// </summary>
    private sealed class CandidateStore : IDisposable
    {
        private const int VectorsPerChunk = CandidateChunk.Length / Lanes;

        /// <summary>The share of entries the arena holds beyond the kept share. The selection's candidates are
        /// those whose bound reaches the low end of the threshold's bracket, which the sample puts about 0.6%
        /// of the entries below the kept share from 2^24 entries on and about 2% at 2^18; with the bound's
        /// slack, 10.8% of each task at the default ratio of 0.1 in a 4096×11008 benchmark tensor.</summary>
        private const double Margin = 0.05;

        /// <summary>The most floats a thread reserves at a time (256 KiB).</summary>
        private const long SlabFloats = 1L << 16;

        [ThreadStatic]
        private static CandidateStore? _slabOwner;

        [ThreadStatic]
        private static long _slabNext, _slabEnd;

        private readonly int _experts;
        private readonly long _chunks;
        private readonly nint _table;
        private readonly nint _arena;
        private readonly long _capacity;
        private readonly long _slabFloats;
        private readonly bool _streaming;
        private long _used; // past _capacity for good once a slab did not fit (a failed add is not undone)

        /// <summary>A store for <paramref name="experts"/> tasks of <paramref name="length"/> entries, whose
        /// arena holds about <paramref name="ratio"/> + 5% of the entries (at most <see cref="MaxKeptArenaBytes"/>).</summary>
        public CandidateStore(int experts, long length, double ratio)
        {
            // The store indexes its slots by chunk.Start / CandidateChunk.Length, which needs every chunk the
            // selection and the merge hand it to start at a multiple of that length: their blocks must be
            // whole numbers of chunks. (Constants: the JIT folds this check away while it holds.)
            if (ExactSelector.BlockSize % CandidateChunk.Length != 0 || Block % CandidateChunk.Length != 0)
            {
                throw new InvalidOperationException("The selection's and the merge's blocks must be whole numbers of candidate chunks.");
            }

            _experts = experts;
            _chunks = CpuParallel.BlockCount(length, CandidateChunk.Length);
            long slots = experts * _chunks;
            // Two floats per candidate, each chunk's two rows rounded up to whole vectors.
            double share = Math.Min(1, ratio + Margin);
            long wanted = (long)(2 * share * experts * length) + (slots * Lanes);
            _capacity = Math.Max(Lanes, Math.Min(wanted, MaxKeptArenaBytes / sizeof(float)));
            // Small enough that the threads' last, partly used slabs leave most of the arena to the chunks; whole
            // vectors, so that every reservation (whole vectors too) starts on a vector of the aligned arena.
            _slabFloats = WholeVectors(Math.Clamp(_capacity / (16L * CpuParallel.Threads), CandidateChunk.RowFloats, SlabFloats));
            _streaming = _capacity * sizeof(float) > StreamingArenaBytes;
            _table = NativeBufferPool.Rent(slots * (sizeof(Slot) + (VectorsPerChunk * sizeof(ushort))));
            try
            {
                _arena = NativeBufferPool.Rent(_capacity * sizeof(float));
            }
            catch
            {
                NativeBufferPool.Return(_table);
                throw;
            }

            NativeMemory.Clear((void*)_table, (nuint)(slots * sizeof(Slot)));
        }

        private Slot* Slots => (Slot*)_table;

        private ushort* Bits => (ushort*)(Slots + (_experts * _chunks));

        /// <summary>
        /// Scores the <paramref name="found"/> packed candidates of task <paramref name="k"/> in
        /// <paramref name="chunk"/> (<see cref="CandidateChunk.ScoreAt"/>, into its packed row), and keeps them
        /// with clamp(|τ|)·sign(τ) and the chunk's candidate bits, packed at <paramref name="cutoff"/>, if they fit.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void ScoreAndKeep(int k, in CandidateChunk chunk, int found, in ScoreTerms<Vector512Lanes, Vector512<float>> terms, float cutoff)
        {
            long index = Index(k, chunk.Start / CandidateChunk.Length);
            var slot = Slots + index;
            slot->Kept = 0;
            long rounded = WholeVectors(found);
            long offset = found == 0 ? 0 : Reserve(2 * rounded);
            if (offset < 0)
            {
                chunk.Score(found, terms);
                return;
            }

            var values = (float*)_arena + offset;
            var packed = chunk.Packed;
            for (int j = 0; j < found; j += Lanes)
            {
                Put(terms.SignedClamped(Vector512.Load(packed + j)), values + j);
                Put(chunk.ScoreAt(j, terms), values + rounded + j);
            }

            long bytes = chunk.Padded / Lanes * sizeof(ushort);
            Buffer.MemoryCopy(chunk.Bits, Bits + (index * VectorsPerChunk), bytes, bytes);

            *slot = new Slot { Offset = offset, Found = found, Cutoff = cutoff, Kept = 1 };
        }

        /// <summary>Makes this thread's non-temporal writes visible to the merge, whichever thread reads them
        /// (they are weakly ordered): called once a thread has kept a run of chunks.</summary>
        public void Publish()
        {
            if (_streaming)
            {
                Sse.StoreFence();
            }
        }

        /// <summary>Writes <paramref name="value"/> at <paramref name="address"/> in the arena (a whole vector;
        /// non-temporal for a large arena, see <see cref="Publish"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private void Put(Vector512<float> value, float* address)
        {
            if (_streaming)
            {
                value.StoreAlignedNonTemporal(address);
            }
            else
            {
                value.StoreAligned(address);
            }
        }

        /// <summary>The arena offset of <paramref name="floats"/> floats from this thread's slab, a fresh slab
        /// when it is used up (the threads share one counter per slab, not per chunk), or −1 when the arena is
        /// full.</summary>
        private long Reserve(long floats)
        {
            if (_slabOwner != this || _slabNext + floats > _slabEnd)
            {
                if (Volatile.Read(ref _used) > _capacity)
                {
                    // Full: every further add would fail too, so the threads stop adding to the counter.
                    _slabOwner = null;
                    return -1;
                }

                long size = Math.Max(floats, _slabFloats);
                long start = Interlocked.Add(ref _used, size) - size;
                if (start + size > _capacity)
                {
                    _slabOwner = null;
                    return -1;
                }

                (_slabOwner, _slabNext, _slabEnd) = (this, start, start + size);
            }

            long offset = _slabNext;
            _slabNext += floats;
            return offset;
        }

        /// <summary>Whether each task of <paramref name="tasks"/> kept chunk <paramref name="chunk"/> at a cutoff
        /// no higher than its threshold (so the kept candidates hold all the merge needs).</summary>
        public bool Covers(long chunk, int[] tasks, Bounds bounds)
        {
            foreach (int k in tasks)
            {
                var slot = Slots + Index(k, chunk);
                if (slot->Kept == 0 || !(slot->Cutoff <= bounds.Threshold[k]))
                {
                    return false;
                }
            }

            return true;
        }

        /// <summary>Asks the CPU to load task <paramref name="k"/>'s kept candidates of chunk
        /// <paramref name="chunk"/> (if kept) into its caches. Each task's candidates are a short run in its
        /// own part of the arena, too short for the hardware prefetcher to find in time.</summary>
        public void Prefetch(int k, long chunk)
        {
            if (chunk >= _chunks)
            {
                return;
            }

            var slot = Slots + Index(k, chunk);
            if (slot->Kept == 0)
            {
                return;
            }

            long bytes = 2L * WholeVectors(slot->Found) * sizeof(float);
            var first = (byte*)((float*)_arena + slot->Offset);
            for (long offset = 0; offset < bytes; offset += 64)
            {
                Sse.Prefetch0(first + offset);
            }
        }

        /// <summary>Task <paramref name="k"/>'s kept candidates of chunk <paramref name="chunk"/>.</summary>
        public int Kept(int k, long chunk, out float* values, out float* scores, out ushort* bits)
        {
            long index = Index(k, chunk);
            var slot = Slots + index;
            long rounded = WholeVectors(slot->Found);
            values = (float*)_arena + slot->Offset;
            scores = values + rounded;
            bits = Bits + (index * VectorsPerChunk);
            return slot->Found;
        }

        /// <summary>Where task <paramref name="k"/>'s chunk <paramref name="chunk"/> lies in the slot table
        /// (and, times <see cref="VectorsPerChunk"/>, in the candidate bits).</summary>
        private long Index(int k, long chunk) => (k * _chunks) + chunk;

        public void Dispose()
        {
            NativeBufferPool.Return(_arena);
            NativeBufferPool.Return(_table);
        }

        [StructLayout(LayoutKind.Sequential)]
        private struct Slot
        {
            public long Offset;
            public int Found;
            public float Cutoff;
            public int Kept;
        }
    }

    /// <summary>How many chunks ahead <see cref="MergeKept"/> prefetches the kept candidates.</summary>
    private const int PrefetchAhead = 2;

    /// <summary>
    /// Merges the chunk of entries [<paramref name="start"/>, start + <paramref name="count"/>) from the base
    /// and the store's kept candidates of <paramref name="tasks"/> (those with a positive score range; the
    /// others have every factor 0, as the full merge's Candidates.None): task by task, the weights and
    /// weighted values are computed packed, then expanded into place and added to the sums, so each entry's
    /// sums take the tasks in expert order, as the full merge's do. <paramref name="scratch"/> holds six rows
    /// of <see cref="CandidateChunk.RowFloats"/>: the base (where it is staged), the numerators (then the
    /// results), the denominators, a staging row, and one task's weights and weighted values.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void MergeKept(FusedPipeline.Inputs inputs, CandidateStore store, int[] tasks, Bounds bounds, float? lambda, long start, int count, nint address, bool bf16, float* scratch)
    {
        int padded = WholeVectors(count);
        long rowFloats = CandidateChunk.RowFloats;
        var num = scratch + rowFloats;
        var den = scratch + (2 * rowFloats);
        var weights = scratch + (4 * rowFloats);
        var weighted = scratch + (5 * rowFloats);
        new Span<float>(num, padded).Clear();
        new Span<float>(den, padded).Clear();
        long chunk = start / CandidateChunk.Length;
        foreach (int k in tasks)
        {
            store.Prefetch(k, chunk + PrefetchAhead);
            int found = store.Kept(k, chunk, out var values, out var scores, out var bits);
            var threshold = Vector512.Create(bounds.Threshold[k]);
            var top = Vector512.Create(bounds.Top[k]);
            var width = Vector512.Create(bounds.Top[k] - bounds.Threshold[k]);
            for (int j = 0; j < found; j += Lanes)
            {
                var s = Weight<Vector512Lanes, Vector512<float>>(Vector512.Load(scores + j), threshold, top, width);
                s.Store(weights + j);
                (Vector512.Load(values + j) * s).Store(weighted + j);
            }

            AddExpanded(num, den, weighted, weights, bits, padded);
        }

        // A whole chunk of a bfloat16 base is widened as it is read, else the base is read (or staged) as float32.
        if (inputs.Base.IsBFloat16 && IsWholeVectors(count))
        {
            AddBase(BFloat16Reader.InPlace(inputs.Base, start), num, den, padded, lambda);
        }
        else
        {
            AddBase(new Float32Reader(ReadPadded(inputs.Base, start, count, padded, scratch)), num, den, padded, lambda);
        }

        StorePairs(num, start, count, padded, address, bf16, scratch + (3 * rowFloats));
    }

    /// <summary>Adds one task's packed <paramref name="weighted"/> values and <paramref name="weights"/>, put
    /// back in place by its candidate <paramref name="bits"/>, to <paramref name="num"/> and
    /// <paramref name="den"/> (<paramref name="padded"/> entries).</summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static void AddExpanded(float* num, float* den, float* weighted, float* weights, ushort* bits, nint padded)
    {
        nint taken = 0;
        for (nint i = 0, v = 0; i < padded; i += Lanes, v++)
        {
            uint set = bits[v];
            var mask = MaskOf(set);
            (Vector512.Load(num + i) + Expand(mask, weighted + taken)).Store(num + i);
            (Vector512.Load(den + i) + Expand(mask, weights + taken)).Store(den + i);
            taken += BitOperations.PopCount(set);
        }
    }

    /// <summary>Replaces each of the <paramref name="padded"/> numerators by θ_base + λ·num/max(den, 1e-12).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddBase<TRow>(TRow bse, float* num, float* den, nint padded, float? lambda)
        where TRow : struct, IRowReader<TRow>
    {
        for (nint i = 0; i < padded; i += Lanes)
        {
            Merged<Vector512Lanes, Vector512<float>>(Vector512.Load(num + i), Vector512.Load(den + i), bse.Load(i), lambda).Store(num + i);
        }
    }

    /// <summary>Stores a chunk's float32 results (<paramref name="padded"/> of them at <paramref name="values"/>)
    /// into the output by pairs of vectors, through <paramref name="staging"/> when the chunk is not whole
    /// pairs.</summary>
    private static void StorePairs(float* values, long start, int count, int padded, nint address, bool bf16, float* staging)
    {
        bool partial = count % (2 * Lanes) != 0;
        for (int i = 0; i < padded; i += 2 * Lanes)
        {
            var low = Vector512.Load(values + i);
            var high = i + Lanes < padded ? Vector512.Load(values + i + Lanes) : Vector512<float>.Zero;
            if (partial)
            {
                Vector512Lanes.Store(staging, bf16, i, low, high);
            }
            else
            {
                Vector512Lanes.Store((void*)address, bf16, start + i, low, high);
            }
        }

        if (partial)
        {
            long bytes = count * (bf16 ? 2L : 4L);
            Buffer.MemoryCopy(staging, (byte*)address + (start * (bf16 ? 2 : 4)), bytes, bytes);
        }
    }
}
