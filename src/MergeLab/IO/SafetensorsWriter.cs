using System.Buffers.Binary;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// Writes tensors to a safetensors file, byte for byte as the reference writer
/// (<c>serialize_to_file</c> in huggingface/safetensors <c>safetensors/src/tensor.rs</c>) would.
/// </summary>
/// <remarks>
/// <para>
/// Order: the reference's <c>prepare</c> sorts tensors by dtype, descending in the order of its
/// <c>Dtype</c> enum, then by name; for the supported types that is
/// I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL (widest alignment first, so every tensor starts at
/// an offset that is a multiple of its element size). Names are compared by Unicode code point, as
/// Rust compares strings. The header lists the tensors in that order and the data follows in it.
/// </para>
/// <para>
/// Header: compact JSON, <c>__metadata__</c> first when metadata is given (keys in code-point order),
/// then <c>"name":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}</c> per tensor, padded with
/// spaces to a multiple of 8 bytes. A header above 100,000,000 bytes is refused, as the reference does.
/// </para>
/// <para>
/// Tensors are copied to the CPU and made contiguous one at a time, and streamed to the file, so the
/// whole file is never in memory. The bytes go to a hidden temporary file in the same directory, which
/// is renamed over <c>path</c> only once complete: a failure leaves no partial file behind.
/// </para>
/// <para>Stateless and thread-safe: several files may be written at once (two writes of one path each
/// complete, and the last rename wins). The tensors being written must not be modified meanwhile.</para>
/// </remarks>
public static class SafetensorsWriter
{
    /// <summary>
    /// Writes <paramref name="tensors"/> (and <paramref name="metadata"/>, when not null, as
    /// <c>__metadata__</c>) to a safetensors file at <paramref name="path"/>, replacing any file there.
    /// The tensors are only read; the caller keeps ownership.
    /// </summary>
    /// <exception cref="ArgumentException">A name is repeated, is <c>__metadata__</c> or is not valid
    /// Unicode; or a tensor's element type has no safetensors name.</exception>
    /// <exception cref="DirectoryNotFoundException">The directory of <paramref name="path"/> does not exist.</exception>
    /// <exception cref="SafetensorsFormatException">The header would exceed the reference's 100,000,000-byte limit.</exception>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null) =>
        Write(path, tensors, metadata, TensorBytes.DefaultChunkBytes);

    /// <summary><see cref="Write(string, IEnumerable{KeyValuePair{string, Tensor}}, IReadOnlyDictionary{string, string}?)"/>
    /// with the size of each write chosen, so tests can exercise the chunking on small tensors.</summary>
    internal static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata, int chunkBytes)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(tensors);
        SafetensorsFile.RequireLittleEndian();

        var ordered = Order(tensors);
        var entries = new List<SafetensorsHeader.Entry>(ordered.Count);
        long offset = 0;
        foreach (var (name, tensor) in ordered)
        {
            long bytes = SafetensorsDType.ByteLength(tensor);
            entries.Add(new SafetensorsHeader.Entry(name, tensor.dtype, tensor.shape, offset, offset + bytes));
            offset += bytes;
        }

        if (metadata is not null)
        {
            foreach (var (key, value) in metadata)
            {
                RequireWellFormed(key, nameof(metadata));
                RequireWellFormed(value ?? throw new ArgumentException($"Metadata key '{key}' has a null value.", nameof(metadata)), nameof(metadata));
            }
        }

        var header = SafetensorsHeader.Serialize(metadata, entries);
        if (header.Length > SafetensorsReadOptions.DefaultMaxHeaderBytes)
        {
            throw new SafetensorsFormatException(path,
                $"the header would be {header.Length} bytes, above the {SafetensorsReadOptions.DefaultMaxHeaderBytes}-byte limit readers enforce.");
        }

        long fileLength = SafetensorsHeader.SizePrefixBytes + header.Length + offset;
        WriteAtomically(path, fileLength, stream =>
        {
            Span<byte> prefix = stackalloc byte[SafetensorsHeader.SizePrefixBytes];
            BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
            stream.Write(prefix);
            stream.Write(header);
            foreach (var (_, tensor) in ordered)
            {
                WriteData(stream, tensor, chunkBytes);
            }
        });
    }

    /// <summary>
    /// Writes a file through a hidden temporary file in the same directory, flushed to disk and then
    /// renamed over <paramref name="path"/>; on failure the temporary file is deleted.
    /// </summary>
    internal static void WriteAtomically(string path, long expectedLength, Action<Stream> write)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        string directory = System.IO.Path.GetDirectoryName(fullPath)
            ?? throw new ArgumentException($"'{path}' names no file.", nameof(path));
        if (!Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"Cannot write '{path}': the directory '{directory}' does not exist.");
        }

        string temp = System.IO.Path.Combine(directory,
            $".{System.IO.Path.GetFileName(fullPath)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var stream = new FileStream(temp, new FileStreamOptions
            {
                Mode = FileMode.CreateNew,
                Access = FileAccess.Write,
                Share = FileShare.None,
                BufferSize = 1 << 20,
                PreallocationSize = expectedLength,
            }))
            {
                write(stream);
                if (stream.Position != expectedLength)
                {
                    throw new InvalidOperationException(
                        $"Wrote {stream.Position} bytes to '{path}' but expected {expectedLength}; a tensor changed size while being written.");
                }

                // Durable before it becomes visible under its real name.
                stream.Flush(flushToDisk: true);
            }

            File.Move(temp, fullPath, overwrite: true);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>The tensors in the reference writer's order, after checking names and types.</summary>
    internal static List<KeyValuePair<string, Tensor>> Order(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        var list = new List<KeyValuePair<string, Tensor>>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, tensor) in tensors)
        {
            ArgumentNullException.ThrowIfNull(name, nameof(tensors));
            if (tensor is null)
            {
                throw new ArgumentException($"Tensor '{name}' is null.", nameof(tensors));
            }

            if (name == SafetensorsHeader.MetadataKey)
            {
                throw new ArgumentException($"'{SafetensorsHeader.MetadataKey}' is reserved for the metadata map and cannot name a tensor.", nameof(tensors));
            }

            RequireWellFormed(name, nameof(tensors));
            if (!names.Add(name))
            {
                throw new ArgumentException($"The tensor name '{name}' occurs twice.", nameof(tensors));
            }

            if (!SafetensorsDType.IsSupported(tensor.dtype))
            {
                throw new ArgumentException(
                    $"Tensor '{name}' has element type {tensor.dtype}, which safetensors cannot store here (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL).",
                    nameof(tensors));
            }

            list.Add(new(name, tensor));
        }

        // List.Sort is unstable, but names are unique, so the order is total.
        list.Sort((a, b) =>
        {
            int byType = SafetensorsDType.Rank(b.Value.dtype).CompareTo(SafetensorsDType.Rank(a.Value.dtype));
            return byType != 0 ? byType : CodePointComparer.Instance.Compare(a.Key, b.Key);
        });
        return list;
    }

    private static void WriteData(Stream stream, Tensor tensor, int chunkBytes)
    {
        // Temporaries (CPU copy, contiguous copy, views) die with the scope; the caller's tensor is
        // not created in it and so is not disposed.
        using var scope = torch.NewDisposeScope();
        var cpu = tensor.device_type == DeviceType.CPU ? tensor : tensor.to(CPU);
        var contiguous = cpu.is_contiguous() ? cpu : cpu.contiguous();
        TensorBytes.Write(stream, contiguous, chunkBytes);
    }

    private static void RequireWellFormed(string text, string paramName)
    {
        if (!JsonText.IsWellFormed(text))
        {
            throw new ArgumentException($"'{text}' contains a lone UTF-16 surrogate and cannot be written as UTF-8.", paramName);
        }
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
            // Best effort: the original error is the one worth reporting.
        }
        catch (UnauthorizedAccessException)
        {
            // As above.
        }
    }
}
