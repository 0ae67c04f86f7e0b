using System.Buffers;
using System.Numerics;
using System.Runtime.CompilerServices;
using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// Exact k-th smallest value (or magnitude) over a stream of tensors too large to hold at once (a
/// whole model), in two passes with bounded memory. Each float32 is mapped to a 32-bit key whose
/// unsigned order is the order of the values (<see cref="FloatKeys"/>: for magnitudes the bits with the
/// sign cleared; for signed values the sign bit flipped, and all bits flipped for negatives). A
/// histogram of the high 16 key bits (pass 1) locates the bin holding the k-th value and a histogram of
/// the low 16 bits inside that bin (pass 2) pins it exactly. Several ranks can be asked of the same
/// stream at once. Each observation is counted on all CPU threads into per-thread histograms, so the
/// counts (integers) do not depend on the thread count.
/// </summary>
/// <param name="signed">Select among the signed values rather than their magnitudes.</param>
internal sealed class RadixSelect(bool signed = false)
{
    private const int Bins = 1 << 16;
    private const int ParallelThreshold = 1 << 16;
    private readonly long[] _coarse = new long[Bins];
    private readonly object _gate = new();
    private long[]? _ranks;
    private int[]? _rankBins;
    private int[] _fineBins = [];
    private long[][] _fine = [];
    private float[]? _results;

    /// <summary>Entries seen in the first pass.</summary>
    public long Count { get; private set; }

    /// <summary>True after the coarse pass, before the fine one.</summary>
    public bool InFinePass => _rankBins is not null && _results is null;

    /// <summary>Pass 1: adds the keys of <paramref name="values"/> (any float tensor) to the coarse histogram.</summary>
    public void ObserveCoarse(Tensor values)
    {
        using var source = Source(values);
        ObserveCoarse(source.Keys);
    }

    /// <summary>Pass 1 over a key source (its keys must be of this selection's kind).</summary>
    public void ObserveCoarse(KeySource keys) => ObserveCoarse([this], [keys]);

    /// <summary>Pass 1 of several selections, <paramref name="selects"/>[i] over <paramref name="keys"/>[i],
    /// block by block: each block's sources are filled one after another, so sources that compute their
    /// blocks together (e.g. the rows of one score tensor) compute each block once.</summary>
    public static void ObserveCoarse(IReadOnlyList<RadixSelect> selects, IReadOnlyList<KeySource> keys)
    {
        Accumulate(selects, keys, coarse: true);
        for (int s = 0; s < selects.Count; s++)
        {
            selects[s].Count += keys[s].Length;
        }
    }

    /// <summary>Ends pass 1 and fixes the ranks (1-based, each in [1, Count]) to select.</summary>
    public void EndCoarse(IReadOnlyList<long> ranks)
    {
        _ranks = ranks.ToArray();
        _rankBins = new int[_ranks.Length];
        for (int r = 0; r < _ranks.Length; r++)
        {
            if (_ranks[r] < 1 || _ranks[r] > Count)
            {
                throw new ArgumentOutOfRangeException(nameof(ranks), _ranks[r], $"rank must be in [1, {Count}].");
            }

            long seen = 0;
            int bin = 0;
            while (seen + _coarse[bin] < _ranks[r])
            {
                seen += _coarse[bin++];
            }

            _rankBins[r] = bin;
        }

        _fineBins = _rankBins.Distinct().Order().ToArray();
        _fine = _fineBins.Select(_ => new long[Bins]).ToArray();
    }

    /// <summary>Pass 2: adds the low 16 bits of the keys that fall in a wanted bin.</summary>
    public void ObserveFine(Tensor values)
    {
        using var source = Source(values);
        ObserveFine(source.Keys);
    }

    /// <summary>Pass 2 over a key source.</summary>
    public void ObserveFine(KeySource keys) => Accumulate([this], [keys], coarse: false);

    /// <summary>Pass 2 of several selections, as <see cref="ObserveCoarse(IReadOnlyList{RadixSelect}, IReadOnlyList{KeySource})"/>.</summary>
    public static void ObserveFine(IReadOnlyList<RadixSelect> selects, IReadOnlyList<KeySource> keys) =>
        Accumulate(selects, keys, coarse: false);

    /// <summary>Ends pass 2 and returns the k-th smallest for each rank given to <see cref="EndCoarse"/>.</summary>
    public float[] EndFine()
    {
        var ranks = _ranks ?? throw new InvalidOperationException("The coarse pass has not ended.");
        _results = new float[ranks.Length];
        for (int r = 0; r < ranks.Length; r++)
        {
            int bin = _rankBins![r];
            long seen = 0;
            for (int b = 0; b < bin; b++)
            {
                seen += _coarse[b];
            }

            var fine = _fine[Array.IndexOf(_fineBins, bin)];
            int low = 0;
            while (seen + fine[low] < ranks[r])
            {
                seen += fine[low++];
            }

            _results[r] = FloatKeys.Value(((uint)bin << 16) | (uint)low, signed);
        }

        return _results;
    }

    /// <summary>Counts the keys of each <paramref name="keys"/>[s] into <paramref name="selects"/>[s]'s
    /// histograms (the coarse one, or the fine ones of its wanted bins); all sources have one length.</summary>
    private static unsafe void Accumulate(IReadOnlyList<RadixSelect> selects, IReadOnlyList<KeySource> keys, bool coarse)
    {
        long n = keys.Count == 0 ? 0 : keys[0].Length;
        if (keys.Count != selects.Count || keys.Any(k => k.Length != n))
        {
            throw new ArgumentException("Each selection needs one key source, all of one length.", nameof(keys));
        }

        if (n == 0)
        {
            return;
        }

        if (n <= ExactSelector.BlockSize)
        {
            AccumulateSmall(selects, keys, coarse, (int)n);
            return;
        }

        // Each selection's tables start at offsets[s] in a thread's counts.
        var offsets = new int[selects.Count + 1];
        for (int s = 0; s < selects.Count; s++)
        {
            offsets[s + 1] = offsets[s] + (coarse ? 1 : selects[s]._fineBins.Length);
        }

        int tables = offsets[^1];

        var floors = selects.Select(select => select.Floor(coarse)).ToArray();
        const int block = ExactSelector.BlockSize;
        long blocks = CpuParallel.BlockCount(n, block);
        int threads = n < ParallelThreshold ? 1 : CpuParallel.CountingTasks(blocks, block);
        long perThread = CpuParallel.BlockCount(blocks, threads);
        CpuParallel.For(threads, t =>
        {
            var counts = ArrayPool<uint>.Shared.Rent(tables * Bins);
            try
            {
                Array.Clear(counts, 0, tables * Bins);
                var scratch = ThreadScratch.Get(block * 12L);
                var k = (uint*)scratch;
                var floats = (float*)(scratch + block * 4L);
                fixed (uint* all = counts)
                {
                    for (long b = t * perThread; b < Math.Min(blocks, (t + 1) * perThread); b++)
                    {
                        long start = b * block;
                        int count = (int)Math.Min(block, n - start);
                        for (int s = 0; s < selects.Count; s++)
                        {
                            keys[s].FillFrom(start, count, k, floats, floors[s]);
                            var c = all + ((long)offsets[s] * Bins);
                            if (coarse)
                            {
                                for (int i = 0; i < count; i++)
                                {
                                    c[k[i] >> 16]++;
                                }

                                continue;
                            }

                            CountFine(k, count, selects[s]._fineBins, c);
                        }
                    }
                }

                for (int s = 0; s < selects.Count; s++)
                {
                    var select = selects[s];
                    lock (select._gate)
                    {
                        for (int table = 0; table < offsets[s + 1] - offsets[s]; table++)
                        {
                            var target = coarse ? select._coarse : select._fine[table];
                            var source = (offsets[s] + table) * Bins;
                            for (int i = 0; i < Bins; i++)
                            {
                                target[i] += counts[source + i];
                            }
                        }
                    }
                }
            }
            finally
            {
                ArrayPool<uint>.Shared.Return(counts);
            }
        });
    }

    /// <summary>The lowest key a pass needs exactly: the fine pass counts only keys in the wanted bins, so below
    /// the lowest a source need not compute them (a key written below it lands in no wanted bin).</summary>
    private uint Floor(bool coarse) => coarse || _fineBins.Length == 0 ? 0u : (uint)_fineBins.Min() << 16;

    /// <summary>
    /// <see cref="Accumulate"/> for sources of one block or less, on the calling thread: the keys are kept
    /// and counted straight into each selection's histograms. Clearing and adding whole per-thread tables
    /// (2^16 bins each) cost more than counting a few thousand keys: a model of 3,000 small tensors spent
    /// a third of a whole-model PCB merge there.
    /// </summary>
    private static unsafe void AccumulateSmall(IReadOnlyList<RadixSelect> selects, IReadOnlyList<KeySource> keys, bool coarse, int n)
    {
        // Every source is filled before any is counted, in the order the blocked path fills them.
        var kept = ArrayPool<uint>.Shared.Rent(selects.Count * n);
        try
        {
            var scratch = ThreadScratch.Get(ExactSelector.BlockSize * 12L);
            var floats = (float*)(scratch + ExactSelector.BlockSize * 4L);
            fixed (uint* all = kept)
            {
                for (int s = 0; s < selects.Count; s++)
                {
                    keys[s].FillFrom(0, n, (uint*)scratch, floats, selects[s].Floor(coarse));
                    Buffer.MemoryCopy(scratch, all + ((long)s * n), n * 4L, n * 4L);
                }
            }

            for (int s = 0; s < selects.Count; s++)
            {
                var select = selects[s];
                var k = kept.AsSpan(s * n, n);
                lock (select._gate)
                {
                    if (coarse)
                    {
                        foreach (uint key in k)
                        {
                            select._coarse[key >> 16]++;
                        }

                        continue;
                    }

                    var wanted = select._fineBins;
                    foreach (uint key in k)
                    {
                        int table = Array.IndexOf(wanted, (int)(key >> 16));
                        if (table >= 0)
                        {
                            select._fine[table][key & 0xFFFF]++;
                        }
                    }
                }
            }
        }
        finally
        {
            ArrayPool<uint>.Shared.Return(kept);
        }
    }

    /// <summary>Counts the low 16 bits of each key whose high 16 bits are one of the <paramref name="wanted"/>
    /// bins into that bin's table of <paramref name="counts"/>. Most keys lie in no wanted bin: a vector
    /// compare finds the few lanes that do.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void CountFine(uint* keys, int count, int[] wanted, uint* counts)
    {
        int w = Vector<uint>.Count;
        var bins = new Vector<uint>[wanted.Length];
        for (int table = 0; table < wanted.Length; table++)
        {
            bins[table] = new Vector<uint>((uint)wanted[table]);
        }

        int i = 0;
        for (; i <= count - w; i += w)
        {
            var high = Vector.ShiftRightLogical(Vector.Load(keys + i), 16);
            var hit = Vector<uint>.Zero;
            foreach (var bin in bins)
            {
                hit |= Vector.Equals(high, bin);
            }

            if (hit != Vector<uint>.Zero)
            {
                ulong lanes = Kernels.LaneBits(hit);
                while (lanes != 0)
                {
                    CountOne(keys[i + BitOperations.TrailingZeroCount(lanes)], wanted, counts);
                    lanes &= lanes - 1;
                }
            }
        }

        for (; i < count; i++)
        {
            CountOne(keys[i], wanted, counts);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static unsafe void CountOne(uint key, int[] wanted, uint* counts)
    {
        int high = (int)(key >> 16);
        for (int table = 0; table < wanted.Length; table++)
        {
            if (wanted[table] == high)
            {
                counts[(table * Bins) + (int)(key & 0xFFFF)]++;
                return;
            }
        }
    }

    /// <summary>The keys of <paramref name="values"/> read from CPU memory (copied there first when the
    /// tensor lives on another device).</summary>
    private TensorKeys Source(Tensor values)
    {
        var cpu = CpuTensors.OnCpu(values) ? null : values.cpu();
        var floats = CpuTensors.Floats(cpu ?? values, out var lease);
        KeySource keys = signed ? new SignedKeys(floats) : new MagnitudeKeys(floats);
        return new TensorKeys(keys, cpu, lease);
    }

    private readonly struct TensorKeys(KeySource keys, Tensor? cpu, FloatsLease lease) : IDisposable
    {
        public KeySource Keys { get; } = keys;

        public void Dispose()
        {
            lease.Dispose();
            cpu?.Dispose();
        }
    }
}
