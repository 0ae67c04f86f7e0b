using System.Numerics;
using System.Runtime.CompilerServices;

namespace MergeLab.Selection;

/// <summary>
/// Exact order statistics of one short row of keys (a row of a weight matrix, thousands of entries):
/// composites (key &lt;&lt; 32 | index in row) at given positions of the row's stable ascending sort.
/// A histogram of the keys (buckets monotone in the key) finds each position's bucket, and a quickselect
/// among that bucket's few entries finds the entry: O(row) per row, versus O(row·log row) for a sort.
/// </summary>
/// <remarks>The buckets are fine (1/256 of an octave, at most 2048) over the top eight octaves of the
/// row, where the largest magnitudes that Breadcrumbs cuts live; every smaller key shares bucket 0. A
/// position that falls there is still exact, only slower (its bucket holds more entries).</remarks>
internal static unsafe class RowSelector
{
    private const int Buckets = 2048 + 1;
    private const int Octaves = 8;

    /// <summary>Scratch bytes a call with a row of <paramref name="width"/> needs.</summary>
    public static long ScratchBytes(long width) => Buckets * 4L + width * 12 + 64;

    /// <summary>
    /// Sets <paramref name="results"/>[i] to the composite at <paramref name="positions"/>[i] (ascending,
    /// each in [0, width)) of the row <paramref name="keys"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Select(uint* keys, int width, ReadOnlySpan<int> positions, Span<ulong> results, byte* scratch)
    {
        uint min = uint.MaxValue, max = 0;
        var vmin = new Vector<uint>(uint.MaxValue);
        var vmax = Vector<uint>.Zero;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var k = Vector.Load(keys + i);
            vmin = Vector.Min(vmin, k);
            vmax = Vector.Max(vmax, k);
        }

        for (int lane = 0; lane < w; lane++)
        {
            min = Math.Min(min, vmin[lane]);
            max = Math.Max(max, vmax[lane]);
        }

        for (; i < width; i++)
        {
            min = Math.Min(min, keys[i]);
            max = Math.Max(max, keys[i]);
        }

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
        uint low = max - min > Octaves << 23 ? max - (Octaves << 23) : min;
        int shift = Math.Max(0, 32 - BitOperations.LeadingZeroCount(max - low) - 11);
        int buckets = (int)((max - low) >> shift) + 2;
        var counts = (int*)scratch;
        var bucketOf = (int*)(scratch + Buckets * 4L);
        new Span<int>(counts, buckets).Clear();

        var vlow = new Vector<uint>(low);
        var one = Vector<uint>.One;
        for (i = 0; i <= width - w; i += w)
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

        for (i = 0; i < width; i++)
        {
            counts[bucketOf[i]]++;
        }

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

        // Each target bucket: when it holds many entries they are usually copies of one key (task vectors
        // of bfloat16 models take few distinct values); a vectorized pass checks, and the wanted copy is
        // then found by counting in row order. Otherwise its few entries are gathered and quickselected.
        var candidates = (ulong*)(scratch + Buckets * 4L + width * 4L);
        int gathered = -1, inBucket = 0;
        for (int p = 0; p < positions.Length; p++)
        {
            int bucket = target[p];
            int rank = positions[p] - before[p];
            if (counts[bucket] > 32 && SingleKey(keys, bucketOf, width, bucket) is uint only)
            {
                results[p] = ((ulong)only << 32) | (uint)Occurrence(keys, width, only, rank);
                continue;
            }

            if (gathered != bucket)
            {
                inBucket = Gather(keys, bucketOf, width, bucket, candidates);
                gathered = bucket;
            }

            results[p] = Quickselect.Select(new Span<ulong>(candidates, inBucket), rank);
        }
    }

    /// <summary>The key of every entry in <paramref name="bucket"/> when they all have the same one.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint? SingleKey(uint* keys, int* bucketOf, int width, int bucket)
    {
        var target = new Vector<int>(bucket);
        var low = new Vector<uint>(uint.MaxValue);
        var high = Vector<uint>.Zero;
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var inside = Vector.AsVectorUInt32(Vector.Equals(Vector.Load(bucketOf + i), target));
            var k = Vector.Load(keys + i);
            low = Vector.Min(low, k | ~inside);
            high = Vector.Max(high, k & inside);
        }

        uint min = uint.MaxValue, max = 0;
        for (int lane = 0; lane < w; lane++)
        {
            min = Math.Min(min, low[lane]);
            max = Math.Max(max, high[lane]);
        }

        for (; i < width; i++)
        {
            if (bucketOf[i] == bucket)
            {
                min = Math.Min(min, keys[i]);
                max = Math.Max(max, keys[i]);
            }
        }

        return min == max ? min : null;
    }

    /// <summary>Collects the composites of the entries in <paramref name="bucket"/>, in row order.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Gather(uint* keys, int* bucketOf, int width, int bucket, ulong* candidates)
    {
        var target = new Vector<int>(bucket);
        int found = 0;
        int i = 0;
        int w = Vector<int>.Count;
        for (; i <= width - w; i += w)
        {
            var inside = Vector.Equals(Vector.Load(bucketOf + i), target);
            if (inside != Vector<int>.Zero)
            {
                ulong bits = Kernels.LaneBits(Vector.AsVectorUInt32(inside));
                while (bits != 0)
                {
                    int lane = BitOperations.TrailingZeroCount(bits);
                    bits &= bits - 1;
                    candidates[found++] = ((ulong)keys[i + lane] << 32) | (uint)(i + lane);
                }
            }
        }

        for (; i < width; i++)
        {
            if (bucketOf[i] == bucket)
            {
                candidates[found++] = ((ulong)keys[i] << 32) | (uint)i;
            }
        }

        return found;
    }

    /// <summary>The row index of occurrence <paramref name="occurrence"/> (0-based, in row order) of <paramref name="key"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Occurrence(uint* keys, int width, uint key, int occurrence)
    {
        var vkey = new Vector<uint>(key);
        int i = 0;
        int w = Vector<uint>.Count;
        for (; i <= width - w; i += w)
        {
            var equal = Vector.Equals(Vector.Load(keys + i), vkey);
            if (equal != Vector<uint>.Zero)
            {
                ulong bits = Kernels.LaneBits(equal);
                int here = BitOperations.PopCount(bits);
                if (occurrence < here)
                {
                    for (; occurrence > 0; occurrence--)
                    {
                        bits &= bits - 1;
                    }

                    return i + BitOperations.TrailingZeroCount(bits);
                }

                occurrence -= here;
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
}
