using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// The safetensors dtype names MergeLab reads and writes, and their TorchSharp element types:
/// F64, F32, F16, BF16, I64, I32, I16, I8, U8 and BOOL.
/// </summary>
/// <remarks>
/// The format also defines F8_*, F6_*, F4, U16, U32, U64 and C64; TorchSharp 0.107 has no matching
/// <see cref="ScalarType"/> for most of them, so a file using one is refused with a message that says
/// the dtype is valid but unsupported (rather than unknown). Stateless and thread-safe.
/// </remarks>
public static class SafetensorsDType
{
    // (name, type, bytes, rank). Rank is the position of the dtype in the reference's `Dtype` enum
    // (huggingface/safetensors safetensors/src/tensor.rs), whose derived ordering the reference
    // writer sorts by; only the relative order matters, and it is the same in every release.
    private static readonly (string Name, ScalarType Type, int Size, int Rank)[] Supported =
    [
        ("BOOL", ScalarType.Bool, 1, 0),
        ("U8", ScalarType.Byte, 1, 4),
        ("I8", ScalarType.Int8, 1, 5),
        ("I16", ScalarType.Int16, 2, 11),
        ("F16", ScalarType.Float16, 2, 13),
        ("BF16", ScalarType.BFloat16, 2, 14),
        ("I32", ScalarType.Int32, 4, 15),
        ("F32", ScalarType.Float32, 4, 17),
        ("F64", ScalarType.Float64, 8, 19),
        ("I64", ScalarType.Int64, 8, 20),
    ];

    // Valid in the format, but without a TorchSharp element type here.
    private static readonly HashSet<string> KnownUnsupported = new(StringComparer.Ordinal)
    {
        "F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
        "U16", "U32", "U64", "C64",
    };

    /// <summary>The element type named <paramref name="name"/> (case-sensitive, e.g. <c>"BF16"</c>),
    /// or false when the name is not one MergeLab supports.</summary>
    public static bool TryParse(string name, out ScalarType type)
    {
        foreach (var d in Supported)
        {
            if (string.Equals(d.Name, name, StringComparison.Ordinal))
            {
                type = d.Type;
                return true;
            }
        }

        type = default;
        return false;
    }

    /// <summary>The header name of <paramref name="type"/>, e.g. <c>"F32"</c> for <see cref="ScalarType.Float32"/>.</summary>
    /// <exception cref="ArgumentException">The type has no safetensors name MergeLab supports.</exception>
    public static string ToName(ScalarType type) => Find(type).Name;

    /// <summary>Whether <paramref name="type"/> can be stored in a safetensors file by MergeLab.</summary>
    public static bool IsSupported(ScalarType type) => Supported.Any(d => d.Type == type);

    /// <summary>The size of one element of <paramref name="type"/> in bytes (1, 2, 4 or 8).</summary>
    /// <exception cref="ArgumentException">The type has no safetensors name MergeLab supports.</exception>
    public static int ElementSize(ScalarType type) => Find(type).Size;

    /// <summary>The bytes <paramref name="tensor"/>'s entries take in a safetensors file (its entry count
    /// times <see cref="ElementSize"/>); throws for an element type safetensors cannot hold.</summary>
    internal static long ByteLength(Tensor tensor) => checked(tensor.numel() * ElementSize(tensor.dtype));

    /// <summary>Whether <paramref name="name"/> is a dtype the format defines but MergeLab cannot load.</summary>
    internal static bool IsKnownUnsupported(string name) => KnownUnsupported.Contains(name);

    /// <summary>The position of <paramref name="type"/> in the reference's dtype order; the reference
    /// writer puts higher ranks first.</summary>
    internal static int Rank(ScalarType type) => Find(type).Rank;

    private static (string Name, ScalarType Type, int Size, int Rank) Find(ScalarType type)
    {
        foreach (var d in Supported)
        {
            if (d.Type == type)
            {
                return d;
            }
        }

        throw new ArgumentException(
            $"The element type {type} cannot be stored in safetensors by MergeLab; supported types: {string.Join(", ", Supported.Select(d => d.Type))}.",
            nameof(type));
    }
}
