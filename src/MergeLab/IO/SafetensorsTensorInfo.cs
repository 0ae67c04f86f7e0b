using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>Where one tensor lies in a safetensors file and how to interpret its bytes.</summary>
/// <param name="Name">The tensor's name in the header.</param>
/// <param name="DType">The element type.</param>
/// <param name="Shape">The dimensions, outermost first (row-major, as the format requires); empty for a scalar.</param>
/// <param name="DataOffset">The absolute byte offset of the first element in the file
/// (8 + header size + the header's <c>data_offsets[0]</c>).</param>
/// <param name="ByteLength">The number of bytes: element count × element size.</param>
/// <remarks>Immutable, and so thread-safe, as long as the <paramref name="Shape"/> array is not modified.</remarks>
public sealed record SafetensorsTensorInfo(string Name, ScalarType DType, long[] Shape, long DataOffset, long ByteLength)
{
    /// <summary>The number of elements: the product of <see cref="Shape"/> (1 for a scalar).</summary>
    public long ElementCount => ByteLength / SafetensorsDType.ElementSize(DType);

    /// <summary>The dtype as the header spells it, e.g. <c>"BF16"</c>.</summary>
    public string DTypeName => SafetensorsDType.ToName(DType);

    /// <summary>Value equality, comparing <see cref="Shape"/> element by element (a record would compare the array reference).</summary>
    public bool Equals(SafetensorsTensorInfo? other) =>
        other is not null && Name == other.Name && DType == other.DType && Shape.AsSpan().SequenceEqual(other.Shape)
        && DataOffset == other.DataOffset && ByteLength == other.ByteLength;

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(Name, DType, Shape.Length, DataOffset, ByteLength);
}
