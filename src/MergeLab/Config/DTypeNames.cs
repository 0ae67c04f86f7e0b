using static TorchSharp.torch;

namespace MergeLab.Config;

/// <summary>dtype names in configs: mergekit's <c>dtype_from_name</c> names (<c>float32</c>,
/// <c>float16</c>, <c>bfloat16</c>, optionally prefixed <c>torch.</c>) plus the usual short forms.</summary>
internal static class DTypeNames
{
    public const string Accepted = "float32 (fp32), float16 (fp16, half), bfloat16 (bf16), float64 (fp64), optionally prefixed 'torch.'";

    public static ScalarType? Parse(string name)
    {
        var n = name.StartsWith("torch.", StringComparison.Ordinal) ? name["torch.".Length..] : name;
        return n switch
        {
            "float32" or "fp32" or "float" => ScalarType.Float32,
            "float16" or "fp16" or "half" => ScalarType.Float16,
            "bfloat16" or "bf16" => ScalarType.BFloat16,
            "float64" or "fp64" or "double" => ScalarType.Float64,
            _ => null,
        };
    }

    /// <summary>Whether merged values can be stored as <paramref name="dtype"/>: float16, bfloat16, float32 or
    /// float64 (an integer or boolean type would truncate them silently).</summary>
    public static bool IsFloating(ScalarType dtype) =>
        dtype is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64;

    /// <summary>Why a tensor that is floating-point in one input and not in another is refused: the end of
    /// each check's message (the engine's, the state dicts', a tensor group's).</summary>
    internal const string KindMismatchReason = "a floating-point tensor is merged only with floating-point ones (of any precision).";

    /// <summary>The name PyTorch and Hugging Face configs give a floating-point <paramref name="dtype"/> (<c>bfloat16</c>, …).</summary>
    public static string TorchName(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => "float32",
        ScalarType.Float16 => "float16",
        ScalarType.BFloat16 => "bfloat16",
        ScalarType.Float64 => "float64",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "Not a floating-point dtype."),
    };

    /// <summary>Throws unless <paramref name="dtype"/> (when given) is a floating-point type (<see cref="IsFloating"/>).</summary>
    /// <exception cref="ArgumentException">It is not.</exception>
    public static void RequireFloating(ScalarType? dtype, string name)
    {
        if (dtype is { } t && !IsFloating(t))
        {
            throw new ArgumentException($"The output dtype must be a floating-point type (float16, bfloat16, float32 or float64), but was {t}.", name);
        }
    }
}
