using TorchSharp;

namespace MergeLab.Tensors;

/// <summary>
/// Numbers passed to libtorch as <see cref="Scalar"/>s that stay alive. TorchSharp 0.107 converts a number
/// argument (<c>t.eq(0)</c>) into a finalizable <see cref="Scalar"/> and passes only its native handle on, so
/// a garbage collection during the native call can free it before libtorch reads it ("Unknown scalar
/// type"). The library therefore passes scalars it holds: these shared constants, or a
/// <c>using var s = value.ToScalar();</c> that lives until the call has returned.
/// </summary>
internal static class ScalarArgs
{
    /// <summary>The integer 0 (as the literal <c>0</c> converts).</summary>
    public static readonly Scalar Zero = 0.ToScalar();

    /// <summary>The integer 1 (as the literal <c>1</c> converts).</summary>
    public static readonly Scalar One = 1.ToScalar();
}
