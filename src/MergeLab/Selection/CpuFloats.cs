using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Selection;

/// <summary>
/// A contiguous float32 or bfloat16 buffer in CPU memory, read as float32 (bfloat16 widens exactly).
/// The tensor it came from must outlive it.
/// </summary>
internal readonly unsafe struct CpuFloats
{
    public CpuFloats(void* pointer, long length, bool bfloat16)
    {
        Pointer = pointer;
        Length = length;
        IsBFloat16 = bfloat16;
    }

    public void* Pointer { get; }

    public long Length { get; }

    public bool IsBFloat16 { get; }

    /// <summary>Bytes per entry: 2 for bfloat16, 4 for float32.</summary>
    public int ElementSize => IsBFloat16 ? 2 : 4;

    /// <summary>Entries [<paramref name="start"/>, start + <paramref name="length"/>) as their own span.</summary>
    public CpuFloats Slice(long start, long length) =>
        new((byte*)Pointer + start * ElementSize, length, IsBFloat16);

    /// <summary>Entry <paramref name="i"/> as float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public float At(long i) => IsBFloat16
        ? BitConverter.UInt32BitsToSingle((uint)((ushort*)Pointer)[i] << 16)
        : ((float*)Pointer)[i];

    /// <summary>A float32 pointer to entries [start, start + count): the data itself for float32, else
    /// <paramref name="scratch"/> filled with the widened values.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public float* Block(long start, int count, float* scratch)
    {
        if (!IsBFloat16)
        {
            return (float*)Pointer + start;
        }

        Kernels.WidenBFloat16((ushort*)Pointer + start, scratch, count);
        return scratch;
    }
}

/// <summary>Entry points for reading and writing tensor memory from hand-written CPU loops.</summary>
internal static unsafe class CpuTensors
{
    /// <summary>Whether <paramref name="t"/> lives in CPU memory.</summary>
    public static bool OnCpu(Tensor t) => t.device_type == DeviceType.CPU;

    /// <summary>Whether the kernels read <paramref name="t"/> in place: CPU, contiguous, float32 or bfloat16.</summary>
    public static bool IsDirect(Tensor t) =>
        OnCpu(t) && t.dtype is ScalarType.Float32 or ScalarType.BFloat16 && t.is_contiguous();

    /// <summary>The address of the first element of a contiguous CPU tensor (null when it is empty).</summary>
    public static void* Pointer(Tensor t)
    {
        if (t.numel() == 0)
        {
            return null;
        }

        // Tensor.bytes is a Span (at most 2^31 - 1 bytes); a one-element view gives the start of any size.
        using var flat = t.reshape(-1);
        using var first = flat.narrow(0, 0, 1);
        return Unsafe.AsPointer(ref MemoryMarshal.GetReference(first.bytes));
    }

    [ThreadStatic]
    private static int _resultPhase;

    /// <summary>Until disposed, places the kernel results made on this thread (<see cref="WriteKernelResult"/>)
    /// in memory with the remainder that <paramref name="fileOffset"/> leaves modulo
    /// <see cref="NativeBufferPool.Alignment"/>, so that a result bound for that offset of a file is written
    /// there straight from its memory (the engine places each merged tensor where its output goes).</summary>
    public static ResultPlacement PlaceResults(long fileOffset)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(fileOffset);
        var placement = new ResultPlacement(_resultPhase);
        _resultPhase = (int)(fileOffset % NativeBufferPool.Alignment);
        return placement;
    }

    /// <summary>The scope of <see cref="PlaceResults"/>: disposing it restores the placement before it.</summary>
    public readonly struct ResultPlacement(int previous) : IDisposable
    {
        /// <summary>Restores the placement before this scope.</summary>
        public void Dispose() => _resultPhase = previous;
    }

    /// <summary>
    /// A kernel's result of <paramref name="shape"/> in <paramref name="outputType"/>: <paramref name="write"/>
    /// fills pooled memory (its address, and whether it is bfloat16; else float32), which is the result when
    /// <paramref name="outputType"/> is float32 or bfloat16 and is converted into more pooled memory otherwise. If
    /// <paramref name="write"/> throws, the memory is freed.
    /// </summary>
    public static Tensor WriteKernelResult(long[] shape, ScalarType outputType, Action<nint, bool> write)
    {
        bool direct = outputType is ScalarType.Float32 or ScalarType.BFloat16;
        var result = NativeBufferPool.Empty(shape, direct ? outputType : ScalarType.Float32, direct ? _resultPhase : 0);
        try
        {
            write((nint)Pointer(result), result.dtype == ScalarType.BFloat16);
        }
        catch
        {
            result.Dispose();
            throw;
        }

        if (direct)
        {
            return result;
        }

        // Another floating output dtype (float16, float64) is converted into pooled memory, placed.
        using (result)
        {
            return NativeBufferPool.CopyOf(result, outputType, _resultPhase);
        }
    }

    /// <summary>
    /// <paramref name="t"/> (a CPU floating tensor) as float32/bfloat16 memory. Tensors in other dtypes or
    /// layouts are converted into a pooled float32 copy. The caller disposes <paramref name="lease"/> when
    /// done reading: that frees the copy, and until then keeps <paramref name="t"/> alive (its memory is read
    /// through a pointer, so a temporary argument must not be finalized meanwhile).
    /// </summary>
    public static CpuFloats Floats(Tensor t, out FloatsLease lease)
    {
        if (IsDirect(t))
        {
            lease = new FloatsLease(t, null);
            return new CpuFloats(Pointer(t), t.numel(), t.dtype == ScalarType.BFloat16);
        }

        var copy = NativeBufferPool.CopyOf(t, ScalarType.Float32);
        lease = new FloatsLease(t, copy);
        return new CpuFloats(Pointer(copy), copy.numel(), bfloat16: false);
    }
}

/// <summary>What <see cref="CpuTensors.Floats"/> lent: disposing it frees the pooled float32 copy, if one was
/// made, and keeps the source tensor reachable up to that point.</summary>
internal readonly struct FloatsLease(Tensor source, Tensor? copy) : IDisposable
{
    public void Dispose()
    {
        copy?.Dispose();
        GC.KeepAlive(source);
    }
}

/// <summary>NaN and ±∞ detection straight from tensor memory (no temporaries, no libtorch ops).</summary>
internal static unsafe class FiniteValues
{
    private static long _checks;

    /// <summary>Tensors checked by <see cref="AllFinite"/> since the process started (for tests).</summary>
    public static long Checks => Interlocked.Read(ref _checks);

    /// <summary>Elements <see cref="IsAllFinite"/> checks at a time with libtorch, so the check's temporaries
    /// (libtorch's <c>isfinite</c> makes a few of the chunk's size, of its dtype and boolean) stay small next
    /// to the tensor however large the tensor is. Positive; settable for tests.</summary>
    internal static long ChunkElements
    {
        get;
        set => field = value > 0 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "A chunk holds at least one element.");
    } = 1 << 24;

    /// <summary>Whether every entry of <paramref name="t"/> is finite, on any device and for any dtype
    /// (true for integer and boolean tensors): <see cref="AllFinite"/> where it applies, else libtorch's
    /// <c>isfinite</c> over views of at most <see cref="ChunkElements"/> entries of the tensor (never a copy
    /// of it, whatever its strides).</summary>
    public static bool IsAllFinite(Tensor t)
    {
        if (!t.is_floating_point() && !t.is_complex())
        {
            return true;
        }

        return AllFinite(t) ?? ChunksAreFinite(t);
    }

    /// <summary><see cref="IsAllFinite"/> with libtorch, a view of at most <see cref="ChunkElements"/> entries at
    /// a time: slices of a contiguous or one-dimensional tensor's entries, else blocks of whole rows (or
    /// single rows, checked the same way, when a row alone is larger).</summary>
    private static bool ChunksAreFinite(Tensor t)
    {
        long n = t.numel();
        if (n <= ChunkElements)
        {
            using var scope = NewDisposeScope();
            return t.isfinite().all().item<bool>();
        }

        if (t.dim() > 1 && t.is_contiguous())
        {
            using var flat = t.view(-1); // a view of the same entries, sliced by the rows below (rows of 1)
            return ChunksAreFinite(flat);
        }

        long rows = t.shape[0];
        long perRow = n / rows;
        long step = Math.Max(1, ChunkElements / perRow);
        for (long start = 0; start < rows; start += step)
        {
            // A single row larger than a chunk is checked as a tensor of one dimension fewer.
            using var part = perRow > ChunkElements ? t.select(0, start) : t.narrow(0, start, Math.Min(step, rows - start));
            if (!ChunksAreFinite(part))
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>Whether every entry of <paramref name="t"/> is finite, read from its CPU memory, or null when
    /// the tensor is not a contiguous float32/bfloat16 CPU tensor (use <see cref="IsAllFinite"/> then).</summary>
    /// <remarks>An entry is non-finite exactly when its exponent bits are all ones; the test is an OR of
    /// the exponent fields over blocks, vectorized and split over torch's thread count.</remarks>
    public static bool? AllFinite(Tensor t)
    {
        if (!CpuTensors.IsDirect(t))
        {
            return null;
        }

        Interlocked.Increment(ref _checks);

        long n = t.numel();
        if (n == 0)
        {
            return true;
        }

        bool bf16 = t.dtype == ScalarType.BFloat16;
        int found = 0;
        CpuParallel.ForByteBlocks((byte*)CpuTensors.Pointer(t), n * (bf16 ? 2 : 4), (start, length) =>
        {
            if (Volatile.Read(ref found) == 0 && !BlockFinite(start, length, bf16))
            {
                Volatile.Write(ref found, 1);
            }
        });

        return found == 0;
    }

    /// <summary>Whether the float32 or bfloat16 values in the <paramref name="bytes"/> bytes at
    /// <paramref name="p"/> (whole values) are all finite.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static bool BlockFinite(byte* p, int bytes, bool bf16)
    {
        // Each 32-bit word holds one float32 or two bfloat16 values; the exponent masks pick every value's.
        uint exponent = bf16 ? 0x7F80_7F80u : 0x7F80_0000u;
        var mask = new Vector<uint>(exponent);
        var bad = Vector<uint>.Zero;
        int i = 0;
        int step = Vector<byte>.Count;
        for (; i <= bytes - step; i += step)
        {
            var words = Vector.AsVectorUInt32(Vector.Load(p + i));
            if (bf16)
            {
                var hi = words & new Vector<uint>(0x7F80_0000u);
                var lo = words & new Vector<uint>(0x0000_7F80u);
                bad |= Vector.Equals(hi, new Vector<uint>(0x7F80_0000u)) | Vector.Equals(lo, new Vector<uint>(0x0000_7F80u));
            }
            else
            {
                bad |= Vector.Equals(words & mask, mask);
            }
        }

        if (bad != Vector<uint>.Zero)
        {
            return false;
        }

        int unit = bf16 ? 2 : 4;
        for (; i + unit <= bytes; i += unit)
        {
            uint v = bf16 ? ((ushort*)(p + i))[0] & 0x7F80u : ((uint*)(p + i))[0] & 0x7F80_0000u;
            if (v == (bf16 ? 0x7F80u : 0x7F80_0000u))
            {
                return false;
            }
        }

        return true;
    }
}

/// <summary>Vectorized element loops shared by the CPU kernels.</summary>
internal static unsafe class Kernels
{
    /// <summary>The largest lane of <paramref name="keys"/>.</summary>
    public static uint Largest(Vector<uint> keys)
    {
        uint largest = 0;
        for (int lane = 0; lane < Vector<uint>.Count; lane++)
        {
            largest = Math.Max(largest, keys[lane]);
        }

        return largest;
    }

    /// <summary>The largest lane of <paramref name="keys"/>.</summary>
    public static uint Largest(Vector512<uint> keys)
    {
        var half = Vector256.Max(keys.GetLower(), keys.GetUpper());
        uint largest = 0;
        for (int lane = 0; lane < Vector256<uint>.Count; lane++)
        {
            largest = Math.Max(largest, half.GetElement(lane));
        }

        return largest;
    }

    /// <summary>The most significant bit of each lane of <paramref name="mask"/>, lane 0 in bit 0.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ulong LaneBits(Vector<uint> mask) => Vector<uint>.Count switch
    {
        4 => Vector128.ExtractMostSignificantBits(mask.AsVector128()),
        8 => Vector256.ExtractMostSignificantBits(mask.AsVector256()),
        16 => Vector512.ExtractMostSignificantBits(mask.AsVector512()),
        _ => Fallback(mask),
    };

    private static ulong Fallback(Vector<uint> mask)
    {
        ulong bits = 0;
        for (int i = 0; i < Vector<uint>.Count; i++)
        {
            bits |= (ulong)(mask[i] >> 31) << i;
        }

        return bits;
    }

    /// <summary>bfloat16 → float32 (exact: the bits move to the high half).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void WidenBFloat16(ushort* source, float* destination, int count)
    {
        int i = 0;
        int step = Vector<ushort>.Count;
        for (; i <= count - step; i += step)
        {
            // A page ahead: the hardware's prefetch starts over at each 4 KB page, and the selection scan
            // widens each block's base here before reading the experts (2–7% of TIES on bfloat16, 4096×11008).
            if (Sse.IsSupported)
            {
                Sse.Prefetch0((byte*)(source + i) + 4096);
            }

            var v = Vector.Load(source + i);
            Vector.Widen(v, out Vector<uint> low, out Vector<uint> high);
            Vector.Store(Vector.AsVectorSingle(Vector.ShiftLeft(low, 16)), destination + i);
            Vector.Store(Vector.AsVectorSingle(Vector.ShiftLeft(high, 16)), destination + i + step / 2);
        }

        for (; i < count; i++)
        {
            destination[i] = BitConverter.UInt32BitsToSingle((uint)source[i] << 16);
        }
    }

    /// <summary>float32 → bfloat16, rounding to nearest even as libtorch does (NaN becomes 0x7FC0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void NarrowToBFloat16(float* source, ushort* destination, int count)
    {
        int i = 0;
        int step = Vector<ushort>.Count;
        var one = Vector<uint>.One;
        var bias = new Vector<uint>(0x7FFF);
        var nan = new Vector<uint>(0x7FC0);
        for (; i <= count - step; i += step)
        {
            var a = Vector.Load(source + i);
            var b = Vector.Load(source + i + step / 2);
            var ua = Vector.AsVectorUInt32(a);
            var ub = Vector.AsVectorUInt32(b);
            ua = Vector.ShiftRightLogical(ua + (Vector.ShiftRightLogical(ua, 16) & one) + bias, 16);
            ub = Vector.ShiftRightLogical(ub + (Vector.ShiftRightLogical(ub, 16) & one) + bias, 16);
            ua = Vector.ConditionalSelect(Vector.AsVectorUInt32(Vector.Equals(a, a)), ua, nan);
            ub = Vector.ConditionalSelect(Vector.AsVectorUInt32(Vector.Equals(b, b)), ub, nan);
            Vector.Store(Vector.Narrow(ua, ub), destination + i);
        }

        for (; i < count; i++)
        {
            destination[i] = ToBFloat16(source[i]);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ushort ToBFloat16(float value)
    {
        if (float.IsNaN(value))
        {
            return 0x7FC0;
        }

        uint u = BitConverter.SingleToUInt32Bits(value);
        return (ushort)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
}

/// <summary>Deterministic multi-threading: work is cut into fixed blocks whose results never depend on
/// which thread ran them or how many threads there are.</summary>
internal static class CpuParallel
{
    /// <summary>Threads used: torch's intra-op thread count, so <c>torch.set_num_threads</c> governs both.</summary>
    public static int Threads => Math.Max(1, torch.get_num_threads());

    /// <summary>Runs <paramref name="body"/> for every block index in [0, <paramref name="blocks"/>).</summary>
    public static void For(long blocks, Action<long> body)
    {
        int threads = Threads;
        if (threads == 1 || blocks <= 1)
        {
            for (long i = 0; i < blocks; i++)
            {
                body(i);
            }

            return;
        }

        // A few contiguous runs of blocks per thread: enough to balance the load on a busy machine,
        // few enough that scheduling costs nothing next to the blocks themselves.
        long runs = Math.Min(blocks, threads * 8L);
        Parallel.For(0L, runs, new ParallelOptions { MaxDegreeOfParallelism = threads }, run =>
        {
            long end = (run + 1) * blocks / runs;
            for (long i = run * blocks / runs; i < end; i++)
            {
                body(i);
            }
        });
    }

    /// <summary>How many tasks to cut <paramref name="blocks"/> blocks of <paramref name="blockSize"/> entries
    /// into when each task counts into histograms of 32-bit counters: one per thread, or more where a task
    /// would count 2^32 entries or more (a counter could then wrap: one thread, a 2^32-entry tensor, one bin).
    /// The counts are summed, so the answer does not depend on it.</summary>
    public static int CountingTasks(long blocks, int blockSize)
    {
        long mostBlocks = uint.MaxValue / blockSize;
        return (int)Math.Max(Threads, BlockCount(blocks, mostBlocks));
    }

    /// <summary>The number of blocks of <paramref name="blockSize"/> covering <paramref name="length"/>.</summary>
    public static long BlockCount(long length, long blockSize) => (length + blockSize - 1) / blockSize;

    /// <summary>The size of the blocks of <see cref="ForByteBlocks"/>: 1 MiB.</summary>
    public const int ByteBlock = 1 << 20;

    /// <summary>A block of memory: its first byte and its length.</summary>
    public unsafe delegate void ByteBlockBody(byte* start, int length);

    /// <summary>Runs <paramref name="body"/> on each <see cref="ByteBlock"/> bytes of the <paramref name="bytes"/>
    /// bytes at <paramref name="p"/> (the last block shorter), as <see cref="For"/> runs blocks.</summary>
    public static unsafe void ForByteBlocks(byte* p, long bytes, ByteBlockBody body) =>
        For(BlockCount(bytes, ByteBlock), b => body(p + (b * ByteBlock), (int)Math.Min(ByteBlock, bytes - (b * ByteBlock))));
}
