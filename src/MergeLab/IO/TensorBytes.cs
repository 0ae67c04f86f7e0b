using Microsoft.Win32.SafeHandles;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// Moves the raw bytes of a contiguous CPU tensor between its storage and a file, in chunks, because
/// TorchSharp exposes tensor memory as a <see cref="Span{T}"/>, which holds at most 2^31-1 bytes
/// while one embedding matrix can hold more.
/// </summary>
internal static class TensorBytes
{
    /// <summary>1 GiB: large enough that per-chunk overhead vanishes, well under the span limit.</summary>
    public const int DefaultChunkBytes = 1 << 30;

    /// <summary>Bytes read at a time while checking for NaN and ±∞, so each chunk is still in the cache
    /// when it is checked.</summary>
    public const int FiniteCheckChunkBytes = 1 << 20;

    /// <summary>Fills the contiguous CPU tensor <paramref name="destination"/> with the bytes at
    /// <paramref name="fileOffset"/>, using positioned reads (safe to run from several threads on one handle).</summary>
    /// <returns>With <paramref name="checkFinite"/> on a float32 or bfloat16 tensor, whether every value
    /// read is finite (each chunk checked right after it is read); null otherwise.</returns>
    public static unsafe bool? Read(SafeFileHandle file, long fileOffset, Tensor destination, string path, string name, int chunkBytes, bool checkFinite = false)
    {
        bool scan = checkFinite && destination.dtype is ScalarType.Float32 or ScalarType.BFloat16;
        bool bf16 = destination.dtype == ScalarType.BFloat16;
        bool finite = true;
        ForEachChunk(destination, scan ? Math.Min(chunkBytes, FiniteCheckChunkBytes) : chunkBytes, (span, byteOffset) =>
        {
            long offset = fileOffset + byteOffset;
            var whole = span;
            while (!span.IsEmpty)
            {
                int read = RandomAccess.Read(file, span, offset);
                if (read == 0)
                {
                    throw new SafetensorsFormatException(path,
                        $"the file ended at byte {offset} while reading tensor '{name}': it was truncated after it was opened.")
                    {
                        TensorName = name,
                    };
                }

                span = span[read..];
                offset += read;
            }

            if (scan && finite)
            {
                fixed (byte* p = whole)
                {
                    finite = Selection.FiniteValues.BlockFinite(p, whole.Length, bf16);
                }
            }
        });
        return scan ? finite : null;
    }

    /// <summary>Writes the bytes of the contiguous CPU tensor <paramref name="source"/> to <paramref name="stream"/>.</summary>
    public static void Write(Stream stream, Tensor source, int chunkBytes) =>
        ForEachChunk(source, chunkBytes, (span, _) => stream.Write(span));

    /// <summary>Writes the bytes of the contiguous CPU tensor <paramref name="source"/> at
    /// <paramref name="fileOffset"/> of <paramref name="file"/>: from the tensor's memory where it is aligned as
    /// the file's blocks, else through the aligned staging buffer.</summary>
    public static unsafe void WriteAt(AlignedFileWriter file, long fileOffset, Tensor source, byte* staging, int stagingBytes, int chunkBytes) =>
        ForEachChunk(source, chunkBytes, (span, byteOffset) => file.Write(span, fileOffset + byteOffset, staging, stagingBytes));

    private delegate void ChunkAction(Span<byte> chunk, long byteOffset);

    /// <summary>Calls <paramref name="action"/> on the bytes of the contiguous CPU tensor <paramref name="tensor"/>, at most <paramref name="chunkBytes"/> at a time.</summary>
    private static void ForEachChunk(Tensor tensor, int chunkBytes, ChunkAction action)
    {
        long elementCount = tensor.numel();
        if (elementCount == 0)
        {
            return;
        }

        long elementSize = tensor.element_size();
        long perChunk = Math.Max(1, chunkBytes / elementSize);
        using var flat = tensor.view(-1);
        for (long start = 0; start < elementCount; start += perChunk)
        {
            long count = Math.Min(perChunk, elementCount - start);
            using var part = flat.narrow(0, start, count);
            action(part.bytes, start * elementSize);
        }
    }
}
