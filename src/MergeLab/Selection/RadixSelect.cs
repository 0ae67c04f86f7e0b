using static TorchSharp.torch;


namespace MergeLab.Selection;

/// <summary>
/// Exact k-th smallest value (or magnitude) over a stream of tensors too large to hold at once (a
/// whole model), in two passes with bounded memory. Each float32 is mapped to a 32-bit key whose
/// unsigned order is the order of the values (for magnitudes the bits with the sign cleared; for
/// signed values the sign bit flipped, and all bits flipped for negatives). A histogram of the high 16
/// key bits (pass 1) locates the bin holding the k-th value and a histogram of the low 16 bits inside
/// that bin (pass 2) pins it exactly. Several ranks can be asked of the same stream at once.
/// </summary>
/// <param name="signed">Select among the signed values rather than their magnitudes.</param>
internal sealed class RadixSelect(bool signed = false)
{
    private const int Bins = 1 << 16;
    private readonly long[] _coarse = new long[Bins];
    private readonly Dictionary<int, long[]> _fine = [];
    private long[]? _ranks;
    private int[]? _rankBins;
    private float[]? _results;

    /// <summary>Entries seen in the first pass.</summary>
    public long Count { get; private set; }

    /// <summary>True after the coarse pass, before the fine one.</summary>
    public bool InFinePass => _rankBins is not null && _results is null;

    /// <summary>Pass 1: adds the magnitudes of <paramref name="values"/> (any float tensor) to the coarse histogram.</summary>
    public void ObserveCoarse(Tensor values)
    {
        using var scope = NewDisposeScope();
        var bits = Bits(values);
        var coarse = _coarse;
        foreach (uint u in bits)
        {
            coarse[Key(u) >> 16]++;
        }

        Count += values.numel();
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
            _fine.TryAdd(bin, new long[Bins]);
        }
    }

    /// <summary>Pass 2: adds the low 16 bits of the magnitudes that fall in a wanted bin.</summary>
    public void ObserveFine(Tensor values)
    {
        using var scope = NewDisposeScope();
        var bits = Bits(values);
        foreach (uint u in bits)
        {
            uint m = Key(u);
            if (_fine.TryGetValue((int)(m >> 16), out var histogram))
            {
                histogram[m & 0xFFFF]++;
            }
        }
    }

    /// <summary>Ends pass 2 and returns the k-th smallest magnitude for each rank given to <see cref="EndCoarse"/>.</summary>
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

            var fine = _fine[bin];
            int low = 0;
            while (seen + fine[low] < ranks[r])
            {
                seen += fine[low++];
            }

            _results[r] = BitConverter.UInt32BitsToSingle(Value(((uint)bin << 16) | (uint)low));
        }

        return _results;
    }

    private uint Key(uint bits) =>
        !signed ? bits & 0x7FFF_FFFF : (bits & 0x8000_0000) != 0 ? ~bits : bits | 0x8000_0000;

    private uint Value(uint key) =>
        !signed ? key : (key & 0x8000_0000) != 0 ? key & 0x7FFF_FFFF : ~key;

    /// <summary>The float32 bit patterns of <paramref name="values"/>, read from CPU memory (copied
    /// there first when the tensor lives on another device; the copy belongs to the caller's scope).</summary>
    private static Span<uint> Bits(Tensor values)
    {
        var cpu = values.to(ScalarType.Float32).cpu().contiguous();
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, uint>(cpu.bytes);
    }
}
