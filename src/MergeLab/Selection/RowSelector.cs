using System.Diagnostics;
using System.Numerics;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Runtime.CompilerServices;

namespace MergeLab.Selection;

/// <summary>
/// Exact order statistics of one short row of keys (a row of a weight matrix, thousands of entries):
/// composites (key &lt;&lt; 32 | index in row) at given positions of the row's stable ascending sort.
/// One histogram of the keys (buckets monotone in the key) finds every position's bucket, one
/// vectorized pass gathers the entries of all target buckets (in row order), and a quickselect among a
/// bucket's few entries finds each entry (a bucket of copies of one key is counted in row order instead): O(row) per row, versus O(row·log row) for a sort.
/// For a series of similar rows, a <see cref="RowHint"/> from the previous row lets one bracketing pass
/// replace the histogram in most rows.
/// </summary>
/// <remarks>The buckets are fine (1/256 of an octave, at most 2048) over the top eight octaves of the
/// row, where the largest magnitudes that Breadcrumbs cuts live; every smaller key shares bucket 0. A
/// position that falls there is still exact, only slower (its bucket holds more entries). The
/// histogram is kept in two interleaved copies so that runs of equal keys (common in task vectors of
/// bfloat16 models) serialize less on one counter; both (16 KiB) stay in L1.</remarks>
internal static unsafe partial class RowSelector
{
    private const int Buckets = 2048 + 1;
    private const int Stride = (Buckets + 15) & ~15; // one copy of the histogram, whole vectors of any width
    private const int Copies = 2;
    private const int Octaves = 8;

    /// <summary>Scratch bytes a call with a row of <paramref name="width"/> needs.</summary>
    public static long ScratchBytes(long width) => Copies * Stride * 4L + ((width + 16) * 32L) + 64;

    /// <summary>
    /// Sets <paramref name="results"/>[i] to the composite at <paramref name="positions"/>[i] (ascending,
    /// each in [0, width)) of the row <paramref name="keys"/>.
    /// </summary>
    public static void Select(uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch) =>
        ByHistogram(keys, width, positions, results, scratch);

    /// <summary>
    /// As <see cref="Select(uint*, int, ReadOnlySpan{int}, Span{ulong}, byte*)"/>, for one of a series of
    /// similar rows (the rows of one task vector): <paramref name="hint"/>, left by the previous row, brackets
    /// each answer's key, and one pass over the row counts the keys below each bracket and those inside it,
    /// collecting them (over whole keys, a heavily repeated last answer, the bracket's pivot, is counted
    /// instead; over key halves, see <c>RowSelector.Halves.cs</c>, its copies are collected too). When
    /// every position's rank falls inside its bracket, the answer is found among those few entries;
    /// otherwise brackets from a sample of the row's own keys are tried (rows of 2,048 keys or more: over
    /// whole keys first those the sample's mean predicts, then those of the sample's order), and then the
    /// histogram path. After a miss, rows keep taking sampled brackets until the last answers'
    /// would do (rows whose scale changes from row to row, as in real task vectors). Either way the
    /// result is exact: the hint decides only the speed. The hint is then re-centred on this row's
    /// answers. The bracket pass needs AVX-512 (its collecting is a compress); without it, or for a hint
    /// without an owner, every row takes the histogram path.
    /// </summary>
    public static void Select(uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch, ref RowHint hint) =>
        Select(default(StoredRowKeys), keys, width, positions, results, scratch, ref hint);

    /// <summary>
    /// As <see cref="Select(uint*, int, ReadOnlySpan{int}, Span{ulong}, byte*, ref RowHint)"/>, with the
    /// row's keys read from <paramref name="source"/>: one computed from the row's inputs writes each key
    /// into <paramref name="keys"/> as the bracket pass reads it (or all of them first, when no bracket
    /// pass runs), so computing the keys costs no pass of its own. A pass over key halves writes none: after
    /// a row answered that way, <paramref name="keys"/> does not hold the row's keys.
    /// </summary>
    public static void Select<TKeys>(in TKeys source, uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch, ref RowHint hint)
        where TKeys : struct, IRowKeys
    {
        bool hinted = hint.Owner is not null && positions.Length is 1 or 2 && Vector512.IsHardwareAccelerated && Avx512F.IsSupported;
        if (hinted && hint.Valid && !hint.Sampling)
        {
            if (InBrackets(source, keys, width, positions, results, scratch, ref hint, out int collected, out bool wroteKeys))
            {
                hint.Hits++;

                // Brackets that collect half the row cost more than sampled ones.
                hint.Sampling = collected > width / 2 && width >= MinSampledWidth;
                return;
            }

            // A pass over whole keys wrote every key (one over halves wrote none): brackets from a sample
            // of them, and the next rows sampled too, until the last answers would bracket them again.
            if (!wroteKeys)
            {
                source.Fill(keys, width);
            }

            hint.Sampling = width >= MinSampledWidth;
            if (BySample(default(StoredRowKeys), keys, width, positions, results, scratch, ref hint, out _))
            {
                return;
            }
        }
        else if (hinted && hint.Valid)
        {
            if (BySample(source, keys, width, positions, results, scratch, ref hint, out bool scanned))
            {
                return;
            }

            if (!scanned)
            {
                source.Fill(keys, width);
            }
        }
        else
        {
            source.Fill(keys, width);
        }

        ByHistogram(keys, width, positions, results, scratch);
        if (hinted)
        {
            hint.Misses++;
            uint key0 = (uint)(results[0] >> 32), key1 = (uint)(results[positions.Length - 1] >> 32);
            int copies0 = CountEqual(keys, width, key0);
            int copies1 = positions.Length == 2 ? CountEqual(keys, width, key1) : copies0;
            if (!hint.Valid && positions.Length == 2 && positions[1] > positions[0] && key1 > key0
                && copies0 < KeyBracket.PivotCopies && copies1 < KeyBracket.PivotCopies)
            {
                // First row of distinct keys: brackets about 4·√width + 8 ranks wide each side, at the
                // density of keys between the two answers. (Repeated keys start from the narrowest.)
                double keysPerRank = (double)(key1 - key0) / (positions[1] - positions[0]);
                uint half = (uint)Math.Clamp(keysPerRank * ((4 * Math.Sqrt(width)) + 8), 1, KeyBracket.MaxHalfWidth);
                hint.First.Half = hint.Last.Half = half;
            }

            Recentre(ref hint.First, key0, copies0, 0, width);
            Recentre(ref hint.Last, key1, copies1, 0, width);
            hint.Valid = true;
        }
    }

    /// <summary>The histogram path: every position exact, from any row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ByHistogram(uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch)
    {
        var (min, max) = MinMax(keys, width);
        if (min == max)
        {
            for (int p = 0; p < positions.Length; p++)
            {
                results[p] = ((ulong)min << 32) | (uint)positions[p];
            }

            return;
        }

        // Bucket 0 holds keys below `low`; buckets 1.. split [low, max] evenly in key space (the keys of
        // floats of one sign are monotone in the value and logarithmic in it, so a bucket is a fixed
        // fraction of an octave).
        int shift = TopOctaves(min, max, 11, out uint low);
        int buckets = (int)((max - low) >> shift) + 2;
        int stride = (buckets + 15) & ~15;
        var counts = (int*)scratch;
        new Span<int>(counts, Copies * stride).Clear();
        var c0 = counts;
        var c1 = counts + stride;
        // Bucket numbers a vector at a time into `bucketOf` (L1), then counted into the two copies.
        var bucketOf = (int*)(scratch + Copies * Stride * 4L);
        var vlow = new Vector<uint>(low);
        var one = Vector<uint>.One;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var k = Vector.Load(keys + i);
            var above = Vector.GreaterThanOrEqual(k, vlow);
            var b = Vector.ShiftRightLogical(k - vlow, shift) + one;
            Vector.Store(Vector.AsVectorInt32(b & above), bucketOf + i);
        }

        for (; i < width; i++)
        {
            bucketOf[i] = keys[i] >= low ? (int)((keys[i] - low) >> shift) + 1 : 0;
        }

        for (i = 0; i <= width - 2; i += 2)
        {
            c0[bucketOf[i]]++;
            c1[bucketOf[i + 1]]++;
        }

        for (; i < width; i++)
        {
            c0[bucketOf[i]]++;
        }

        SumCopies(counts, stride, Copies);

        // Each position's bucket and the entries before it, walking from the nearer end.
        Span<int> target = stackalloc int[positions.Length];
        Span<int> before = stackalloc int[positions.Length];
        for (int p = 0; p < positions.Length; p++)
        {
            int position = positions[p];
            if (position < width / 2)
            {
                int bucket = 0, seen = 0;
                while (seen + counts[bucket] <= position)
                {
                    seen += counts[bucket++];
                }

                (target[p], before[p]) = (bucket, seen);
            }
            else
            {
                int bucket = buckets - 1, after = 0; // entries in buckets above `bucket`
                while (width - after - counts[bucket] > position)
                {
                    after += counts[bucket--];
                }

                (target[p], before[p]) = (bucket, width - after - counts[bucket]);
            }
        }

        // The distinct target buckets (positions ascend, so equal buckets are adjacent) as key ranges
        // [from, from + span], each gathered, in row order, into its own stretch of `candidates`.
        var candidates = (ulong*)(scratch + Copies * Stride * 4L); // over `bucketOf`, no longer needed
        Span<int> distinct = stackalloc int[positions.Length];
        Span<uint> from = stackalloc uint[positions.Length];
        Span<uint> span = stackalloc uint[positions.Length];
        Span<int> offset = stackalloc int[positions.Length + 1];
        int ranges = 0;
        offset[0] = 0;
        for (int p = 0; p < positions.Length; p++)
        {
            if (ranges > 0 && distinct[ranges - 1] == target[p])
            {
                continue;
            }

            int bucket = target[p];
            distinct[ranges] = bucket;
            if (bucket == 0)
            {
                (from[ranges], span[ranges]) = (0, low - 1);
            }
            else
            {
                ulong first = low + ((ulong)(bucket - 1) << shift);
                ulong last = Math.Min(uint.MaxValue, first + (1UL << shift) - 1);
                (from[ranges], span[ranges]) = ((uint)first, (uint)(last - first));
            }

            offset[ranges + 1] = offset[ranges] + counts[bucket];
            ranges++;
        }

        // A large bucket is usually copies of one key (task vectors of bfloat16 models take few distinct
        // values): a branch-free pass checks, and the wanted copy is then found by counting in row order
        // instead of gathering. The other buckets are gathered, all in one pass.
        Span<uint> single = stackalloc uint[ranges];
        Span<bool> isSingle = stackalloc bool[ranges];
        Span<int> pending = stackalloc int[ranges];
        int gathers = 0;
        for (int r = 0; r < ranges; r++)
        {
            isSingle[r] = offset[r + 1] - offset[r] > 32 && SingleKey(keys, width, from[r], span[r], out single[r]);
            if (!isSingle[r])
            {
                pending[gathers++] = r;
            }
        }

        if (gathers == 1)
        {
            int r = pending[0];
            GatherOne(keys, width, from[r], span[r], candidates + offset[r]);
        }
        else if (gathers > 1)
        {
            Gather(keys, width, ranges, from, span, offset, candidates);
        }

        int range = -1;
        for (int p = 0; p < positions.Length; p++)
        {
            if (range < 0 || distinct[range] != target[p])
            {
                range++;
            }

            int rank = positions[p] - before[p];
            if (isSingle[range])
            {
                results[p] = ((ulong)single[range] << 32) | (uint)Occurrence(keys, width, single[range], rank);
                continue;
            }

            var entries = new Span<ulong>(candidates + offset[range], offset[range + 1] - offset[range]);

            // Entries were gathered in row order: when they all share one key (ties, as in task vectors of
            // bfloat16 models) the stable order is the row order.
            results[p] = SingleKey(entries) ? entries[rank] : Quickselect.Select(entries, rank);
        }
    }

    /// <summary>The bracket path of <see cref="Select(uint*, int, ReadOnlySpan{int}, Span{ulong}, byte*, ref RowHint)"/>
    /// for one or two positions; false (no result set) when a position's rank lies outside its bracket.
    /// <paramref name="wroteKeys"/>: whether the pass read whole keys, and so wrote every key to <paramref name="keys"/>
    /// (a pass over key halves writes none).</summary>
    private static bool InBrackets<TKeys>(in TKeys source, uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch, ref RowHint hint,
        out int collected, out bool wroteKeys)
        where TKeys : struct, IRowKeys
    {
        wroteKeys = !ReadsHalves(source, width);
        if (!wroteKeys)
        {
            return InHalfBrackets(source, width, positions, results, scratch, ref hint, out collected);
        }

        int stretch = width + 16;
        var index0 = (uint*)(scratch + Copies * Stride * 4L);
        var index1 = index0 + stretch;
        var keys0 = index1 + stretch;
        var keys1 = keys0 + stretch;
        var composites = (ulong*)(keys1 + stretch);
        var shared = (uint*)composites; // the bracket pass's list for both brackets, done with before Pick reuses the space
        var (c0, c1) = Collect(source, keys, width, hint.First, hint.Last, index0, index1, keys0, keys1, shared, shared + stretch);
        int p0 = positions[0], p1 = positions[^1];
        collected = c0.Inside - c0.PivotCopies + c1.Inside - c1.PivotCopies;
        bool hit0 = Resolves(c0, p0), hit1 = Resolves(c1, p1);
        if (!hit0 || !hit1)
        {
            Widen(ref hint.First, hit0);
            Widen(ref hint.Last, hit1);
            return false;
        }

        ulong r0 = Pick(keys, width, hint.First, c0, index0, keys0, composites, p0 - c0.Below, out int copies0);
        ulong r1 = Pick(keys, width, hint.Last, c1, index1, keys1, composites, p1 - c1.Below, out int copies1);
        results[0] = r0;
        results[positions.Length - 1] = r1;
        Recentre(ref hint.First, (uint)(r0 >> 32), copies0, c0.Inside - c0.PivotCopies, width);
        Recentre(ref hint.Last, (uint)(r1 >> 32), copies1, c1.Inside - c1.PivotCopies, width);
        return true;
    }

    /// <summary>The most keys of a row's sample (<see cref="BySample"/>, <see cref="SampleOf"/>).</summary>
    private const int SampleSize = 1024;

    /// <summary>The narrowest row that is sampled (its sample, <see cref="SampleOf"/>, is a quarter of it at most).</summary>
    private const int MinSampledWidth = 2048;

    /// <summary>The keys of a row's sample: <see cref="SampleSize"/>, or for rows under 8,192 keys half as many, a
    /// quarter when the row is read in halves (a smaller sample costs less to take and order, and gives wider
    /// brackets, which cost a pass over halves only in its picks; whole keys need the half for the mean's
    /// prediction, <see cref="ScaledBrackets"/>).</summary>
    private static int SampleOf(int width, bool halves) => width >= 8192 ? SampleSize : halves ? SampleSize / 4 : SampleSize / 2;

    /// <summary>How many standard deviations of a sample quantile's rank a sampled bracket reaches each
    /// side (a row's rank falls outside with a chance of about 0.3%).</summary>
    private const double SampleReach = 3;

    /// <summary>
    /// The bracket path with brackets from the row's own keys instead of from the last answers, for rows
    /// whose answers jump too far from row to row: rows of real task vectors differ in scale, and their
    /// quantiles move by about half an octave from one row to the next. A sample of
    /// <see cref="SampleOf"/> keys (blocks of 16, evenly spread) gives each position's bracket: first, over
    /// whole keys, the one its mean predicts from the last rows' answers (<see cref="ScaledBrackets"/>),
    /// then, if that misses or is not known, the one its own order gives (<see cref="FromSample"/>). False
    /// when the row is too short for a sample, or a rank falls outside its bracket (then
    /// <paramref name="scanned"/> when the bracket pass read whole keys, and so wrote every key). Afterwards
    /// <paramref name="hint"/>'s brackets follow the answers at their own width, and the next row takes
    /// them again if they would have held this row's answers, no wider than the sample's.
    /// </summary>
    [SkipLocalsInit] // the sample is written before it is read; zeroing it cost as much as taking it
    private static bool BySample<TKeys>(in TKeys source, uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch, ref RowHint hint,
        out bool scanned)
        where TKeys : struct, IRowKeys
    {
        scanned = width >= MinSampledWidth;
        if (!scanned)
        {
            return false;
        }

        // Blocks of 16 consecutive keys, evenly spread over the row, each read (and so written) as the
        // bracket pass reads them.
        bool halves = ReadsHalves(source, width);
        int size = SampleOf(width, halves);
        var sample = stackalloc uint[SampleSize];
        for (int j = 0; j < size / 16; j++)
        {
            int at = (int)((long)j * width / (size / 16)) & ~15;
            source.Load16(keys, at).Store(sample + (16 * j));
        }

        // Over whole keys, first the brackets the sample's mean predicts (cheap), then those of the sample's
        // own order (exact ranks of the sample, dearer to find). Over halves only the latter: the answers of
        // bfloat16 task vectors jump among a few quantized values, so the mean predicts them too loosely
        // (about 10% where float32 rows give 2-3%), and a miss costs a pass.
        float mean = SampleMean(sample, size);
        var sampled = default(RowHint);
        int cost = 0;
        bool answered = false, stored = false;
        if (!halves && ScaledBrackets(hint, mean, out sampled.First, out sampled.Last))
        {
            stored = true; // a pass over whole keys writes every key, hit or miss
            cost = SampledInside(sample, size, sampled.First) + SampledInside(sample, size, sampled.Last);
            answered = InBrackets(source, keys, width, positions, results, scratch, ref sampled, out _, out scanned);
            hint.Halves += sampled.Halves;
            hint.Scaled += answered ? 1 : 0;
        }

        if (!answered)
        {
            // After a missed pass over whole keys, every key is in the buffer: read them there.
            sampled = default;
            cost = FromSample(sample, size, width, positions, halves, out sampled.First, out sampled.Last);
            answered = stored
                ? InBrackets(default(StoredRowKeys), keys, width, positions, results, scratch, ref sampled, out _, out scanned)
                : InBrackets(source, keys, width, positions, results, scratch, ref sampled, out _, out scanned);
            hint.Halves += sampled.Halves;
        }

        if (!answered)
        {
            return false;
        }

        Track(ref hint.FirstScale, mean, (uint)(results[0] >> 32));
        Track(ref hint.LastScale, mean, (uint)(results[positions.Length - 1] >> 32));

        // Would the last answers' brackets have held this row's answers, collecting at most an eighth of
        // the sample more (they need no sample)? Then the next row takes them; else they widen where they
        // missed, or halve where they held but were too wide.
        hint.Sampled++;
        bool held0 = Holds(hint.First, sampled.First.Pivot), held1 = Holds(hint.Last, sampled.Last.Pivot);
        int theirs = SampledInside(sample, size, hint.First) + SampledInside(sample, size, hint.Last);
        bool narrow = theirs <= cost + (size / 8);
        hint.Sampling = !(held0 && held1 && narrow);
        Widen(ref hint.First, held0);
        Widen(ref hint.Last, held1);
        if (held0 && held1 && !narrow)
        {
            hint.First.Half = Math.Max(1, hint.First.Half / 2);
            hint.Last.Half = Math.Max(1, hint.Last.Half / 2);
        }

        Follow(ref hint.First, sampled.First);
        Follow(ref hint.Last, sampled.Last);
        return true;
    }

    /// <summary>The mean of a sample's keys read as magnitudes (NaN when one is NaN, +∞ when one is infinite).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float SampleMean(uint* sample, int size)
    {
        var sum = Vector512<float>.Zero;
        for (int j = 0; j < size; j += 16)
        {
            sum += Vector512.Load(sample + j).AsSingle();
        }

        return Vector512.Sum(sum) / size;
    }

    /// <summary>The most a scaled bracket may reach either side of its prediction, as a natural logarithm
    /// (±16%): past it, the sample's own order gives narrower brackets. Float32 rows that differ in scale
    /// reach 6–9%; rows of bfloat16 task vectors, whose answers jump among a few quantized values, 30%.</summary>
    private const float MaxScaledReach = 0.15f;

    /// <summary>
    /// Brackets from the sample's <paramref name="mean"/> alone, for rows whose keys differ from row to row
    /// mostly by a scale (rows of one task vector do): each position's answer over the sample mean has
    /// been about the same from row to row (<see cref="ScaleTrack"/>), so this row's answer is predicted as
    /// that ratio times this row's mean, and the bracket reaches <see cref="ScaleTrack.Reach"/> either side.
    /// False when the ratios are not known yet, have strayed too far, or the mean is not a positive number.
    /// </summary>
    private static bool ScaledBrackets(in RowHint hint, float mean, out KeyBracket first, out KeyBracket last)
    {
        first = last = default;
        if (!(mean > 0 && float.IsFinite(mean)) || !hint.FirstScale.Valid || !hint.LastScale.Valid)
        {
            return false;
        }

        return Scaled(hint.FirstScale, mean, out first) && Scaled(hint.LastScale, mean, out last);

        static bool Scaled(in ScaleTrack track, float mean, out KeyBracket b)
        {
            b = default;
            float reach = track.Reach;
            double centre = mean * Math.Exp(track.LogRatio);
            float lo = (float)(centre * Math.Exp(-reach)), hi = (float)(centre * Math.Exp(reach));
            if (!(reach <= MaxScaledReach) || !float.IsNormal(lo) || !float.IsFinite(hi))
            {
                return false;
            }

            uint loKey = BitConverter.SingleToUInt32Bits(lo), hiKey = BitConverter.SingleToUInt32Bits(hi);
            b = new KeyBracket
            {
                Lo = loKey,
                Span = hiKey - loKey,
                Half = Math.Max(1, (hiKey - loKey) / 2),
            };
            return true;
        }
    }

    /// <summary>Updates a position's <see cref="ScaleTrack"/> with this row's sample mean and answer.</summary>
    private static void Track(ref ScaleTrack track, float mean, uint answer)
    {
        float value = BitConverter.UInt32BitsToSingle(answer);
        if (!(mean > 0 && float.IsFinite(mean)) || !float.IsNormal(value))
        {
            track = default; // a zero or non-finite answer has no ratio to follow
            return;
        }

        float logRatio = MathF.Log(value / mean);
        if (!track.Valid)
        {
            track = new ScaleTrack { Valid = true, LogRatio = logRatio, Variance = ScaleTrack.InitialVariance };
            return;
        }

        float error = logRatio - track.LogRatio;
        track.Variance += ScaleTrack.Rate * ((error * error) - track.Variance);
        track.LogRatio += ScaleTrack.Rate * error;
    }

    /// <summary>
    /// The sampled brackets of <see cref="BySample"/>. Each position's bracket runs between the sample's
    /// keys of rank <see cref="SampleReach"/> standard deviations of the sample quantile's rank either side
    /// of its expected rank; the key at the expected rank is its pivot when the sample holds it three times
    /// or more. The ranks' keys are exact: a histogram of the sample over 256 sub-buckets of its top
    /// <see cref="Octaves"/> octaves (smaller keys in one more) finds each rank's sub-bucket, whose few
    /// keys are then gathered and ordered. With <paramref name="edges"/> (for the pass over key halves, where a
    /// wider bracket costs only its pick, not its pass) a bracket's ends are the edges of their ranks'
    /// sub-buckets instead, and only the pivot is selected. Returns how many sample keys the brackets collect
    /// (as ranks: the same either way).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    [SkipLocalsInit] // every buffer is written before it is read (the counts are cleared), none zeroed on entry
    private static int FromSample(uint* sample, int size, int width, ReadOnlySpan<int> positions, bool edges, out KeyBracket first, out KeyBracket last)
    {
        var (min, max) = MinMax(sample, size);
        int shift = TopOctaves(min, max, 8, out uint low);
        var bucketOf = stackalloc uint[SampleSize];
        var vlow = Vector512.Create(low);
        for (int j = 0; j < size; j += 16)
        {
            var k = Vector512.Load(sample + j);
            var above = Vector512.GreaterThanOrEqual(k, vlow);
            ((Vector512.ShiftRightLogical(k - vlow, shift) + Vector512<uint>.One) & above).Store(bucketOf + j);
        }

        var counts = stackalloc int[4 * SampleBuckets];
        new Span<int>(counts, 4 * SampleBuckets).Clear();
        for (int j = 0; j < size; j += 4)
        {
            counts[bucketOf[j]]++;
            counts[SampleBuckets + (int)bucketOf[j + 1]]++;
            counts[(2 * SampleBuckets) + (int)bucketOf[j + 2]]++;
            counts[(3 * SampleBuckets) + (int)bucketOf[j + 3]]++;
        }

        SumCopies(counts, SampleBuckets, 4);

        // before[b]: the sample keys in the buckets below b, so that each rank's bucket is a binary search
        // (six ranks a row, each a walk over up to 257 buckets before).
        var before = counts + SampleBuckets;
        int run = 0;
        for (int b = 0; b < SampleBuckets; b++)
        {
            before[b] = run;
            run += counts[b];
        }

        before[SampleBuckets] = run;

        var gathered = stackalloc uint[SampleSize + 16];
        int cost = 0;
        first = Bracket(positions[0]);
        last = positions.Length == 1 ? first : Bracket(positions[^1]);
        return cost;

        KeyBracket Bracket(int position)
        {
            double q = (position + 0.5) / width, expected = q * size, reach = (SampleReach * Math.Sqrt(size * q * (1 - q))) + 1;
            int lowRank = (int)Math.Floor(expected - reach), highRank = (int)Math.Ceiling(expected + reach);
            int atRank = Math.Clamp((int)expected, 0, size - 1);
            uint lo = lowRank < 0 ? 0 : edges ? BucketEdge(lowRank, upper: false) : KeyOfRank(lowRank, out _);
            uint hi = highRank >= size ? uint.MaxValue : edges ? BucketEdge(highRank, upper: true) : KeyOfRank(highRank, out _);
            uint pivot = KeyOfRank(atRank, out int copies);
            bool hasPivot = copies >= 3;
            cost += Math.Min(highRank, size - 1) - Math.Max(lowRank, 0) + 1 - (hasPivot ? copies : 0);
            uint span = hi - lo;
            if (lo == 0 && span == uint.MaxValue)
            {
                span--; // a bracket from 0 must leave a key above it (see Excluded)
            }

            return new KeyBracket { Lo = lo, Span = span, Half = Math.Max(1, span / 2), HasPivot = hasPivot, Pivot = hasPivot ? pivot : lo };
        }

        // The sub-bucket holding the sample's key of `rank` (< size): the last b with before[b] <= rank.
        int BucketOf(int rank)
        {
            int lo = 0, hi = SampleBuckets; // before[lo] <= rank < before[hi]
            while (hi - lo > 1)
            {
                int mid = (lo + hi) >> 1;
                if (before[mid] <= rank)
                {
                    lo = mid;
                }
                else
                {
                    hi = mid;
                }
            }

            return lo;
        }

        // The first or last key of the sub-bucket holding the sample's key of `rank`.
        uint BucketEdge(int rank, bool upper)
        {
            int b = BucketOf(rank);
            if (b == 0)
            {
                return upper ? low - 1 : 0;
            }

            ulong from = low + ((ulong)(b - 1) << shift);
            return upper ? (uint)Math.Min(uint.MaxValue, from + (1UL << shift) - 1) : (uint)from;
        }

        // The sample's key of `rank` and how many sample keys equal it (within its sub-bucket, which holds them all).
        uint KeyOfRank(int rank, out int copies)
        {
            int b = BucketOf(rank);
            var wanted = Vector512.Create((uint)b);
            int n = 0;
            for (int j = 0; j < size; j += 16)
            {
                var m = Vector512.Equals(Vector512.Load(bucketOf + j), wanted);
                Avx512F.Compress(Vector512<uint>.Zero, m, Vector512.Load(sample + j)).Store(gathered + n);
                n += BitOperations.PopCount(m.ExtractMostSignificantBits());
            }

            var keysOfBucket = new Span<uint>(gathered, n);
            uint key = Quickselect.Select(keysOfBucket, rank - before[b]);
            copies = 0;
            foreach (uint k in keysOfBucket)
            {
                copies += k == key ? 1 : 0;
            }

            return key;
        }
    }

    /// <summary>How many of a sample's keys a bracket collects (inside it, other than its pivot).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int SampledInside(uint* sample, int size, in KeyBracket b)
    {
        var lo = Vector512.Create(b.Lo);
        var span = Vector512.Create(b.Span);
        var pivot = Vector512.Create(b.HasPivot ? b.Pivot : b.Lo - 1);
        int n = 0;
        for (int j = 0; j < size; j += 16)
        {
            var k = Vector512.Load(sample + j);
            n += BitOperations.PopCount(Vector512.AndNot(Vector512.LessThanOrEqual(k - lo, span), Vector512.Equals(k, pivot)).ExtractMostSignificantBits());
        }

        return n;
    }

    /// <summary>Whether a bracket holds <paramref name="key"/>.</summary>
    private static bool Holds(in KeyBracket b, uint key) => key - b.Lo <= b.Span;

    /// <summary>Centres a last answers' bracket, at its own half-width, on the answer a sampled bracket found.</summary>
    private static void Follow(ref KeyBracket b, in KeyBracket answered)
    {
        b.HasPivot = answered.HasPivot;
        b.Pivot = answered.Pivot;
        uint half = Math.Max(b.Half, KeyBracket.InitialHalfWidth);
        b.Lo = b.Pivot >= half ? b.Pivot - half : 0;
        b.Span = (uint)Math.Min(uint.MaxValue - (ulong)b.Lo, (ulong)b.Pivot - b.Lo + half);
    }

    /// <summary>What a bracket pass counted for one bracket: keys below it, inside it, and, with a pivot,
    /// those below the pivot and the pivot's copies.</summary>
    private readonly record struct BracketCount(int Below, int Inside, int BelowPivot, int PivotCopies);

    /// <summary>Whether the rank of <paramref name="position"/> falls inside the bracket.</summary>
    private static bool Resolves(BracketCount c, int position) => c.Below <= position && position < c.Below + c.Inside;

    /// <summary>One pass over the row with 512-bit vectors: for each bracket the keys below and inside it
    /// counted, and each key inside either bracket other than that bracket's pivot collected with its row
    /// index, in row order, by a compress (no branch per vector) into one list for both brackets; a short
    /// pass over that list then parts it into each bracket's own (two compresses per 16 keys of the row
    /// instead of four). The pivot's copies are what the bracket holds beyond those collected, and the
    /// keys below the pivot are those below the bracket plus the collected ones below it, counted
    /// afterwards among the few collected.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static (BracketCount First, BracketCount Last) Collect<TKeys>(in TKeys source, uint* keys, int width, in KeyBracket b0, in KeyBracket b1,
        uint* index0, uint* index1, uint* keys0, uint* keys1, uint* bothIndex, uint* bothKeys)
        where TKeys : struct, IRowKeys
    {
        var lo0 = Vector512.Create(b0.Lo);
        var span0 = Vector512.Create(b0.Span);
        uint out0 = Excluded(b0), out1 = Excluded(b1);
        var excluded0 = Vector512.Create(out0);
        var lo1 = Vector512.Create(b1.Lo);
        var span1 = Vector512.Create(b1.Span);
        var excluded1 = Vector512.Create(out1);
        Debug.Assert((ulong)b0.Lo + b0.Span <= uint.MaxValue && (ulong)b1.Lo + b1.Span <= uint.MaxValue, "Recentre keeps Lo + Span within uint");
        // lo ≤ k ≤ hi is the same test as k − lo ≤ span (which Tally and Part use) only because Lo + Span
        // does not wrap, which Recentre, the only place brackets are set, guarantees.
        var hi0 = Vector512.Create(b0.Lo + b0.Span);
        var hi1 = Vector512.Create(b1.Lo + b1.Span);
        var laneBits = Vector512.Create(1u, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15);
        var index = Vector512.Create(0u, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        var step = Vector512.Create(16u);
        var row = source; // a local copy the loop's stores cannot alias, so the JIT need not reload its fields after each store

        // Each compare goes straight to its 16-bit mask and the masks are combined as integers (the JIT
        // would otherwise widen each compare's mask register into a vector to combine them); the
        // collected lanes' mask is rebuilt from its bits by one compare. Counts are the masks' populations.
        int below0 = 0, below1 = 0, inside0 = 0, inside1 = 0, n = 0, i = 0;
        for (; i <= width - 16; i += 16)
        {
            var k = row.Load16(keys, i);
            uint lt0 = (uint)Vector512.LessThan(k, lo0).ExtractMostSignificantBits();
            uint lt1 = (uint)Vector512.LessThan(k, lo1).ExtractMostSignificantBits();
            uint in0 = (uint)Vector512.LessThanOrEqual(k, hi0).ExtractMostSignificantBits() & ~lt0;
            uint in1 = (uint)Vector512.LessThanOrEqual(k, hi1).ExtractMostSignificantBits() & ~lt1;
            uint either = (in0 & ~(uint)Vector512.Equals(k, excluded0).ExtractMostSignificantBits())
                | (in1 & ~(uint)Vector512.Equals(k, excluded1).ExtractMostSignificantBits());
            below0 += BitOperations.PopCount(lt0);
            below1 += BitOperations.PopCount(lt1);
            inside0 += BitOperations.PopCount(in0);
            inside1 += BitOperations.PopCount(in1);
            var collect = Vector512.Equals(Vector512.Create(either) & laneBits, laneBits);
            Avx512F.Compress(Vector512<uint>.Zero, collect, index).Store(bothIndex + n);
            Avx512F.Compress(Vector512<uint>.Zero, collect, k).Store(bothKeys + n);
            n += BitOperations.PopCount(either);
            index += step;
        }

        for (; i < width; i++)
        {
            uint key = row.Load1(keys, i);
            bool isIn0 = Tally(b0, out0, key, ref below0, ref inside0), isIn1 = Tally(b1, out1, key, ref below1, ref inside1);
            if (isIn0 || isIn1)
            {
                bothKeys[n] = key;
                bothIndex[n++] = (uint)i;
            }
        }

        int n0 = 0, n1 = 0, j = 0;
        for (; j <= n - 16; j += 16)
        {
            var k = Vector512.Load(bothKeys + j);
            var at = Vector512.Load(bothIndex + j);
            var in0 = Vector512.AndNot(Vector512.LessThanOrEqual(k - lo0, span0), Vector512.Equals(k, excluded0));
            var in1 = Vector512.AndNot(Vector512.LessThanOrEqual(k - lo1, span1), Vector512.Equals(k, excluded1));
            Avx512F.Compress(Vector512<uint>.Zero, in0, at).Store(index0 + n0);
            Avx512F.Compress(Vector512<uint>.Zero, in0, k).Store(keys0 + n0);
            Avx512F.Compress(Vector512<uint>.Zero, in1, at).Store(index1 + n1);
            Avx512F.Compress(Vector512<uint>.Zero, in1, k).Store(keys1 + n1);
            n0 += BitOperations.PopCount(in0.ExtractMostSignificantBits());
            n1 += BitOperations.PopCount(in1.ExtractMostSignificantBits());
        }

        for (; j < n; j++)
        {
            Part(b0, out0, bothKeys[j], bothIndex[j], index0, keys0, ref n0);
            Part(b1, out1, bothKeys[j], bothIndex[j], index1, keys1, ref n1);
        }

        return (Counted(b0, below0, inside0, keys0, n0), Counted(b1, below1, inside1, keys1, n1));
    }

    /// <summary>The key a bracket pass leaves out of a bracket's collected keys: its pivot, or, without
    /// one, a key just outside the bracket (so leaving it out removes nothing), and the pass has no
    /// branch on whether there is a pivot. Below the bracket when it starts above 0; above it otherwise,
    /// where its span is under 2²⁹ (<see cref="Recentre"/> sets it within twice a half-width of at most
    /// <see cref="KeyBracket.MaxHalfWidth"/>), so the key does not wrap around into it.</summary>
    private static uint Excluded(in KeyBracket b)
    {
        Debug.Assert(b.Lo > 0 || b.Span < uint.MaxValue, "a bracket from 0 leaves room above it");
        return b.HasPivot ? b.Pivot : b.Lo > 0 ? b.Lo - 1 : b.Lo + b.Span + 1;
    }

    /// <summary>Counts one key of <see cref="Collect"/>'s scalar tail against a bracket; true when it is
    /// to be collected for it (inside, and not its <see cref="Excluded"/> key).</summary>
    private static bool Tally(in KeyBracket b, uint excluded, uint key, ref int below, ref int inside)
    {
        bool isInside = key - b.Lo <= b.Span;
        below += key < b.Lo ? 1 : 0;
        inside += isInside ? 1 : 0;
        return isInside && key != excluded;
    }

    /// <summary>Appends one collected key of <see cref="Collect"/>'s shared list to a bracket's own list
    /// when it belongs there (inside, and not its <see cref="Excluded"/> key).</summary>
    private static void Part(in KeyBracket b, uint excluded, uint key, uint at, uint* outIndex, uint* outKeys, ref int n)
    {
        if (key - b.Lo <= b.Span && key != excluded)
        {
            outKeys[n] = key;
            outIndex[n++] = at;
        }
    }

    /// <summary>A bracket's counts from <see cref="Collect"/>'s: the pivot's copies are the keys inside
    /// not collected, and the keys below the pivot those below the bracket plus the collected ones below it.</summary>
    private static BracketCount Counted(in KeyBracket b, int below, int inside, uint* collectedKeys, int collected)
    {
        if (!b.HasPivot)
        {
            return new(below, inside, 0, 0);
        }

        var pivot = Vector512.Create(b.Pivot);
        var under = Vector512<uint>.Zero;
        int i = 0;
        for (; i <= collected - 16; i += 16)
        {
            under -= Vector512.LessThan(Vector512.Load(collectedKeys + i), pivot);
        }

        int underCount = (int)Vector512.Sum(under);
        for (; i < collected; i++)
        {
            underCount += collectedKeys[i] < b.Pivot ? 1 : 0;
        }

        return new(below, inside, below + underCount, inside - collected);
    }

    /// <summary>The composite of rank <paramref name="rank"/> among a bracket's entries (the pivot's copies,
    /// and the <paramref name="collectedKeys"/> at row indices <paramref name="collected"/>), and how many of
    /// them share its key.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    [SkipLocalsInit] // the histogram's copies in use are cleared below; the rest is never read
    private static ulong Pick(uint* keys, int width, in KeyBracket b, BracketCount c, uint* collected, uint* collectedKeys,
        ulong* composites, int rank, out int copies)
    {
        int count = c.Inside - c.PivotCopies;
        if (b.HasPivot)
        {
            // In sorted order: the collected keys below the pivot, the pivot's copies (in row order), the rest.
            int under = c.BelowPivot - c.Below;
            if (rank >= under && rank < under + c.PivotCopies)
            {
                copies = c.PivotCopies;
                return ((ulong)b.Pivot << 32) | (uint)Occurrence(keys, width, b.Pivot, rank - under, c.PivotCopies);
            }

            if (rank >= under)
            {
                rank -= c.PivotCopies;
            }
        }

        // A histogram of the collected keys over at most 256 sub-buckets of the bracket finds the wanted
        // entry's sub-bucket; only its few entries are then gathered, a vector at a time, and ordered.
        // Consecutive keys count into interleaved copies of the histogram, summed afterwards, so that runs
        // of one sub-bucket serialize less: four copies where the bracket has a pivot (repeated keys, as
        // in bfloat16 task vectors, where most collected keys fall in a few sub-buckets), else two.
        int shift = Math.Max(0, 32 - BitOperations.LeadingZeroCount(b.Span) - 8);
        int tables = b.HasPivot ? 4 : 2;
        var counts = stackalloc int[4 * SubBuckets];
        new Span<int>(counts, tables * SubBuckets).Clear();
        int second = SubBuckets, third = (tables - 2) * SubBuckets, fourth = third + SubBuckets;
        uint lo = b.Lo;
        int i = 0;
        for (; i <= count - 4; i += 4)
        {
            counts[(int)((collectedKeys[i] - lo) >> shift)]++;
            counts[second + (int)((collectedKeys[i + 1] - lo) >> shift)]++;
            counts[third + (int)((collectedKeys[i + 2] - lo) >> shift)]++;
            counts[fourth + (int)((collectedKeys[i + 3] - lo) >> shift)]++;
        }

        for (; i < count; i++)
        {
            counts[(int)((collectedKeys[i] - lo) >> shift)]++;
        }

        SumCopies(counts, SubBuckets, tables);

        int sub = 0;
        while (rank >= counts[sub])
        {
            rank -= counts[sub];
            sub++;
        }

        // The sub-bucket's keys and row indices, in row order, into the two halves of `composites`.
        var subKeys = (uint*)composites;
        var subIndex = subKeys + count + 16;
        var vlo = Vector512.Create(lo);
        var vsub = Vector512.Create((uint)sub);
        int n = 0;
        for (i = 0; i <= count - 16; i += 16)
        {
            var k = Vector512.Load(collectedKeys + i);
            var m = Vector512.Equals(Vector512.ShiftRightLogical(k - vlo, shift), vsub);
            Avx512F.Compress(Vector512<uint>.Zero, m, k).Store(subKeys + n);
            Avx512F.Compress(Vector512<uint>.Zero, m, Vector512.Load(collected + i)).Store(subIndex + n);
            n += BitOperations.PopCount(m.ExtractMostSignificantBits());
        }

        for (; i < count; i++)
        {
            if ((int)((collectedKeys[i] - lo) >> shift) == sub)
            {
                subKeys[n] = collectedKeys[i];
                subIndex[n++] = collected[i];
            }
        }

        // Composites of the gathered entries, after the keys and indices (count + 16 ulongs).
        var entries = new Span<ulong>(composites + count + 16, n);
        for (int j = 0; j < n; j++)
        {
            entries[j] = ((ulong)subKeys[j] << 32) | subIndex[j];
        }

        ulong result = SingleKey(entries) ? entries[rank] : Quickselect.Select(entries, rank);
        uint wanted = (uint)(result >> 32);
        copies = 0;
        foreach (ulong e in entries)
        {
            copies += (uint)(e >> 32) == wanted ? 1 : 0;
        }

        return result;
    }

    /// <summary>The smallest and largest of <paramref name="count"/> keys.</summary>
    private static (uint Min, uint Max) MinMax(uint* keys, int count) => MinMax(keys, count, 0, uint.MaxValue);

    /// <summary>The smallest and largest of the <paramref name="count"/> keys that lie in [<paramref name="from"/>,
    /// <paramref name="from"/> + <paramref name="span"/>] (uint.MaxValue and 0 when none does).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static (uint Min, uint Max) MinMax(uint* keys, int count, uint from, uint span)
    {
        var vfrom = new Vector<uint>(from);
        var vspan = new Vector<uint>(span);
        var low = new Vector<uint>(uint.MaxValue);
        var high = Vector<uint>.Zero;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= count - w; i += w)
        {
            var k = Vector.Load(keys + i);
            var inside = Vector.LessThanOrEqual(k - vfrom, vspan);
            low = Vector.Min(low, k | ~inside);
            high = Vector.Max(high, k & inside);
        }

        uint min = uint.MaxValue, max = 0;
        for (int lane = 0; lane < w; lane++)
        {
            min = Math.Min(min, low[lane]);
            max = Math.Max(max, high[lane]);
        }

        for (; i < count; i++)
        {
            if (keys[i] - from <= span)
            {
                min = Math.Min(min, keys[i]);
                max = Math.Max(max, keys[i]);
            }
        }

        return (min, max);
    }

    /// <summary>A histogram's range over keys [<paramref name="min"/>, <paramref name="max"/>]: its top
    /// <see cref="Octaves"/> octaves from <paramref name="low"/> (smaller keys go to a bucket of their own),
    /// split into at most 2^<paramref name="bits"/> buckets; returns the shift that takes a key's offset
    /// from <paramref name="low"/> to its bucket.</summary>
    private static int TopOctaves(uint min, uint max, int bits, out uint low)
    {
        low = max - min > Octaves << 23 ? max - (Octaves << 23) : min;
        return Math.Max(0, 32 - BitOperations.LeadingZeroCount(max - low) - bits);
    }

    /// <summary>Adds <paramref name="copies"/> interleaved copies of a histogram of <paramref name="stride"/>
    /// buckets (a whole number of vectors), one after another, into the first.</summary>
    private static void SumCopies(int* counts, int stride, int copies)
    {
        for (int b = 0; b < stride; b += Vector<int>.Count)
        {
            var sum = Vector.Load(counts + b);
            for (int c = 1; c < copies; c++)
            {
                sum += Vector.Load(counts + (c * stride) + b);
            }

            Vector.Store(sum, counts + b);
        }
    }

    /// <summary>The sub-buckets of <see cref="Pick"/>'s histogram: a key's offset in its bracket, shifted so that the
    /// bracket's span is below 2^8, is below 256.</summary>
    private const int SubBuckets = 256;

    /// <summary>The buckets of a row sample's histogram (<see cref="FromSample"/>): 256 and one for keys below them, to whole vectors.</summary>
    private const int SampleBuckets = (SubBuckets + 1 + 15) & ~15;

    /// <summary>Widens a bracket that missed (2× its half-width) and keeps it from being halved below that.</summary>
    private static void Widen(ref KeyBracket b, bool hit)
    {
        if (!hit)
        {
            b.Half = Math.Min(KeyBracket.MaxHalfWidth, Math.Max(b.Half, KeyBracket.InitialHalfWidth) * 2);
            b.Floor = b.Half;
        }
    }

    /// <summary>Centres a bracket on <paramref name="key"/>, this row's answer, which has
    /// <paramref name="copies"/> copies in the row of <paramref name="width"/>; <paramref name="collected"/>
    /// is how many keys the bracket collected. A key with many copies becomes the bracket's pivot.</summary>
    private static void Recentre(ref KeyBracket b, uint key, int copies, int collected, int width)
    {
        if (b.Half == 0)
        {
            b.Half = KeyBracket.InitialHalfWidth;
        }
        else if (collected > width / 16 && b.Half / 2 >= b.Floor)
        {
            b.Half = Math.Max(1, b.Half / 2);
        }

        b.HasPivot = copies >= KeyBracket.PivotCopies;
        b.Pivot = key;
        b.Lo = key >= b.Half ? key - b.Half : 0;
        b.Span = (uint)Math.Min(uint.MaxValue - (ulong)b.Lo, (ulong)key - b.Lo + b.Half);
    }

    /// <summary>How many keys of the row equal <paramref name="key"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int CountEqual(uint* keys, int width, uint key)
    {
        var vkey = new Vector<uint>(key);
        var copies = Vector<uint>.Zero;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            copies -= Vector.Equals(Vector.Load(keys + i), vkey);
        }

        long count = Vector.Sum(copies);
        for (; i < width; i++)
        {
            count += keys[i] == key ? 1 : 0;
        }

        return (int)count;
    }

    /// <summary>Whether every key in [from, from + span] (at least one) is the same, and which.</summary>
    private static bool SingleKey(uint* keys, int width, uint from, uint span, out uint key)
    {
        (key, uint max) = MinMax(keys, width, from, span);
        return key == max;
    }

    /// <summary>As <see cref="Occurrence(uint*, int, uint, int)"/> when the row holds <paramref name="copies"/>
    /// copies of <paramref name="key"/>: a wanted copy in the second half of them is found from the row's end.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Occurrence(uint* keys, int width, uint key, int occurrence, int copies)
    {
        if (2 * occurrence < copies || !Vector512.IsHardwareAccelerated)
        {
            return Occurrence(keys, width, key, occurrence);
        }

        int fromEnd = copies - 1 - occurrence;
        int i = width;
        for (; (i & 15) != 0; i--)
        {
            if (keys[i - 1] == key && fromEnd-- == 0)
            {
                return i - 1;
            }
        }

        var wide = Vector512.Create(key);
        for (; i >= 16; i -= 16)
        {
            ulong bits = Vector512.Equals(Vector512.Load(keys + i - 16), wide).ExtractMostSignificantBits();
            int here = BitOperations.PopCount(bits);
            if (fromEnd < here)
            {
                int fromStart = here - 1 - fromEnd;
                _ = Among(bits, ref fromStart, out int at);
                return i - 16 + at;
            }

            fromEnd -= here;
        }

        throw new InvalidOperationException("Row selection lost a tie.");
    }

    /// <summary>The row index of occurrence <paramref name="occurrence"/> (0-based, in row order) of <paramref name="key"/>.</summary>
    /// <remarks>With 512-bit vectors, 16 keys a step: each compare's mask counts the copies, and the step
    /// holding the wanted one finds it among the mask's bits (its one taken branch is the last). Otherwise
    /// copies are counted branch-free a block of eight vectors at a time (when dense they would make a
    /// per-vector branch unpredictable); only the block holding the wanted copy is scanned.</remarks>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Occurrence(uint* keys, int width, uint key, int occurrence)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            // 16 keys a step: the copies in each counted from the compare's mask, the wanted one found
            // among the mask's bits.
            var wide = Vector512.Create(key);
            for (; i <= width - 16; i += 16)
            {
                if (Among(Vector512.Equals(Vector512.Load(keys + i), wide).ExtractMostSignificantBits(), ref occurrence, out int at))
                {
                    return i + at;
                }
            }
        }

        var vkey = new Vector<uint>(key);
        int w = Vector<uint>.Count;
        int block = 8 * w;
        for (; i <= width - block; i += block)
        {
            var copies = Vector<uint>.Zero;
            for (int v = 0; v < 8; v++)
            {
                copies -= Vector.Equals(Vector.Load(keys + i + v * w), vkey);
            }

            int here = (int)Vector.Sum(copies);
            if (occurrence < here)
            {
                break;
            }

            occurrence -= here;
        }

        for (; i <= width - w; i += w)
        {
            if (Among(Kernels.LaneBits(Vector.Equals(Vector.Load(keys + i), vkey)), ref occurrence, out int at))
            {
                return i + at;
            }
        }

        for (; i < width; i++)
        {
            if (keys[i] == key && occurrence-- == 0)
            {
                return i;
            }
        }

        throw new InvalidOperationException("Row selection lost a tie.");
    }

    /// <summary>One step of <see cref="Occurrence(uint*, int, uint, int)"/>: whether copy <paramref name="occurrence"/> is among
    /// the step's copies, the set <paramref name="bits"/>; if so its lane in <paramref name="at"/>, else the
    /// step's copies are taken off <paramref name="occurrence"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool Among(ulong bits, ref int occurrence, out int at)
    {
        int here = BitOperations.PopCount(bits);
        if (occurrence >= here)
        {
            occurrence -= here;
            at = 0;
            return false;
        }

        for (; occurrence > 0; occurrence--)
        {
            bits &= bits - 1;
        }

        at = BitOperations.TrailingZeroCount(bits);
        return true;
    }

    /// <summary>Whether every composite has the same key (high 32 bits).</summary>
    private static bool SingleKey(Span<ulong> entries)
    {
        ulong key = entries[0] >> 32;
        foreach (ulong c in entries)
        {
            if (c >> 32 != key)
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>Appends at <paramref name="output"/> the composite (key, index) of each lane set in
    /// <paramref name="bits"/> of the vector at <paramref name="i"/>, in lane order; returns the new end.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong* Emit(ulong bits, uint* keys, int i, ulong* output)
    {
        while (bits != 0)
        {
            int lane = BitOperations.TrailingZeroCount(bits);
            bits &= bits - 1;
            *output++ = ((ulong)keys[i + lane] << 32) | (uint)(i + lane);
        }

        return output;
    }

    /// <summary>Collects the composites of the keys in [from, from + span], in row order.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void GatherOne(uint* keys, int width, uint from, uint span, ulong* candidates)
    {
        var vfrom = new Vector<uint>(from);
        var vspan = new Vector<uint>(span);
        var output = candidates;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var inside = Vector.LessThanOrEqual(Vector.Load(keys + i) - vfrom, vspan);
            if (inside != Vector<uint>.Zero)
            {
                output = Emit(Kernels.LaneBits(inside), keys, i, output);
            }
        }

        for (; i < width; i++)
        {
            if (keys[i] - from <= span)
            {
                *output++ = ((ulong)keys[i] << 32) | (uint)i;
            }
        }
    }

    /// <summary>Collects the composites of the keys in each range r ([from[r], from[r] + span[r]],
    /// disjoint) at candidates + offset[r] on, in row order, in one pass.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Gather(uint* keys, int width, int ranges, Span<uint> from, Span<uint> span, Span<int> offset, ulong* candidates)
    {
        if (ranges > 2)
        {
            for (int r = 0; r < ranges; r++)
            {
                GatherOne(keys, width, from[r], span[r], candidates + offset[r]);
            }

            return;
        }

        var out0 = candidates + offset[0];
        var out1 = candidates + offset[1];
        var vfrom0 = new Vector<uint>(from[0]);
        var vspan0 = new Vector<uint>(span[0]);
        var vfrom1 = new Vector<uint>(from[1]);
        var vspan1 = new Vector<uint>(span[1]);
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var k = Vector.Load(keys + i);
            var in0 = Vector.LessThanOrEqual(k - vfrom0, vspan0);
            var in1 = Vector.LessThanOrEqual(k - vfrom1, vspan1);
            if ((in0 | in1) != Vector<uint>.Zero)
            {
                out0 = Emit(Kernels.LaneBits(in0), keys, i, out0);
                out1 = Emit(Kernels.LaneBits(in1), keys, i, out1);
            }
        }

        uint from0 = from[0], span0 = span[0], from1 = from[1], span1 = span[1];
        for (; i < width; i++)
        {
            uint key = keys[i];
            if (key - from0 <= span0)
            {
                *out0++ = ((ulong)key << 32) | (uint)i;
            }
            else if (key - from1 <= span1)
            {
                *out1++ = ((ulong)key << 32) | (uint)i;
            }
        }
    }
}

/// <summary>Where <see cref="RowSelector"/>'s bracket pass reads a row's keys: the key buffer itself, or
/// the row's inputs, each key then written to the buffer as it is read (a pass over key halves,
/// <see cref="HasHalves"/>, writes none).</summary>
internal unsafe interface IRowKeys
{
    /// <summary>Keys [<paramref name="i"/>, <paramref name="i"/> + 16), written to
    /// <paramref name="keys"/> + <paramref name="i"/> first when computed.</summary>
    Vector512<uint> Load16(uint* keys, int i);

    /// <summary>Key <paramref name="i"/>, written to <paramref name="keys"/>[<paramref name="i"/>] first when computed.</summary>
    uint Load1(uint* keys, int i);

    /// <summary>Writes the row's <paramref name="width"/> keys to <paramref name="keys"/> (nothing when they are there).</summary>
    void Fill(uint* keys, int width);

    /// <summary>Whether the source gives its keys in halves (<see cref="Halves32"/>), for the bracket pass over
    /// top halves (see <c>RowSelector.Halves.cs</c>).</summary>
    bool HasHalves { get; }

    /// <summary>The top 16 bits of keys [<paramref name="i"/>, <paramref name="i"/> + 32), in row order, and their
    /// bottom 16 bits in <paramref name="bottoms"/>; nothing is written. Only when <see cref="HasHalves"/>.</summary>
    Vector512<ushort> Halves32(int i, out Vector512<ushort> bottoms);

    /// <summary>Key <paramref name="i"/>, computed (or read) without writing it anywhere.</summary>
    uint Key(int i);
}

/// <summary>Keys already in the key buffer.</summary>
internal readonly unsafe struct StoredRowKeys : IRowKeys
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector512<uint> Load16(uint* keys, int i) => Vector512.Load(keys + i);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public uint Load1(uint* keys, int i) => keys[i];

    public void Fill(uint* keys, int width)
    {
    }

    /// <summary>False: stored keys are read whole.</summary>
    public bool HasHalves => false;

    /// <summary>Not used: <see cref="HasHalves"/> is false.</summary>
    public Vector512<ushort> Halves32(int i, out Vector512<ushort> bottoms) => throw new NotSupportedException("Stored keys are read whole.");

    /// <summary>Not used: stored keys are read from the key buffer.</summary>
    public uint Key(int i) => throw new NotSupportedException("Stored keys are read from the key buffer.");
}

/// <summary>The element type of an expert's row read by <see cref="DifferenceRowKeys{TElement}"/>, fixed
/// at compile time so the bracket pass has no branch on it.</summary>
internal interface IRowElement
{
    /// <summary>bfloat16 (true) or float32 (false).</summary>
    static abstract bool IsBFloat16 { get; }
}

/// <summary>Rows of bfloat16.</summary>
internal readonly struct BFloat16Row : IRowElement
{
    /// <inheritdoc />
    public static bool IsBFloat16 => true;
}

/// <summary>Rows of float32.</summary>
internal readonly struct Float32Row : IRowElement
{
    /// <inheritdoc />
    public static bool IsBFloat16 => false;
}

/// <summary>The keys |expert − base| of one row (<see cref="FloatKeys.Magnitude"/> of the float32
/// difference, as <see cref="DifferenceMagnitudeKeys"/> gives them), from the expert's row
/// (of <typeparamref name="TElement"/>) and the base row already in float32.
/// As the bracket pass reads the row it prefetches the same stretch one row further on (the expert's next
/// row, read by the next row's pass, when rows are contiguous; past a last row, prefetch does not fault)
/// into the second-level cache: the next pass then finds its inputs in cache instead of waiting on memory
/// at each new page.</summary>
internal readonly unsafe struct DifferenceRowKeys<TElement> : IRowKeys
    where TElement : struct, IRowElement
{
    private readonly byte* _expert;
    private readonly float* _base;
    private readonly float* _split;
    private readonly long _rowBytes;

    /// <summary>Keys of <paramref name="expertRow"/> (of <typeparamref name="TElement"/>) against
    /// <paramref name="baseRow"/> (float32, as long).</summary>
    public DifferenceRowKeys(CpuFloats expertRow, float* baseRow)
        : this(expertRow, baseRow, null)
    {
    }

    /// <summary>As <see cref="DifferenceRowKeys{TElement}(CpuFloats, float*)"/>, with the base row also split by parity
    /// (<see cref="RowSelector.SplitByParity"/>) in <paramref name="splitBaseRow"/>: a bfloat16 expert's keys can then be
    /// read in halves (<see cref="HasHalves"/>). Null: they cannot.</summary>
    public DifferenceRowKeys(CpuFloats expertRow, float* baseRow, float* splitBaseRow)
    {
        Debug.Assert(expertRow.IsBFloat16 == TElement.IsBFloat16, "the row's element type");
        _expert = (byte*)expertRow.Pointer;
        _base = baseRow;
        _split = splitBaseRow;
        _rowBytes = expertRow.Length * (TElement.IsBFloat16 ? 2 : 4);
    }

    /// <inheritdoc />
    public bool HasHalves => TElement.IsBFloat16 && _split != null;

    /// <summary>Keys of 32 bfloat16 entries, read as 16 pairs: each pair's low half is the even entry, its high half the
    /// odd one, so the even entries widen by a shift and the odd ones by a mask (no shuffle), and the base row split by
    /// parity meets them. The top halves of the two differences then interleave back into row order by a shift and a
    /// merge, and so do the bottom halves.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector512<ushort> Halves32(int i, out Vector512<ushort> bottoms)
    {
        var at = _expert + ((long)i * 2);
        Sse.Prefetch1(at + _rowBytes);
        var pairs = Vector512.Load((uint*)at);
        var high = Vector512.Create(0xFFFF_0000u);
        var even = (Vector512.ShiftLeft(pairs, 16).AsSingle() - Vector512.Load(_split + i)).AsUInt32();
        var odd = ((pairs & high).AsSingle() - Vector512.Load(_split + i + 16)).AsUInt32();
        bottoms = ((even & Vector512.Create(0xFFFFu)) | Vector512.ShiftLeft(odd, 16)).AsUInt16();
        return ((Vector512.ShiftRightLogical(even, 16) | (odd & high)) & Vector512.Create(0x7FFF_7FFFu)).AsUInt16();
    }

    /// <inheritdoc />
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public uint Key(int i)
    {
        float e = TElement.IsBFloat16 ? BitConverter.UInt32BitsToSingle((uint)((ushort*)_expert)[i] << 16) : ((float*)_expert)[i];
        return FloatKeys.Magnitude(e - _base[i]);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector512<uint> Load16(uint* keys, int i)
    {
        var at = _expert + ((long)i * (TElement.IsBFloat16 ? 2 : 4));
        Sse.Prefetch1(at + _rowBytes);
        var e = TElement.IsBFloat16
            ? Vector512.ShiftLeft(Avx512F.ConvertToVector512UInt32(Vector256.Load((ushort*)at)), 16).AsSingle()
            : Vector512.Load((float*)at);
        var k = (e - Vector512.Load(_base + i)).AsUInt32() & Vector512.Create(FloatKeys.MagnitudeMask);
        k.Store(keys + i);
        return k;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public uint Load1(uint* keys, int i) => keys[i] = Key(i);

    public void Fill(uint* keys, int width) =>
        DifferenceMagnitudeKeys.Fill(new CpuFloats(_expert, width, TElement.IsBFloat16), new CpuFloats(_base, width, bfloat16: false), 0, width, keys);
}

/// <summary>
/// What one row's selection leaves for the next similar row (the next row of the same task vector): a
/// key bracket per position (see <see cref="KeyBracket"/>). Only the speed depends on it, never the result.
/// </summary>
internal struct RowHint
{
    /// <summary>What the hint belongs to (the caller's token for one series of rows; the caller resets
    /// the hint when it changes). A hint without one is not used.</summary>
    public object? Owner;

    /// <summary>Whether the brackets were set by a previous row.</summary>
    public bool Valid;

    /// <summary>Rows answered within their brackets.</summary>
    public int Hits;

    /// <summary>Rows that took the histogram path.</summary>
    public int Misses;

    /// <summary>Rows answered within brackets from a sample of their own keys.</summary>
    public int Sampled;

    /// <summary>Bracket passes that read the row's keys in halves (see <c>RowSelector.Halves.cs</c>).</summary>
    public int Halves;

    /// <summary>Whether the next row takes its brackets from a sample of its keys (see
    /// <see cref="RowSelector"/>'s sampled path) rather than from the last answers.</summary>
    public bool Sampling;

    /// <summary>Rows answered within brackets predicted from their sample's mean (counted in <see cref="Sampled"/> too).</summary>
    public int Scaled;

    /// <summary>The first position's answer over its row's sample mean, from row to row.</summary>
    public ScaleTrack FirstScale;

    /// <summary>The last position's answer over its row's sample mean, from row to row.</summary>
    public ScaleTrack LastScale;

    /// <summary>The first position's bracket.</summary>
    public KeyBracket First;

    /// <summary>The last position's bracket.</summary>
    public KeyBracket Last;
}

/// <summary>
/// One position's answer over its row's sample mean, followed from row to row as a running mean of its
/// logarithm and of that logarithm's squared error, which sets how far a predicted bracket reaches.
/// </summary>
internal struct ScaleTrack
{
    /// <summary>The weight of each new row in the running means.</summary>
    public const float Rate = 1f / 8;

    /// <summary>The squared error assumed before any is seen: a standard deviation of 5%.</summary>
    public const float InitialVariance = 0.05f * 0.05f;

    /// <summary>Whether a row has set the ratio.</summary>
    public bool Valid;

    /// <summary>The running mean of log(answer / sample mean).</summary>
    public float LogRatio;

    /// <summary>The running mean of the squared error of <see cref="LogRatio"/>'s prediction.</summary>
    public float Variance;

    /// <summary>How far a predicted bracket reaches either side, as a natural logarithm: three standard
    /// deviations of the prediction's error.</summary>
    public readonly float Reach => 3 * MathF.Sqrt(Variance);
}

/// <summary>
/// The keys [Lo, Lo + Span] around one position's last answer: a window of half-width <see cref="Half"/>
/// (a miss widens it 2×; one that collected more than 1/16 of the row is halved, but not below the
/// width that last missed, <see cref="Floor"/>). When the answer's key
/// had many copies (ties, as in task vectors of bfloat16 models) it is the bracket's <see cref="Pivot"/>,
/// whose copies are counted instead of collected.
/// </summary>
internal record struct KeyBracket
{
    /// <summary>The first half-width: 1/1024 of an octave of float32 keys.</summary>
    public const uint InitialHalfWidth = 1 << 13;

    /// <summary>The widest half-width: 32 octaves.</summary>
    public const uint MaxHalfWidth = 1 << 28;

    /// <summary>The copies from which an answer's key becomes the pivot.</summary>
    public const int PivotCopies = 16;

    /// <summary>The lowest key of the bracket.</summary>
    public uint Lo;

    /// <summary>The bracket's width in keys.</summary>
    public uint Span;

    /// <summary>The window's half-width.</summary>
    public uint Half;

    /// <summary>The narrowest half-width since the last miss: the one that missed, widened.</summary>
    public uint Floor;

    /// <summary>Whether <see cref="Pivot"/> is counted rather than collected.</summary>
    public bool HasPivot;

    /// <summary>The last answer's key.</summary>
    public uint Pivot;
}

/// <summary>
/// The window of ranks [low, high) of one row (positions in the row's stable ascending sort by key,
/// then index) as two composite bounds: an entry is inside when lower &lt; (key, index) ≤ upper. Short
/// rows use <see cref="RowSelector"/>; rows longer than <see cref="MaxShortRow"/> the whole-buffer
/// <see cref="ExactSelector"/>, which is itself multi-threaded.
/// </summary>
internal static unsafe class RowWindow
{
    /// <summary>The longest row <see cref="RowSelector"/> takes.</summary>
    public const long MaxShortRow = 1 << 20;

    /// <summary>The calling thread's scratch for one short row of <paramref name="width"/> entries: its keys,
    /// float32 staging of twice the width (for <see cref="KeySource.Fill"/>, or a base row widened for
    /// <see cref="DifferenceRowKeys{TElement}"/> and then that row split by parity), and
    /// <see cref="OfShortRow(uint*, int, long, long, byte*)"/>'s selector scratch.</summary>
    public static void ShortRowScratch(int width, out uint* keys, out float* floats, out byte* selector)
    {
        var scratch = ThreadScratch.Get(width * 12L + RowSelector.ScratchBytes(width));
        keys = (uint*)scratch;
        floats = (float*)(scratch + width * 4L);
        selector = scratch + width * 12L;
    }

    /// <summary>Bounds of the window of a short row whose keys are in <paramref name="keys"/>; the lower
    /// bound is meaningless when <paramref name="low"/> is 0 (nothing is below the window).</summary>
    public static (ulong Lower, ulong Upper) OfShortRow(uint* keys, int width, long low, long high, byte* scratch)
    {
        var none = default(RowHint);
        return OfShortRow(default(StoredRowKeys), keys, width, low, high, scratch, ref none);
    }

    /// <summary>As <see cref="OfShortRow(uint*, int, long, long, byte*)"/>, for one of a series of similar rows
    /// sharing <paramref name="hint"/>, with the keys read from <paramref name="source"/> and written to
    /// <paramref name="keys"/> as they are read, unless read in halves
    /// (see <see cref="RowSelector.Select{TKeys}(in TKeys, uint*, int, ReadOnlySpan{int}, Span{ulong}, byte*, ref RowHint)"/>).</summary>
    public static (ulong Lower, ulong Upper) OfShortRow<TKeys>(in TKeys source, uint* keys, int width, long low, long high, byte* scratch, ref RowHint hint)
        where TKeys : struct, IRowKeys
    {
        Span<int> positions = stackalloc int[2];
        Span<ulong> results = stackalloc ulong[2];
        int count = 0;
        if (low > 0)
        {
            positions[count++] = (int)low - 1;
        }

        positions[count++] = (int)high - 1;
        RowSelector.Select(source, keys, width, positions[..count], results[..count], scratch, ref hint);
        return (low > 0 ? results[0] : 0, results[count - 1]);
    }

    /// <summary>Bounds of the window of a long row, as <see cref="OfShortRow(uint*, int, long, long, byte*)"/>.</summary>
    public static (ulong Lower, ulong Upper) OfLongRow(KeySource row, long low, long high)
    {
        var upper = new SelectionQuery(row, high - 1);
        var lower = low > 0 ? new SelectionQuery(row, low - 1) : null;
        ExactSelector.Solve(lower is null ? [upper] : [upper, lower]);
        return (lower?.Composite ?? 0, upper.Composite);
    }
}
