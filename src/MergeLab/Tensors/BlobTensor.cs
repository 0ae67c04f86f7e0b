using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace MergeLab.Tensors;

/// <summary>CPU tensors over memory that MergeLab allocates or maps itself: libtorch's <c>from_blob</c>
/// with a deleter, which libtorch calls with the data pointer when it frees the tensor's storage (after
/// the last tensor viewing it is disposed or finalized). Used by the buffer pool and by mapped reads.</summary>
internal static unsafe class BlobTensor
{
    /// <summary>A contiguous CPU tensor of <paramref name="shape"/> and <paramref name="dtype"/> over
    /// <paramref name="data"/>, which <paramref name="release"/> gets back when libtorch frees it; null when
    /// libtorch makes no tensor (the caller still owns the memory then). The caller owns the tensor.</summary>
    /// <exception cref="EntryPointNotFoundException">The native library lacks the entry point (as do the
    /// other P/Invoke failures, <see cref="DllNotFoundException"/> and <see cref="MarshalDirectiveException"/>).</exception>
    public static Tensor? Create(nint data, ReadOnlySpan<long> shape, ScalarType dtype, delegate* unmanaged[Cdecl]<IntPtr, void> release)
    {
        IntPtr handle;
        fixed (long* sizes = shape)
        {
            handle = THSTensor_new(data, (IntPtr)release, (IntPtr)sizes, shape.Length, (sbyte)dtype, (sbyte)dtype, 0, 0, false);
        }

        return handle == IntPtr.Zero ? null : Tensor.UnsafeCreateTensor(handle);
    }

    // LibTorchSharp's tensor-over-memory constructor (torch::from_blob with a deleter), the one TorchSharp's
    // own array factories use; on the CPU it neither copies nor converts when both dtypes agree.
    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_new(IntPtr data, IntPtr deleter, IntPtr sizes, int szlength, sbyte scalarType,
        sbyte dtype, int deviceType, int deviceIndex, [MarshalAs(UnmanagedType.U1)] bool requiresGrad);
}
