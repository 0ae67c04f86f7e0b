using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace MergeLab.Selection;

/// <summary>
/// The float32 lane operations of a merge loop, for one SIMD width, so one generic loop compiles to
/// <see cref="Vector{T}"/> code everywhere and to 512-bit code where the CPU has it: .NET keeps
/// <see cref="Vector{T}"/> at 256 bits on AVX-512 hardware unless the process sets
/// <c>DOTNET_MaxVectorTBitWidth</c>, which a library cannot do for its caller. Every operation is
/// elementwise and IEEE-exact, so both widths give the same bits.
/// </summary>
/// <typeparam name="TV">The vector type.</typeparam>
internal unsafe interface ISimdLanes<TV>
    where TV : unmanaged
{
    /// <summary>Lanes per vector.</summary>
    static abstract int Count { get; }

    static abstract TV Zero { get; }

    static abstract TV One { get; }

    static abstract TV Broadcast(float value);

    /// <summary>A vector whose lanes hold the bits <paramref name="bits"/>.</summary>
    static abstract TV BroadcastBits(uint bits);

    static abstract TV Add(TV a, TV b);

    static abstract TV Subtract(TV a, TV b);

    static abstract TV Multiply(TV a, TV b);

    static abstract TV Divide(TV a, TV b);

    /// <summary>Lanes of <paramref name="yes"/> where <paramref name="mask"/> (all ones or zero) is set, else of <paramref name="no"/>.</summary>
    static abstract TV Select(TV mask, TV yes, TV no);

    /// <summary><paramref name="x"/> with its sign flipped where <paramref name="signBits"/> holds the sign
    /// bit (the bits of x XOR signBits).</summary>
    static abstract TV FlipSign(TV x, TV signBits);

    static abstract TV GreaterThan(TV a, TV b);

    static abstract TV LessThan(TV a, TV b);

    static abstract TV EqualTo(TV a, TV b);

    static abstract TV GreaterThanOrEqual(TV a, TV b);

    /// <summary>x86's min: <paramref name="b"/> when either lane is NaN.</summary>
    static abstract TV MinNative(TV a, TV b);

    /// <summary>x86's max: <paramref name="b"/> when either lane is NaN.</summary>
    static abstract TV MaxNative(TV a, TV b);

    static abstract TV Abs(TV x);

    /// <summary>a·b + c with one rounding.</summary>
    static abstract TV FusedMultiplyAdd(TV a, TV b, TV c);

    /// <summary>Rounds to the nearest integer, ties to even.</summary>
    static abstract TV Round(TV x);

    /// <summary>2^k for integral lanes k in [−126, 127], from the exponent bits (the native conversion:
    /// no saturation needed in that range).</summary>
    static abstract TV PowerOfTwo(TV k);

    /// <summary>Whether no bit of <paramref name="mask"/> is set.</summary>
    static abstract bool None(TV mask);

    static abstract TV Read(float* p);

    static abstract void Write(TV x, float* p);

    /// <summary>All ones where the magnitude bits of <paramref name="x"/> are at least <paramref name="limitBits"/>'s, as unsigned integers.</summary>
    static abstract TV MagnitudeAtLeast(TV x, TV limitBits);

    /// <summary>All ones where lo ≤ the magnitude bits of <paramref name="x"/> &lt; lo + span, as unsigned
    /// integers (magnitudes and bounds are at most 2^31, so key − lo &lt; span, unsigned, says it).</summary>
    static abstract TV MagnitudeInRange(TV x, TV lowBits, TV spanBits);

    /// <summary>The sum of the lanes (exact when they hold small integers).</summary>
    static abstract float Sum(TV x);

    /// <summary>The generator states of the words behind <see cref="Count"/> entries (two per 64-bit lane,
    /// held in the vector's bits) whose first word has state <paramref name="state"/> (see
    /// <see cref="Stages.DropMask.FirstState"/>).</summary>
    static abstract TV RandomStates(ulong state);

    /// <summary>A vector whose 64-bit lanes all hold <paramref name="value"/>.</summary>
    static abstract TV BroadcastWord(ulong value);

    /// <summary>The states <paramref name="states"/> moved on by <paramref name="step"/> (64-bit lanes).</summary>
    static abstract TV AdvanceStates(TV states, TV step);

    /// <summary>DARE's keep mask (all ones = keep) of the entries of <paramref name="states"/>: their
    /// 24-bit uniforms at least <paramref name="thresholdBits"/>.</summary>
    static abstract TV RandomKeep(TV states, TV thresholdBits);

    /// <summary>2·<see cref="Count"/> entries from index <paramref name="i"/> of float32 or bfloat16 memory, widened to float32.</summary>
    static abstract void Load(nint p, bool bf16, long i, out TV low, out TV high);

    /// <summary>Stores 2·<see cref="Count"/> entries at index <paramref name="i"/>, in float32 or rounded to
    /// bfloat16 (to nearest even, NaN kept quiet) as libtorch's conversion does.</summary>
    static abstract void Store(void* output, bool bf16, long i, TV low, TV high);
}

/// <summary>Lane operations on <see cref="Vector{T}"/> (256 bits on AVX2 and AVX-512 CPUs by default).</summary>
internal readonly unsafe struct VectorLanes : ISimdLanes<Vector<float>>
{
    public static int Count => Vector<float>.Count;

    public static Vector<float> Zero => Vector<float>.Zero;

    public static Vector<float> One => Vector<float>.One;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Broadcast(float value) => new(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> BroadcastBits(uint bits) => Vector.AsVectorSingle(new Vector<uint>(bits));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Add(Vector<float> a, Vector<float> b) => a + b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Subtract(Vector<float> a, Vector<float> b) => a - b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Multiply(Vector<float> a, Vector<float> b) => a * b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Divide(Vector<float> a, Vector<float> b) => a / b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Select(Vector<float> mask, Vector<float> yes, Vector<float> no) => Vector.ConditionalSelect(mask, yes, no);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> FlipSign(Vector<float> x, Vector<float> signBits) => Vector.Xor(x, signBits);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> GreaterThan(Vector<float> a, Vector<float> b) => Vector.AsVectorSingle(Vector.GreaterThan(a, b));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> LessThan(Vector<float> a, Vector<float> b) => Vector.AsVectorSingle(Vector.LessThan(a, b));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> EqualTo(Vector<float> a, Vector<float> b) => Vector.AsVectorSingle(Vector.Equals(a, b));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> GreaterThanOrEqual(Vector<float> a, Vector<float> b) => Vector.AsVectorSingle(Vector.GreaterThanOrEqual(a, b));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> MinNative(Vector<float> a, Vector<float> b) => Vector.MinNative(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> MaxNative(Vector<float> a, Vector<float> b) => Vector.MaxNative(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Abs(Vector<float> x) => Vector.Abs(x);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> FusedMultiplyAdd(Vector<float> a, Vector<float> b, Vector<float> c) => Vector.FusedMultiplyAdd(a, b, c);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Round(Vector<float> x) => Vector.Round(x);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> PowerOfTwo(Vector<float> k) =>
        Vector.AsVectorSingle(Vector.ShiftLeft(Vector.ConvertToInt32Native(k) + new Vector<int>(127), 23));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool None(Vector<float> mask) => Vector.EqualsAll(Vector.AsVectorInt32(mask), Vector<int>.Zero);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> Read(float* p) => Vector.Load(p);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Write(Vector<float> x, float* p) => Vector.Store(x, p);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> MagnitudeAtLeast(Vector<float> x, Vector<float> limitBits) =>
        Vector.AsVectorSingle(Vector.GreaterThanOrEqual(
            Vector.AsVectorUInt32(x) & new Vector<uint>(FloatKeys.MagnitudeMask), Vector.AsVectorUInt32(limitBits)));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> MagnitudeInRange(Vector<float> x, Vector<float> lowBits, Vector<float> spanBits) =>
        Vector.AsVectorSingle(Vector.LessThan(
            (Vector.AsVectorUInt32(x) & new Vector<uint>(FloatKeys.MagnitudeMask)) - Vector.AsVectorUInt32(lowBits), Vector.AsVectorUInt32(spanBits)));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(Vector<float> x) => Vector.Sum(x);

    public static Vector<float> BroadcastWord(ulong value) => Vector.AsVectorSingle(new Vector<ulong>(value));

    public static Vector<float> RandomStates(ulong state) => Vector.AsVectorSingle(Stages.DropMask.LaneStates(state));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> AdvanceStates(Vector<float> states, Vector<float> step) =>
        Vector.AsVectorSingle(Vector.AsVectorUInt64(states) + Vector.AsVectorUInt64(step));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector<float> RandomKeep(Vector<float> states, Vector<float> thresholdBits) =>
        Vector.AsVectorSingle(Stages.DropMask.KeepMask(Vector.AsVectorUInt64(states), Vector.AsVectorUInt32(thresholdBits)));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Load(nint p, bool bf16, long i, out Vector<float> low, out Vector<float> high)
    {
        if (bf16)
        {
            Vector.Widen(Vector.Load((ushort*)p + i), out Vector<uint> a, out Vector<uint> b);
            low = Vector.AsVectorSingle(Vector.ShiftLeft(a, 16));
            high = Vector.AsVectorSingle(Vector.ShiftLeft(b, 16));
        }
        else
        {
            low = Vector.Load((float*)p + i);
            high = Vector.Load((float*)p + i + Vector<float>.Count);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(void* output, bool bf16, long i, Vector<float> low, Vector<float> high)
    {
        if (!bf16)
        {
            Vector.Store(low, (float*)output + i);
            Vector.Store(high, (float*)output + i + Vector<float>.Count);
            return;
        }

        Vector.Store(Vector.Narrow(RoundToBFloat16(low), RoundToBFloat16(high)), (ushort*)output + i);
    }

    /// <summary>The bfloat16 bits (in the low half of each lane) of float32 lanes, rounded to nearest even; NaN becomes the quiet 0x7FC0.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<uint> RoundToBFloat16(Vector<float> x)
    {
        var u = Vector.AsVectorUInt32(x);
        u = Vector.ShiftRightLogical(u + (Vector.ShiftRightLogical(u, 16) & Vector<uint>.One) + new Vector<uint>(0x7FFF), 16);
        return Vector.ConditionalSelect(Vector.AsVectorUInt32(Vector.Equals(x, x)), u, new Vector<uint>(0x7FC0));
    }
}

/// <summary>Lane operations on <see cref="Vector512{T}"/>; use only where <see cref="Vector512.IsHardwareAccelerated"/>.</summary>
internal readonly unsafe struct Vector512Lanes : ISimdLanes<Vector512<float>>
{
    public static int Count => Vector512<float>.Count;

    public static Vector512<float> Zero => Vector512<float>.Zero;

    public static Vector512<float> One => Vector512<float>.One;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Broadcast(float value) => Vector512.Create(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> BroadcastBits(uint bits) => Vector512.Create(bits).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Subtract(Vector512<float> a, Vector512<float> b) => a - b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Multiply(Vector512<float> a, Vector512<float> b) => a * b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Divide(Vector512<float> a, Vector512<float> b) => a / b;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Select(Vector512<float> mask, Vector512<float> yes, Vector512<float> no) => Vector512.ConditionalSelect(mask, yes, no);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> FlipSign(Vector512<float> x, Vector512<float> signBits) => x ^ signBits;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> GreaterThan(Vector512<float> a, Vector512<float> b) => Vector512.GreaterThan(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> LessThan(Vector512<float> a, Vector512<float> b) => Vector512.LessThan(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> EqualTo(Vector512<float> a, Vector512<float> b) => Vector512.Equals(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> GreaterThanOrEqual(Vector512<float> a, Vector512<float> b) => Vector512.GreaterThanOrEqual(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> MinNative(Vector512<float> a, Vector512<float> b) => Vector512.MinNative(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> MaxNative(Vector512<float> a, Vector512<float> b) => Vector512.MaxNative(a, b);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Abs(Vector512<float> x) => Vector512.Abs(x);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> FusedMultiplyAdd(Vector512<float> a, Vector512<float> b, Vector512<float> c) => Vector512.FusedMultiplyAdd(a, b, c);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Round(Vector512<float> x) => Vector512.Round(x);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> PowerOfTwo(Vector512<float> k) =>
        Vector512.ShiftLeft(Vector512.ConvertToInt32Native(k) + Vector512.Create(127), 23).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool None(Vector512<float> mask) => Vector512.EqualsAll(mask.AsInt32(), Vector512<int>.Zero);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Read(float* p) => Vector512.Load(p);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Write(Vector512<float> x, float* p) => x.Store(p);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> MagnitudeAtLeast(Vector512<float> x, Vector512<float> limitBits) =>
        Vector512.GreaterThanOrEqual(x.AsUInt32() & Vector512.Create(FloatKeys.MagnitudeMask), limitBits.AsUInt32()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> MagnitudeInRange(Vector512<float> x, Vector512<float> lowBits, Vector512<float> spanBits) =>
        Vector512.LessThan((x.AsUInt32() & Vector512.Create(FloatKeys.MagnitudeMask)) - lowBits.AsUInt32(), spanBits.AsUInt32()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(Vector512<float> x) => Vector512.Sum(x);

    public static Vector512<float> BroadcastWord(ulong value) => Vector512.Create(value).AsSingle();

    public static Vector512<float> RandomStates(ulong state) => Stages.DropMask.LaneStates512(state).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> AdvanceStates(Vector512<float> states, Vector512<float> step) =>
        (states.AsUInt64() + step.AsUInt64()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> RandomKeep(Vector512<float> states, Vector512<float> thresholdBits) =>
        Stages.DropMask.KeepMask(states.AsUInt64(), thresholdBits.AsUInt32()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Load(nint p, bool bf16, long i, out Vector512<float> low, out Vector512<float> high)
    {
        if (bf16)
        {
            var (a, b) = Vector512.Widen(Vector512.Load((ushort*)p + i));
            low = Vector512.ShiftLeft(a, 16).AsSingle();
            high = Vector512.ShiftLeft(b, 16).AsSingle();
        }
        else
        {
            low = Vector512.Load((float*)p + i);
            high = Vector512.Load((float*)p + i + Vector512<float>.Count);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(void* output, bool bf16, long i, Vector512<float> low, Vector512<float> high)
    {
        if (!bf16)
        {
            low.Store((float*)output + i);
            high.Store((float*)output + i + Vector512<float>.Count);
            return;
        }

        Vector512.Narrow(RoundToBFloat16(low), RoundToBFloat16(high)).Store((ushort*)output + i);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<uint> RoundToBFloat16(Vector512<float> x)
    {
        var u = x.AsUInt32();
        u = Vector512.ShiftRightLogical(u + (Vector512.ShiftRightLogical(u, 16) & Vector512<uint>.One) + Vector512.Create(0x7FFFu), 16);
        return Vector512.ConditionalSelect(Vector512.Equals(x, x).AsUInt32(), u, Vector512.Create(0x7FC0u));
    }
}
