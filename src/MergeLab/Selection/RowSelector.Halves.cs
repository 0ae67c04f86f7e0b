using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MergeLab.Selection;

/// <summary>
/// The bracket pass over keys read in halves, for rows of bfloat16 experts (<see cref="IRowKeys.HasHalves"/>).
/// Each key's top 16 bits decide: 32 of them fill one 512-bit compare, where whole keys fill 16. A
/// bracket is widened to whole top halves ([Lo, Lo + Span] becomes every key whose top half lies between
/// Lo's and (Lo + Span)'s), the keys below and inside it are counted, and the entries inside either bracket
/// are collected (row index, top half, bottom half) in row order. Nothing is stored per key. The pick then
/// needs only the collected entries: it finds the top half holding the wanted rank by counting (the last
/// answer's top half first, else a binary search), and orders only the entries of that top half by their
/// bottom halves and row indices.
/// </summary>
/// <remarks>
/// The keys of bfloat16 task vectors repeat heavily, and the whole-key pass leaves a bracket's repeated
/// answer out of its collected keys (the pivot) at the cost of two more compares per 16 keys. This pass
/// collects the copies instead: counting them among the collected entries costs a compare per 32 entries,
/// less than leaving them out costs per 32 keys of the row. Rows must hold at most 65,536 keys (row indices
/// are 16 bits) and at least 64; the CPU needs AVX-512 VBMI2 (its 16-bit compress).
/// </remarks>
internal static unsafe partial class RowSelector
{
    /// <summary>The widest row whose keys are read in halves: its row indices fit 16 bits.</summary>
    private const int MaxHalvesWidth = 1 << 16;

    /// <summary>The narrowest row whose keys are read in halves.</summary>
    private const int MinHalvesWidth = 64;

    /// <summary>Whether bracket passes may read keys in halves at all (off: every row takes the whole-key pass, to
    /// measure one against the other).</summary>
    internal static bool HalvesAllowed { get; set; } = true;

    /// <summary>Whether a row of <paramref name="width"/> keys from a source that has halves is read in halves on this CPU.</summary>
    public static bool ReadsHalves(int width) =>
        HalvesAllowed && width is >= MinHalvesWidth and <= MaxHalvesWidth && Avx512Vbmi2.IsSupported && Avx512BW.IsSupported && Vector512.IsHardwareAccelerated;

    /// <summary>Whether this row's bracket passes read <paramref name="source"/>'s keys in halves.</summary>
    private static bool ReadsHalves<TKeys>(in TKeys source, int width)
        where TKeys : struct, IRowKeys => source.HasHalves && ReadsHalves(width);

    /// <summary>
    /// Writes <paramref name="row"/> (float32, <paramref name="width"/> entries) to <paramref name="split"/> with each whole
    /// block of 32 entries split by parity: its 16 even-indexed entries, then its 16 odd-indexed ones. A bfloat16 row read
    /// 32 entries at a time as 16 pairs gives its even and odd entries as two float32 vectors; a base row laid out this way
    /// meets them without a shuffle. Entries after the last whole block are not written.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void SplitByParity(float* row, float* split, int width)
    {
        if (!Avx512F.IsSupported)
        {
            for (int i = 0; i <= width - 32; i += 32)
            {
                for (int j = 0; j < 16; j++)
                {
                    split[i + j] = row[i + (2 * j)];
                    split[i + 16 + j] = row[i + (2 * j) + 1];
                }
            }

            return;
        }

        var even = Vector512.Create(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        var odd = even + Vector512<int>.One;
        for (int i = 0; i <= width - 32; i += 32)
        {
            var a = Vector512.Load(row + i);
            var b = Vector512.Load(row + i + 16);
            Avx512F.PermuteVar16x32x2(a, even, b).Store(split + i);
            Avx512F.PermuteVar16x32x2(a, odd, b).Store(split + i + 16);
        }
    }

    /// <summary>The bracket path (<see cref="InBrackets"/>) with the row's keys read in halves; the key buffer is not
    /// written.</summary>
    private static bool InHalfBrackets<TKeys>(in TKeys source, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch, ref RowHint hint,
        out int collected)
        where TKeys : struct, IRowKeys
    {
        hint.Halves++;
        int stretch = width + 32;
        var index = (ushort*)(scratch + (Copies * Stride * 4L));
        var tops = index + stretch;
        var bottoms = tops + stretch;
        var work = bottoms + stretch; // PickHalves' gathered entries: four lists of at most n + 32
        var (top0, end0) = TopHalves(hint.First);
        var (top1, end1) = TopHalves(hint.Last);
        var (c0, c1) = CollectHalves(source, width, top0, end0, top1, end1, index, tops, bottoms, out int n);
        int p0 = positions[0], p1 = positions[^1];
        bool hit0 = Resolves(c0, p0), hit1 = Resolves(c1, p1);
        if (!hit0 || !hit1)
        {
            collected = n;
            Widen(ref hint.First, hit0);
            Widen(ref hint.Last, hit1);
            return false;
        }

        ulong r0 = PickHalves(index, tops, bottoms, n, top0, end0, hint.First.Pivot, p0 - c0.Below, work, out int copies0);
        ulong r1 = PickHalves(index, tops, bottoms, n, top1, end1, hint.Last.Pivot, p1 - c1.Below, work, out int copies1);
        results[0] = r0;
        results[positions.Length - 1] = r1;
        collected = c0.Inside - copies0 + c1.Inside - copies1;
        Recentre(ref hint.First, (uint)(r0 >> 32), copies0, c0.Inside - copies0, width);
        Recentre(ref hint.Last, (uint)(r1 >> 32), copies1, c1.Inside - copies1, width);
        return true;
    }

    /// <summary>The top halves of a bracket's first and last keys: the bracket widened to whole top halves.</summary>
    private static (ushort Top, ushort End) TopHalves(in KeyBracket b) => ((ushort)(b.Lo >> 16), (ushort)((b.Lo + b.Span) >> 16));

    /// <summary>
    /// One pass over the row, 32 keys at a time as their top and bottom halves: for each bracket (top halves
    /// [<paramref name="top0"/>, <paramref name="end0"/>] and [<paramref name="top1"/>, <paramref name="end1"/>]) the keys
    /// below and inside it counted, and each entry inside either collected by three compresses (row index, top half,
    /// bottom half), in row order; <paramref name="collected"/> says how many.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static (BracketCount First, BracketCount Last) CollectHalves<TKeys>(in TKeys source, int width, ushort top0, ushort end0, ushort top1, ushort end1,
        ushort* index, ushort* tops, ushort* bottoms, out int collected)
        where TKeys : struct, IRowKeys
    {
        var from0 = Vector512.Create(top0);
        var span0 = Vector512.Create((ushort)(end0 - top0));
        var from1 = Vector512.Create(top1);
        var span1 = Vector512.Create((ushort)(end1 - top1));
        var lanes = Vector512.Create((ushort)0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
        var step = Vector512.Create((ushort)32);
        var row = source; // a local copy the loop's stores cannot alias

        // Each compare's mask goes straight to an integer for its count. The two inside compares are written
        // again for the compresses' mask: the JIT then reuses them and joins them as mask registers (through a
        // local it rebuilds them as vectors and back).
        int below0 = 0, below1 = 0, inside0 = 0, inside1 = 0, n = 0, i = 0;
        for (; i <= width - 32; i += 32)
        {
            var t = row.Halves32(i, out var b);
            uint lt0 = (uint)Vector512.LessThan(t, from0).ExtractMostSignificantBits();
            uint lt1 = (uint)Vector512.LessThan(t, from1).ExtractMostSignificantBits();
            uint m0 = (uint)Vector512.LessThanOrEqual(t - from0, span0).ExtractMostSignificantBits();
            uint m1 = (uint)Vector512.LessThanOrEqual(t - from1, span1).ExtractMostSignificantBits();
            below0 += BitOperations.PopCount(lt0);
            below1 += BitOperations.PopCount(lt1);
            inside0 += BitOperations.PopCount(m0);
            inside1 += BitOperations.PopCount(m1);
            var either = Vector512.LessThanOrEqual(t - from0, span0) | Vector512.LessThanOrEqual(t - from1, span1);
            Avx512Vbmi2.Compress(Vector512<ushort>.Zero, either, lanes).Store(index + n);
            Avx512Vbmi2.Compress(Vector512<ushort>.Zero, either, t).Store(tops + n);
            Avx512Vbmi2.Compress(Vector512<ushort>.Zero, either, b).Store(bottoms + n);
            n += BitOperations.PopCount(m0 | m1);
            lanes += step;
        }

        for (; i < width; i++)
        {
            uint key = row.Key(i);
            ushort t = (ushort)(key >> 16);
            bool isIn0 = (ushort)(t - top0) <= (ushort)(end0 - top0), isIn1 = (ushort)(t - top1) <= (ushort)(end1 - top1);
            below0 += t < top0 ? 1 : 0;
            below1 += t < top1 ? 1 : 0;
            inside0 += isIn0 ? 1 : 0;
            inside1 += isIn1 ? 1 : 0;
            if (isIn0 || isIn1)
            {
                index[n] = (ushort)i;
                tops[n] = t;
                bottoms[n++] = (ushort)key;
            }
        }

        collected = n;
        return (new(below0, inside0, 0, 0), new(below1, inside1, 0, 0));
    }

    /// <summary>
    /// The composite of rank <paramref name="rank"/> among the collected entries whose top half lies in
    /// [<paramref name="top"/>, <paramref name="end"/>] (the <paramref name="n"/> entries of <paramref name="index"/>,
    /// <paramref name="tops"/> and <paramref name="bottoms"/>, in row order), and how many of them share its key.
    /// The top half holding the rank is found by counting: first at <paramref name="guess"/>'s top half (the last
    /// answer), else by a binary search over the bracket's top halves (<see cref="Search"/>). That top half's entries
    /// are then gathered, and among them the bottom half holding the rank is found the same way.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static ulong PickHalves(ushort* index, ushort* tops, ushort* bottoms, int n, ushort top, ushort end, uint guess, int rank, ushort* work,
        out int copies)
    {
        // That top half's entries (row order): their indices and bottom halves.
        var gatheredIndex = work;
        var gatheredBottoms = gatheredIndex + n + 32;
        ushort first = Settle(index, tops, bottoms, n, top, end, (ushort)Math.Clamp((int)(guess >> 16), top, end), ref rank,
            gatheredIndex, gatheredBottoms, out int m);

        // Among them, the bottom half holding the rank, tried first at the first entry's; its copies' indices in row order.
        var copyIndex = gatheredBottoms + n + 32;
        ushort bottom = Settle(gatheredIndex, gatheredBottoms, gatheredBottoms, m, 0, ushort.MaxValue, gatheredBottoms[0], ref rank,
            copyIndex, copyIndex + n + 32, out copies);
        return ((ulong)(((uint)first << 16) | bottom) << 32) | copyIndex[rank];
    }

    /// <summary>
    /// The value of [<paramref name="lo"/>, <paramref name="hi"/>] holding rank <paramref name="rank"/> among the
    /// <paramref name="n"/> <paramref name="values"/> that lie in that range: tried first at <paramref name="guess"/>,
    /// else found by <see cref="Search"/>. The entries of that value are gathered (<see cref="GatherValue"/>, <paramref name="m"/>
    /// of them), and <paramref name="rank"/> becomes the rank among them.
    /// </summary>
    private static ushort Settle(ushort* index, ushort* values, ushort* others, int n, ushort lo, ushort hi, ushort guess, ref int rank,
        ushort* gatheredIndex, ushort* gatheredOthers, out int m)
    {
        int before = GatherValue(index, values, others, n, lo, guess, gatheredIndex, gatheredOthers, out m);
        if (rank < before || rank >= before + m)
        {
            guess = Search(values, n, lo, hi, guess, before, m, rank);
            before = GatherValue(index, values, others, n, lo, guess, gatheredIndex, gatheredOthers, out m);
        }

        rank -= before;
        return guess;
    }

    /// <summary>
    /// The value v of [<paramref name="lo"/>, <paramref name="hi"/>] holding rank <paramref name="rank"/> among the
    /// <paramref name="n"/> <paramref name="values"/> that lie in that range (in ascending order), by a binary search
    /// on the side of <paramref name="value"/> where the rank lies: <paramref name="before"/> values lie in
    /// [lo, value) and <paramref name="at"/> equal it, and the rank is not among those equal. The rank must be below
    /// the count in range.
    /// </summary>
    private static ushort Search(ushort* values, int n, ushort lo, ushort hi, ushort value, int before, int at, int rank)
    {
        // The smallest v with more than `rank` values in [lo, v], in (low, high].
        int low = rank < before ? lo - 1 : value, high = rank < before ? value - 1 : hi;
        while (high - low > 1)
        {
            int mid = low + ((high - low) / 2);
            if (CountUpTo(values, n, lo, (ushort)(mid - lo)) > rank)
            {
                high = mid;
            }
            else
            {
                low = mid;
            }
        }

        return (ushort)high;
    }

    /// <summary>The <paramref name="index"/> and <paramref name="others"/> entries of the <paramref name="n"/>
    /// <paramref name="values"/> equal to <paramref name="wanted"/>, in order (<paramref name="m"/> of them); returns how
    /// many values lie in [<paramref name="lo"/>, <paramref name="wanted"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int GatherValue(ushort* index, ushort* values, ushort* others, int n, ushort lo, ushort wanted,
        ushort* gatheredIndex, ushort* gatheredOthers, out int m)
    {
        var from = Vector512.Create(lo);
        var limit = Vector512.Create((ushort)(wanted - lo));
        var equal = Vector512.Create(wanted);
        int below = 0, found = 0, i = 0;
        for (; i <= n - 32; i += 32)
        {
            var v = Vector512.Load(values + i);
            below += BitOperations.PopCount(Vector512.LessThan(v - from, limit).ExtractMostSignificantBits());
            var match = Vector512.Equals(v, equal);
            Avx512Vbmi2.Compress(Vector512<ushort>.Zero, match, Vector512.Load(index + i)).Store(gatheredIndex + found);
            Avx512Vbmi2.Compress(Vector512<ushort>.Zero, match, Vector512.Load(others + i)).Store(gatheredOthers + found);
            found += BitOperations.PopCount(match.ExtractMostSignificantBits());
        }

        for (; i < n; i++)
        {
            below += (ushort)(values[i] - lo) < (ushort)(wanted - lo) ? 1 : 0;
            if (values[i] == wanted)
            {
                gatheredIndex[found] = index[i];
                gatheredOthers[found++] = others[i];
            }
        }

        m = found;
        return below;
    }

    /// <summary>How many of the <paramref name="n"/> values lie in [<paramref name="lo"/>, <paramref name="lo"/> + <paramref name="span"/>].</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int CountUpTo(ushort* values, int n, ushort lo, ushort span)
    {
        var from = Vector512.Create(lo);
        var limit = Vector512.Create(span);
        int count = 0, i = 0;
        for (; i <= n - 32; i += 32)
        {
            count += BitOperations.PopCount(Vector512.LessThanOrEqual(Vector512.Load(values + i) - from, limit).ExtractMostSignificantBits());
        }

        for (; i < n; i++)
        {
            count += (ushort)(values[i] - lo) <= span ? 1 : 0;
        }

        return count;
    }
}
