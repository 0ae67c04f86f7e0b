using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.IO.MemoryMappedFiles;
using MergeLab.Selection;
using MergeLab.Tensors;
using Microsoft.Win32.SafeHandles;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// An open safetensors file: its header parsed and validated, its tensors read one at a time on demand.
/// </summary>
/// <remarks>
/// <para>
/// <see cref="Open"/> reads only the 8-byte size prefix and the JSON header; tensor data is read by
/// <see cref="ReadTensor(string, Device?)"/> with positioned reads straight into the new tensor's memory, so a model
/// larger than RAM can be processed tensor by tensor. The file stays open (shared for reading) until
/// <see cref="Dispose"/>.
/// </para>
/// <para>
/// Validation follows the reference reader (<c>SafeTensors::read_metadata</c> and
/// <c>Metadata::validate</c> in huggingface/safetensors <c>safetensors/src/tensor.rs</c>): the header
/// must be at most <see cref="SafetensorsReadOptions.MaxHeaderBytes"/> bytes of UTF-8 JSON; every entry
/// needs a known dtype, a shape and <c>data_offsets</c> whose length is elements × element size; and the
/// tensors, ordered by offset, must tile the data buffer exactly — no overlaps, no holes, nothing after
/// the last tensor. Unknown fields inside an entry are ignored, as the reference ignores them. Beyond
/// the reference, a name that appears twice is refused (the reference keeps the last silently).
/// Every violation is a <see cref="SafetensorsFormatException"/>.
/// </para>
/// <para>Thread-safe once opened: every member, <see cref="ReadTensor(string, Device?)"/> included (it uses
/// positioned reads), may be called from several threads at once, except <see cref="Dispose"/>, which
/// must not race with them. The file must not be modified in place while it is open: a change of size
/// is detected and reported as a <see cref="SafetensorsFormatException"/> naming the tensor being read;
/// a rewrite that keeps the size cannot be detected.</para>
/// </remarks>
public sealed class SafetensorsFile : IDisposable
{
    private readonly SafeFileHandle _handle;
    private readonly Dictionary<string, SafetensorsTensorInfo> _byName;
    private readonly SafetensorsTensorInfo[] _tensors;
    private MemoryMappedFile? _mapping;
    private object? _mappingGate;

    private SafetensorsFile(string path, SafeFileHandle handle, long fileLength, long headerLength,
        IReadOnlyDictionary<string, string>? metadata, SafetensorsTensorInfo[] tensors)
    {
        Path = path;
        _handle = handle;
        FileLength = fileLength;
        HeaderLength = headerLength;
        HasMetadata = metadata is not null;
        Metadata = metadata ?? new Dictionary<string, string>();
        _tensors = tensors;
        _byName = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
        TensorNames = tensors.Select(t => t.Name).ToArray();
    }

    /// <summary>The file's path, as given to <see cref="Open"/>.</summary>
    public string Path { get; }

    /// <summary>The file's size in bytes when it was opened.</summary>
    public long FileLength { get; }

    /// <summary>The size of the JSON header in bytes, padding included (the value of the 8-byte prefix).</summary>
    public long HeaderLength { get; }

    /// <summary>The byte offset at which the data buffer starts: 8 + <see cref="HeaderLength"/>.</summary>
    public long DataStart => SafetensorsHeader.SizePrefixBytes + HeaderLength;

    /// <summary>The header's <c>__metadata__</c> string map; empty when the header has none.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Whether the header has a <c>__metadata__</c> entry (an empty map counts).</summary>
    public bool HasMetadata { get; }

    /// <summary>
    /// The tensor names in file order: by increasing data offset, which is the order to read them in for
    /// sequential disk access (Python's <c>safe_open(...).offset_keys()</c>). Use an ordinal sort for
    /// the order of <c>keys()</c>.
    /// </summary>
    public IReadOnlyList<string> TensorNames { get; }

    /// <summary>Every tensor's location and type, in the order of <see cref="TensorNames"/>.</summary>
    public IReadOnlyList<SafetensorsTensorInfo> Tensors => _tensors;

    /// <summary>The number of tensors.</summary>
    public int Count => _tensors.Length;

    /// <summary>The sum of the tensors' sizes in bytes: the size of the data buffer.</summary>
    public long DataLength => FileLength - DataStart;

    /// <summary>
    /// Opens the file at <paramref name="path"/>, reads and validates its header; reads no tensor data.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">The file is not a valid safetensors file; the message says why.</exception>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="NotSupportedException">The machine is big-endian.</exception>
    public static SafetensorsFile Open(string path, SafetensorsReadOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        options ??= SafetensorsReadOptions.Default;
        options.Validate();
        RequireLittleEndian();

        var preview = new FileInfo(path);
        if (preview.Exists && preview.Length < SafetensorsHeader.SizePrefixBytes)
        {
            // Checked before opening as well as after: a FIFO or a device reports a size of 0, and opening
            // one could block forever or read without end.
            throw new SafetensorsFormatException(path,
                $"the file is {preview.Length} bytes, shorter than the 8-byte header size that starts every safetensors file.");
        }

        // FileShare.Delete lets a writer rename a new file over this path while it is open, which is
        // how SafetensorsWriter replaces files.
        var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete);
        try
        {
            long fileLength = RandomAccess.GetLength(handle);
            const int prefix = SafetensorsHeader.SizePrefixBytes;
            if (fileLength < prefix)
            {
                throw new SafetensorsFormatException(path,
                    $"the file is {fileLength} bytes, shorter than the 8-byte header size that starts every safetensors file.");
            }

            Span<byte> sizeBytes = stackalloc byte[prefix];
            ReadExactly(handle, sizeBytes, 0, path);
            ulong headerSize = BinaryPrimitives.ReadUInt64LittleEndian(sizeBytes);
            if (headerSize == 0)
            {
                throw new SafetensorsFormatException(path, "header size is 0; a header is at least the 2 bytes \"{}\".");
            }

            if (headerSize > (ulong)(fileLength - prefix))
            {
                throw new SafetensorsFormatException(path,
                    $"header size {headerSize} is beyond the file size {fileLength}: not a safetensors file, or one cut short.");
            }

            if (headerSize > (ulong)options.MaxHeaderBytes)
            {
                throw new SafetensorsFormatException(path,
                    $"header size {headerSize} is above the limit of {options.MaxHeaderBytes} bytes ({nameof(SafetensorsReadOptions)}.{nameof(SafetensorsReadOptions.MaxHeaderBytes)}).");
            }

            var json = new byte[(int)headerSize];
            ReadExactly(handle, json, prefix, path);
            long dataStart = prefix + (long)headerSize;
            var header = SafetensorsHeader.Parse(json, fileLength - dataStart, path);
            var tensors = header.Entries
                .Select(e => new SafetensorsTensorInfo(e.Name, e.DType, e.Shape, dataStart + e.Begin, e.ByteLength))
                .ToArray();
            return new SafetensorsFile(path, handle, fileLength, (long)headerSize, header.Metadata, tensors);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Whether the file has a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <summary>The location and type of the tensor named <paramref name="name"/>, or false when there is none.</summary>
    public bool TryGetInfo(string name, [MaybeNullWhen(false)] out SafetensorsTensorInfo info) =>
        _byName.TryGetValue(name, out info);

    /// <summary>The location and type of the tensor named <paramref name="name"/>.</summary>
    /// <exception cref="KeyNotFoundException">The file has no such tensor; the message names it and the file.</exception>
    public SafetensorsTensorInfo GetInfo(string name) =>
        _byName.TryGetValue(name, out var info)
            ? info
            : throw new KeyNotFoundException($"{Path}: there is no tensor named '{name}'.");

    /// <summary>
    /// Reads the tensor named <paramref name="name"/> into a new tensor on <paramref name="device"/>
    /// (CPU when null). Only that tensor's bytes are read. The caller owns the result.
    /// </summary>
    /// <exception cref="KeyNotFoundException">The file has no such tensor.</exception>
    /// <exception cref="SafetensorsFormatException">The file was truncated (or otherwise changed size)
    /// after it was opened; <see cref="SafetensorsFormatException.TensorName"/> is <paramref name="name"/>.</exception>
    public Tensor ReadTensor(string name, Device? device = null) =>
        ReadTensor(name, device, TensorBytes.DefaultChunkBytes);

    /// <summary>Reads every tensor, in file order, into a new state dict on <paramref name="device"/> (CPU when null).</summary>
    public StateDict ReadAll(Device? device = null)
    {
        var result = new StateDict();
        try
        {
            foreach (var name in TensorNames)
            {
                result.Add(name, ReadTensor(name, device));
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }

    /// <summary>Closes the file. Tensors read from it stay valid.</summary>
    public void Dispose()
    {
        _mapping?.Dispose();
        _handle.Dispose();
    }

    /// <summary><see cref="ReadTensor(string, Device?)"/> with the size of each positioned read chosen,
    /// so tests can exercise the chunking without multi-gigabyte tensors.</summary>
    internal Tensor ReadTensor(string name, Device? device, int chunkBytes) => ReadTensor(name, device, chunkBytes, checkFinite: false, out _);

    /// <summary><see cref="ReadTensor(string, Device?, int)"/>, with float32 and bfloat16 values checked for
    /// NaN and ±∞ as they are read (<paramref name="finite"/>: whether all are finite; null when not
    /// checked). With <paramref name="map"/>, a CPU tensor whose offset is aligned to its element size is
    /// mapped from the file instead of copied (<see cref="MappedTensors"/>): no copy, but a truncation of the
    /// file while the tensor lives stops the process instead of raising an exception.</summary>
    internal Tensor ReadTensor(string name, Device? device, int chunkBytes, bool checkFinite, out bool? finite, bool map = false)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        var info = GetInfo(name);

        // A file that changed size since it was opened was truncated, or rewritten in place, by someone
        // else: its bytes can no longer be trusted to be the tensors the header describes. (A truncation
        // during the read itself ends the read early and is reported by TensorBytes.Read.)
        long length = RandomAccess.GetLength(_handle);
        if (length != FileLength)
        {
            throw new SafetensorsFormatException(Path,
                $"the file is {length} bytes but was {FileLength} when it was opened; it was truncated or rewritten before tensor '{name}' could be read.")
            {
                TensorName = name,
            };
        }

        if (map && (device is null || device.type == DeviceType.CPU)
            && MappedTensors.CanMap(info.DataOffset, info.ByteLength, SafetensorsDType.ElementSize(info.DType)))
        {
            return Map(info, checkFinite, out finite);
        }

        // The header check guarantees info.ByteLength fits in the file, so this allocation is never
        // larger than the file. Pooled memory: a fresh allocation page-faults on every 4 KiB page as it
        // is filled. The pool hands a buffer out again only after libtorch has freed the last tensor
        // viewing it, so nothing still referenced is ever reused.
        var tensor = NativeBufferPool.Empty(info.Shape, info.DType);
        try
        {
            finite = TensorBytes.Read(_handle, info.DataOffset, tensor, Path, name, chunkBytes, checkFinite);
            if (device is null || device.type == DeviceType.CPU)
            {
                return tensor;
            }

            var moved = tensor.to(device);
            tensor.Dispose();
            return moved;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    /// <summary>The tensor of <paramref name="info"/> over a private mapping of the file, checked for NaN and
    /// ±∞ with <paramref name="checkFinite"/> (which touches, and so faults in, every page).</summary>
    private Tensor Map(SafetensorsTensorInfo info, bool checkFinite, out bool? finite)
    {
        // One mapping object per file, made on first use; each tensor maps only its own pages from it.
        var file = LazyInitializer.EnsureInitialized(ref _mapping, ref _mappingGate, () =>
            MemoryMappedFile.CreateFromFile(_handle, null, 0, MemoryMappedFileAccess.CopyOnWrite, HandleInheritability.None, leaveOpen: true));
        var tensor = MappedTensors.Map(file, info.DataOffset, info.ByteLength, info.Shape, info.DType);
        try
        {
            if (checkFinite)
            {
                finite = FiniteValues.AllFinite(tensor);
            }
            else
            {
                // The check touches every page; without it, one touch per page still faults them in here,
                // on the reader, rather than one by one inside the merge (from the disk, a wait each).
                finite = null;
                MappedTensors.Prefault(tensor);
            }

            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    internal static void RequireLittleEndian()
    {
        if (!BitConverter.IsLittleEndian)
        {
            // The format stores elements little-endian and tensors are read by copying bytes.
            throw new NotSupportedException("Safetensors files can only be read and written on a little-endian machine.");
        }
    }

    private static void ReadExactly(SafeFileHandle handle, Span<byte> buffer, long offset, string path)
    {
        while (!buffer.IsEmpty)
        {
            int read = RandomAccess.Read(handle, buffer, offset);
            if (read == 0)
            {
                throw new SafetensorsFormatException(path, $"the file ended at byte {offset} while its header was being read.");
            }

            buffer = buffer[read..];
            offset += read;
        }
    }
}
