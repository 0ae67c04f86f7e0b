using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using MergeLab.Tensors;
using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// Native memory reused across tensors. Large allocations that torch makes for each result are fresh
/// pages from the kernel: on the first write every 4 KiB page faults and is zeroed, which costs more
/// than the merge arithmetic itself (a fresh 64 MiB result takes about 4× as long as copying into a
/// used one). Results and workspaces are therefore carved from buffers that stay mapped and are handed
/// back here when their tensor is freed, so steady-state merges touch only warm memory.
/// </summary>
/// <remarks>
/// <para>A pooled tensor is an ordinary CPU tensor (libtorch <c>from_blob</c> with a deleter); the
/// caller owns it as usual, and its memory returns to the pool when the last tensor viewing it is freed
/// (disposed, or finalized). A request takes an idle buffer of its own size, else the smallest idle one
/// up to <see cref="MaxSlack"/> times larger (its pages are already faulted in), else new memory. The
/// bound keeps a small tensor that lives on from pinning a much larger buffer. Idle buffers are kept up
/// to <see cref="MaxIdleBytes"/>, least recently returned freed first.</para>
/// <para>Thread-safe. If the native entry point is unavailable the pool falls back to
/// <c>torch.empty</c>.</para>
/// </remarks>
internal static unsafe class NativeBufferPool
{
    private const long Granularity = 64 * 1024;
    private static readonly object Gate = new();
    private static readonly Dictionary<nint, long> Live = [];
    private static readonly List<(nint Pointer, long Size)> Idle = [];
    private static long _idleBytes;
    private static bool _fromBlobUnavailable;

    /// <summary>The alignment of every pooled buffer: a page (and a block of direct file I/O).</summary>
    public const int Alignment = 4096;

    /// <summary>How many times larger than a request an idle buffer may be and still serve it.</summary>
    public const long MaxSlack = 8;

    /// <summary>The most idle memory kept for reuse. Default 768 MiB.</summary>
    public static long MaxIdleBytes { get; set; } = 768L << 20;

    /// <summary>Bytes currently idle in the pool (for tests and diagnostics).</summary>
    public static long IdleBytes
    {
        get
        {
            lock (Gate)
            {
                return _idleBytes;
            }
        }
    }

    /// <summary>An uninitialized contiguous CPU tensor of <paramref name="shape"/> and
    /// <paramref name="dtype"/> over pooled memory; the caller owns it.</summary>
    public static Tensor Empty(ReadOnlySpan<long> shape, ScalarType dtype) => Empty(shape, dtype, phase: 0);

    /// <summary>An uninitialized contiguous CPU tensor of <paramref name="shape"/> and <paramref name="dtype"/>
    /// over pooled memory whose first byte lies <paramref name="phase"/> bytes past an <see cref="Alignment"/>
    /// boundary: placed so, a tensor bound for a file offset with the same remainder can be written there by
    /// direct I/O straight from its memory (<see cref="IO.AlignedFileWriter"/>). The caller owns it. An empty
    /// tensor, or one made by <c>torch.empty</c> where the pool cannot wrap native memory, is not placed.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="phase"/> is outside [0, <see cref="Alignment"/>).</exception>
    public static Tensor Empty(ReadOnlySpan<long> shape, ScalarType dtype, int phase)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(phase);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(phase, Alignment);
        long count = 1;
        foreach (long s in shape)
        {
            count *= s;
        }

        long bytes = count * ElementSize(dtype);
        if (bytes == 0 || _fromBlobUnavailable)
        {
            return empty(shape, dtype);
        }

        var pointer = Rent(bytes + phase) + phase;
        try
        {
            if (BlobTensor.Create(pointer, shape, dtype, &ReleaseFromTorch) is { } tensor)
            {
                return tensor;
            }

            Return(pointer);
            return empty(shape, dtype);
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException or MarshalDirectiveException)
        {
            _fromBlobUnavailable = true;
            Return(pointer);
            return empty(shape, dtype);
        }
    }

    /// <summary><paramref name="source"/>'s values in a new tensor of <paramref name="dtype"/> over pooled memory
    /// placed as <see cref="Empty(ReadOnlySpan{long}, ScalarType, int)"/> places it; the caller owns it.</summary>
    public static Tensor CopyOf(Tensor source, ScalarType dtype, int phase = 0)
    {
        var copy = Empty(source.shape, dtype, phase);
        try
        {
            copy.copy_(source);
            return copy;
        }
        catch
        {
            copy.Dispose();
            throw;
        }
    }

    /// <summary>Rents at least <paramref name="bytes"/> bytes (<see cref="Alignment"/>-aligned); give them back with <see cref="Return"/>.</summary>
    public static nint Rent(long bytes)
    {
        long size = (Math.Max(bytes, 1) + Granularity - 1) / Granularity * Granularity;
        lock (Gate)
        {
            // An idle buffer of this size (the most recently returned), else the smallest larger one within
            // MaxSlack. Without the second, a merge whose tensors change size (a model's embedding, then its
            // layers, then its output head) evicts the large idle buffers while it allocates the small ones,
            // and then faults in the large ones afresh: about 0.8 GB of new pages for the lm_head group of a
            // 4 × 1.1B merge, whose MLP tensors are a sixth of the embedding's.
            int best = -1;
            for (int i = Idle.Count - 1; i >= 0; i--)
            {
                if (Idle[i].Size == size)
                {
                    best = i;
                    break;
                }

                if (Idle[i].Size > size && Idle[i].Size / MaxSlack <= size && (best < 0 || Idle[i].Size < Idle[best].Size))
                {
                    best = i;
                }
            }

            if (best >= 0)
            {
                var (pointer, held) = Idle[best];
                Idle.RemoveAt(best);
                _idleBytes -= held;
                Live[pointer] = held;
                return pointer;
            }
        }

        var fresh = (nint)NativeMemory.AlignedAlloc((nuint)size, Alignment);
        lock (Gate)
        {
            Live[fresh] = size;
        }

        return fresh;
    }

    /// <summary>Gives back memory from <see cref="Rent(long)"/> (or a pooled tensor's, as it is freed); it is kept for reuse or freed.</summary>
    public static void Return(nint pointer)
    {
        List<nint>? toFree = null;
        // A buffer starts on an Alignment boundary and is handed out at most Alignment − 1 bytes past it.
        pointer &= ~(nint)(Alignment - 1);
        lock (Gate)
        {
            if (!Live.Remove(pointer, out long size))
            {
                return;
            }

            Idle.Add((pointer, size));
            _idleBytes += size;
            while (_idleBytes > MaxIdleBytes && Idle.Count > 0)
            {
                (toFree ??= []).Add(Idle[0].Pointer);
                _idleBytes -= Idle[0].Size;
                Idle.RemoveAt(0);
            }
        }

        if (toFree is not null)
        {
            foreach (var p in toFree)
            {
                NativeMemory.AlignedFree((void*)p);
            }
        }
    }

    /// <summary>Frees every idle buffer.</summary>
    public static void Trim()
    {
        List<nint> toFree;
        lock (Gate)
        {
            toFree = Idle.Select(e => e.Pointer).ToList();
            Idle.Clear();
            _idleBytes = 0;
        }

        foreach (var p in toFree)
        {
            NativeMemory.AlignedFree((void*)p);
        }
    }

    private static long ElementSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Bool or ScalarType.Byte or ScalarType.Int8 => 1,
        ScalarType.Int16 or ScalarType.Float16 or ScalarType.BFloat16 => 2,
        ScalarType.Int32 or ScalarType.Float32 => 4,
        ScalarType.Int64 or ScalarType.Float64 or ScalarType.ComplexFloat32 => 8,
        ScalarType.ComplexFloat64 => 16,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "Unsupported dtype for a pooled tensor."),
    };

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void ReleaseFromTorch(IntPtr data) => Return(data);
}
