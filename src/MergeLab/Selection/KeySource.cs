using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace MergeLab.Selection;

/// <summary>
/// Order-preserving 32-bit keys of float32 values: selecting among keys (unsigned order) selects among
/// the values. Magnitudes are the bits with the sign cleared (|−0| = +0; NaN above +∞, as
/// <c>kthvalue</c> and <c>sort</c> place it). Signed values flip the sign bit of positives and every
/// bit of negatives, with −0 taken as +0 (torch compares them equal) and every NaN as the largest key.
/// </summary>
internal static class FloatKeys
{
    public const uint MagnitudeMask = 0x7FFF_FFFF;

    /// <summary>The smallest magnitude key of a non-finite value (+∞); NaN keys lie above it.</summary>
    public const uint NonFiniteMagnitude = 0x7F80_0000;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint Magnitude(float value) => BitConverter.SingleToUInt32Bits(value) & MagnitudeMask;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint Signed(float value)
    {
        if (float.IsNaN(value))
        {
            return uint.MaxValue;
        }

        uint u = BitConverter.SingleToUInt32Bits(value);
        if (u == 0x8000_0000)
        {
            u = 0;
        }

        return (u & 0x8000_0000) != 0 ? ~u : u | 0x8000_0000;
    }

    /// <summary>The float32 value of a key from <see cref="Magnitude"/> or <c>Signed</c>.</summary>
    public static float Value(uint key, bool signed) => !signed
        ? BitConverter.UInt32BitsToSingle(key)
        : BitConverter.UInt32BitsToSingle((key & 0x8000_0000) != 0 ? key & MagnitudeMask : ~key);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<uint> Signed(Vector<float> values)
    {
        var u = Vector.AsVectorUInt32(values);
        var top = new Vector<uint>(0x8000_0000);
        u = Vector.AndNot(u, Vector.Equals(u, top)); // −0 → +0
        var negative = Vector.Equals(u & top, top);
        var key = Vector.ConditionalSelect(negative, ~u, u | top);
        return Vector.ConditionalSelect(Vector.AsVectorUInt32(Vector.Equals(values, values)), key, new Vector<uint>(uint.MaxValue));
    }

    /// <summary>As <see cref="Signed(Vector{float})"/>, on 512-bit vectors.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<uint> Signed(Vector512<float> values)
    {
        var u = values.AsUInt32();
        var top = Vector512.Create(0x8000_0000u);
        u = Vector512.AndNot(u, Vector512.Equals(u, top)); // −0 → +0
        var negative = Vector512.Equals(u & top, top);
        var key = Vector512.ConditionalSelect(negative, ~u, u | top);
        return Vector512.ConditionalSelect(Vector512.Equals(values, values).AsUInt32(), key, Vector512.Create(uint.MaxValue));
    }
}

/// <summary>
/// A source of <see cref="FloatKeys"/> over an implicit array of <see cref="Length"/> values, filled block by
/// block so a selection never materializes the values (e.g. |θ_k − θ_base| is computed as it is read).
/// </summary>
internal abstract unsafe class KeySource
{
    /// <summary>The number of keys.</summary>
    public abstract long Length { get; }

    /// <summary>Whether keys are of signed values (for turning a key back into a value).</summary>
    public virtual bool IsSigned => false;

    /// <summary>Writes the keys of entries [<paramref name="start"/>, start + <paramref name="count"/>) to
    /// <paramref name="keys"/>, using <paramref name="scratch"/> (at least 2·count floats) as it likes.</summary>
    public abstract void Fill(long start, int count, uint* keys, float* scratch);

    /// <summary>As <see cref="Fill"/>, for a selection that only tells keys below <paramref name="floor"/>
    /// apart from the others: a key below it may be written as any key below it (a source whose keys are
    /// costly can then skip computing them exactly). By default, <see cref="Fill"/>.</summary>
    public virtual void FillFrom(long start, int count, uint* keys, float* scratch, uint floor) => Fill(start, count, keys, scratch);

    /// <summary>For a selection that only counts the keys below <paramref name="floor"/>: writes the keys of
    /// the entries of [<paramref name="start"/>, start + <paramref name="count"/>) that may reach it to
    /// <paramref name="keys"/>, packed in any order, and returns how many it wrote; every entry left out has
    /// a key below the floor. A source that cannot leave entries out returns −1 (the default), and the
    /// caller takes <see cref="FillFrom"/>.</summary>
    public virtual int FillPacked(long start, int count, uint* keys, float* scratch, uint floor) => -1;

    /// <summary>The key of entry <paramref name="i"/>.</summary>
    public abstract uint KeyAt(long i);

    /// <summary>Runs <paramref name="body"/> on every block of <see cref="ExactSelector.BlockSize"/> keys,
    /// in parallel, each block's keys filled into the calling thread's scratch.</summary>
    public void ForEachBlock(KeyBlockBody body)
    {
        long n = Length;
        CpuParallel.For(CpuParallel.BlockCount(n, ExactSelector.BlockSize), block =>
        {
            long start = block * ExactSelector.BlockSize;
            int count = (int)Math.Min(ExactSelector.BlockSize, n - start);
            var scratch = ThreadScratch.Get(ExactSelector.BlockSize * 12L);
            var keys = (uint*)scratch;
            Fill(start, count, keys, (float*)(scratch + ExactSelector.BlockSize * 4L));
            body(block, start, count, keys);
        });
    }
}

/// <summary>The work on one block of keys: its number, first entry, length and keys.</summary>
internal unsafe delegate void KeyBlockBody(long block, long start, int count, uint* keys);

/// <summary>|x| of float32/bfloat16 memory.</summary>
internal sealed unsafe class MagnitudeKeys(CpuFloats values) : KeySource
{
    public override long Length => values.Length;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public override void Fill(long start, int count, uint* keys, float* scratch)
    {
        var x = values.Block(start, count, scratch);
        int i = 0;
        var mask = new Vector<uint>(FloatKeys.MagnitudeMask);
        for (; i <= count - Vector<uint>.Count; i += Vector<uint>.Count)
        {
            Vector.Store(Vector.AsVectorUInt32(Vector.Load(x + i)) & mask, keys + i);
        }

        for (; i < count; i++)
        {
            keys[i] = FloatKeys.Magnitude(x[i]);
        }
    }

    public override uint KeyAt(long i) => FloatKeys.Magnitude(values.At(i));
}

/// <summary>Signed float32/bfloat16 values.</summary>
internal sealed unsafe class SignedKeys(CpuFloats values) : KeySource
{
    public override long Length => values.Length;

    public override bool IsSigned => true;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public override void Fill(long start, int count, uint* keys, float* scratch)
    {
        var x = values.Block(start, count, scratch);
        int i = 0;
        for (; i <= count - Vector<uint>.Count; i += Vector<uint>.Count)
        {
            Vector.Store(FloatKeys.Signed(Vector.Load(x + i)), keys + i);
        }

        for (; i < count; i++)
        {
            keys[i] = FloatKeys.Signed(x[i]);
        }
    }

    public override uint KeyAt(long i) => FloatKeys.Signed(values.At(i));
}

/// <summary>|θ − θ_base|, the magnitude of a task vector computed in float32 as it is read.</summary>
internal sealed unsafe class DifferenceMagnitudeKeys(CpuFloats expert, CpuFloats baseValues) : KeySource
{
    public CpuFloats Expert { get; } = expert;

    public CpuFloats Base { get; } = baseValues;

    public override long Length => Expert.Length;

    public override void Fill(long start, int count, uint* keys, float* scratch) => Fill(Expert, Base, start, count, keys);

    /// <summary>The keys of entries [<paramref name="start"/>, start + <paramref name="count"/>) of
    /// |<paramref name="expert"/> − <paramref name="baseValues"/>| into <paramref name="keys"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Fill(CpuFloats expert, CpuFloats baseValues, long start, int count, uint* keys)
    {
        int w = Vector<float>.Count;
        var mask = new Vector<uint>(FloatKeys.MagnitudeMask);
        int i = 0;
        for (; i <= count - 2 * w; i += 2 * w)
        {
            Load(expert, start + i, out var e0, out var e1);
            Load(baseValues, start + i, out var b0, out var b1);
            Vector.Store(Vector.AsVectorUInt32(e0 - b0) & mask, keys + i);
            Vector.Store(Vector.AsVectorUInt32(e1 - b1) & mask, keys + i + w);
        }

        for (; i < count; i++)
        {
            keys[i] = FloatKeys.Magnitude(expert.At(start + i) - baseValues.At(start + i));
        }
    }

    public override uint KeyAt(long i) => FloatKeys.Magnitude(Expert.At(i) - Base.At(i));

    /// <summary>2·lanes entries from <paramref name="index"/> as float32 (bfloat16 widened exactly).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Load(CpuFloats x, long index, out Vector<float> low, out Vector<float> high)
    {
        if (x.IsBFloat16)
        {
            Vector.Widen(Vector.Load((ushort*)x.Pointer + index), out Vector<uint> a, out Vector<uint> b);
            low = Vector.AsVectorSingle(Vector.ShiftLeft(a, 16));
            high = Vector.AsVectorSingle(Vector.ShiftLeft(b, 16));
        }
        else
        {
            low = Vector.Load((float*)x.Pointer + index);
            high = Vector.Load((float*)x.Pointer + index + Vector<float>.Count);
        }
    }
}

/// <summary>Per-thread scratch memory for the kernels, pinned so loops can use raw pointers.</summary>
internal static unsafe class ThreadScratch
{
    [ThreadStatic]
    private static byte[]? _buffer;

    /// <summary>At least <paramref name="bytes"/> bytes, 64-byte aligned, valid on this thread until the next call.</summary>
    public static byte* Get(long bytes) => Get(ref _buffer, bytes, out _);

    /// <summary>As <see cref="Get(long)"/>, from a buffer of the caller's own (a <c>[ThreadStatic]</c> field,
    /// for scratch that must outlive other code's use of the shared one); <paramref name="fresh"/> says
    /// whether it was just allocated, so its old contents are gone.</summary>
    public static byte* Get(ref byte[]? buffer, long bytes, out bool fresh)
    {
        fresh = buffer is null || buffer.Length < bytes + 64;
        if (fresh)
        {
            buffer = GC.AllocateUninitializedArray<byte>((int)Math.Max(bytes + 64, 1 << 16), pinned: true);
        }

        var p = (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(buffer!));
        return (byte*)(((nint)p + 63) & ~(nint)63);
    }
}
