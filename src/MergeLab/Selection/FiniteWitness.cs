using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// Lets a kernel that has read every value of an input vouch that they are all finite, so that the
/// checkpoint engine's NaN/±∞ check need not read that input once more. The engine opens a witness on
/// the thread that merges a group; a kernel running on that thread records the memory it found finite
/// (<see cref="Vouch"/>); the engine then checks only the inputs nobody vouched for.
/// </summary>
/// <remarks>A kernel vouches only for memory it read in full and found free of NaN and ±∞. Finding one
/// (or a false alarm, such as a task-vector entry that overflows to ∞) it vouches for nothing, and the
/// engine's own check decides. So a missing vouch costs a pass, never a wrong answer.</remarks>
internal sealed unsafe class FiniteWitness : IDisposable
{
    [ThreadStatic]
    private static FiniteWitness? _current;

    private readonly FiniteWitness? _outer;
    private readonly List<(nint Start, long Bytes)> _finite = [];
    private bool _closed;

    private FiniteWitness(FiniteWitness? outer) => _outer = outer;

    /// <summary>Opens a witness on this thread, until disposed.</summary>
    public static FiniteWitness Begin() => _current = new FiniteWitness(_current);

    /// <summary>Whether a witness is open on this thread (kernels skip the bookkeeping otherwise).</summary>
    public static bool Listening => _current is not null;

    /// <summary>Records that every entry of <paramref name="values"/> is finite, if a witness is open on this thread.</summary>
    public static void Vouch(CpuFloats values) => _current?._finite.Add(((nint)values.Pointer, values.Length * values.ElementSize));

    /// <summary>Whether every byte of the contiguous CPU tensor <paramref name="t"/> lies in memory vouched for.</summary>
    public bool Covers(Tensor t)
    {
        if (!CpuTensors.IsDirect(t) || _finite.Count == 0)
        {
            return false;
        }

        var start = (nint)CpuTensors.Pointer(t);
        long bytes = t.numel() * t.element_size();
        foreach (var (s, b) in _finite)
        {
            if (start >= s && start + bytes <= s + b)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>Closes the witness; the innermost one still open before it (if any) listens again.</summary>
    public void Dispose()
    {
        _closed = true;
        while (_current is { _closed: true } closed)
        {
            _current = closed._outer;
        }
    }
}
