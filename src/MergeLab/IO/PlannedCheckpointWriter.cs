using System.Buffers.Binary;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>The name, element type and shape of a tensor a <see cref="PlannedCheckpointWriter"/> will write.</summary>
/// <param name="Name">The tensor name.</param>
/// <param name="DType">Its element type.</param>
/// <param name="Shape">Its shape.</param>
/// <remarks>Immutable, and so thread-safe, as long as the <paramref name="Shape"/> array is not modified.</remarks>
public sealed record PlannedTensor(string Name, ScalarType DType, long[] Shape)
{
    /// <summary>Bytes of tensor data.</summary>
    public long ByteLength => checked(Shape.Aggregate(1L, (a, d) => checked(a * d)) * SafetensorsDType.ElementSize(DType));
}

/// <summary>
/// Writes a checkpoint whose every tensor (name, dtype, shape) is known before the first is written —
/// as in a merge, where the output layout follows the inputs' headers. The shards, their headers and
/// each tensor's offset are fixed up front, so <see cref="Write"/> puts a tensor's bytes straight into
/// its place with positioned writes (direct I/O where the file system allows it): from the tensor's own
/// memory where that lies at its file offset's remainder modulo 4 KiB, else through an 8 MiB staging
/// buffer. Besides that buffer the writer holds only the few 4 KiB blocks shared with tensors not yet
/// written: memory stays at one tensor whatever the model size, unlike <see cref="ShardedCheckpointWriter"/>,
/// which must buffer a shard.
/// </summary>
/// <remarks>
/// The files are byte-identical to <see cref="ShardedCheckpointWriter"/>'s for the same tensors in the
/// same order: the same shard split (huggingface_hub's), the reference writer's order and header inside
/// each shard, the same names and index. Shards are written under hidden temporary names and renamed by
/// <see cref="Complete"/>; disposing without completing deletes them. Tensors may be written in any
/// order, each once. Not thread-safe: one thread writes at a time (writers of different directories,
/// or of different checkpoints in one directory, are independent).
/// </remarks>
public sealed unsafe class PlannedCheckpointWriter : IDisposable
{
    /// <summary>The staging buffer that whole blocks are written from: 8 MiB, one per writer.</summary>
    private const int StagingBytes = 8 << 20;

    private readonly List<Shard> _shards = [];
    private readonly Dictionary<string, (Shard Shard, SafetensorsHeader.Entry Entry)> _places = new(StringComparer.Ordinal);
    private readonly HashSet<string> _written = new(StringComparer.Ordinal);
    private bool _completed, _disposed;
    private long _bytesWritten;
    private byte* _staging;

    /// <summary>Plans the shards of <paramref name="tensors"/> in <paramref name="directory"/> and creates
    /// their temporary files, full size (space reserved where the file system supports it), with headers written.</summary>
    /// <param name="directory">An existing directory.</param>
    /// <param name="tensors">Every tensor to be written, in checkpoint order (which decides the shard split).</param>
    /// <param name="maxShardBytes">The most tensor bytes per shard; a larger tensor gets a shard of its own.</param>
    /// <param name="shardMetadata">Each shard's <c>__metadata__</c>; null means <c>{"format": "pt"}</c>.</param>
    /// <exception cref="ArgumentException">A name repeats or a dtype has no safetensors name.</exception>
    /// <exception cref="IOException">The disk has no room for the shards (where space can be reserved).</exception>
    public PlannedCheckpointWriter(string directory, IReadOnlyList<PlannedTensor> tensors,
        long maxShardBytes = ShardedCheckpointWriter.DefaultMaxShardBytes, IReadOnlyDictionary<string, string>? shardMetadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxShardBytes, 1);
        if (!System.IO.Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"The output directory '{directory}' does not exist.");
        }

        SafetensorsFile.RequireLittleEndian();
        Directory = directory;
        var metadata = shardMetadata ?? new Dictionary<string, string> { ["format"] = "pt" };
        string prefix = $".mergelab-{Guid.NewGuid():N}";
        try
        {
            foreach (var group in Split(tensors, maxShardBytes))
            {
                var shard = new Shard(ShardLayout.TempShardPath(directory, prefix, _shards.Count));
                _shards.Add(shard);
                shard.Open(group, metadata, _places, Staging());
                TotalSize += group.Sum(t => t.ByteLength);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>The directory the checkpoint is written into.</summary>
    public string Directory { get; }

    /// <summary>The bytes of all planned tensors: the index's <c>metadata.total_size</c>.</summary>
    public long TotalSize { get; }

    /// <summary>Test seam: <see cref="Write"/> fails as on a full disk (an <see cref="IOException"/>,
    /// nothing of the tensor written) once the tensor bytes written would pass this. Null in real use.</summary>
    internal long? SimulatedDiskSpace { get; init; }

    /// <summary>Writes <paramref name="tensor"/>'s bytes into its planned place. The caller keeps ownership.</summary>
    /// <exception cref="ArgumentException">The name was not planned or was already written, or the dtype
    /// or shape differs from the plan.</exception>
    public void Write(string name, Tensor tensor)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(tensor);
        if (!_places.TryGetValue(name, out var place))
        {
            throw new ArgumentException($"Tensor '{name}' is not in the planned checkpoint.", nameof(name));
        }

        if (tensor.dtype != place.Entry.DType || !tensor.shape.SequenceEqual(place.Entry.Shape))
        {
            throw new ArgumentException(
                $"Tensor '{name}' is {tensor.dtype} [{string.Join(", ", tensor.shape)}] but the plan says {place.Entry.DType} [{string.Join(", ", place.Entry.Shape)}].",
                nameof(tensor));
        }

        if (_written.Contains(name))
        {
            throw new ArgumentException($"Tensor '{name}' was already written.", nameof(name));
        }

        if (SimulatedDiskSpace is long space && _bytesWritten + place.Entry.ByteLength > space)
        {
            throw new IOException($"No space left on device : '{place.Shard.TempPath}' (simulated: {space} bytes)");
        }

        _written.Add(name);

        using var scope = torch.NewDisposeScope();
        var cpu = tensor.device_type == DeviceType.CPU ? tensor : tensor.to(CPU);
        var contiguous = cpu.is_contiguous() ? cpu : cpu.contiguous();
        TensorBytes.WriteAt(place.Shard.File!, Offset(place), contiguous, Staging(), StagingBytes,
            TensorBytes.DefaultChunkBytes);
        _bytesWritten += place.Entry.ByteLength;
    }

    /// <summary>Where the bytes of the planned tensor <paramref name="name"/> go in its shard (0 for a name not
    /// planned). A CPU tensor whose memory has this offset's remainder modulo 4 KiB is written from that memory
    /// (<see cref="Selection.CpuTensors.PlaceResults"/>) instead of through the staging buffer.</summary>
    internal long FileOffset(string name) => _places.TryGetValue(name, out var place) ? Offset(place) : 0;

    private static long Offset((Shard Shard, SafetensorsHeader.Entry Entry) place) => place.Shard.DataStart + place.Entry.Begin;

    /// <summary>Checks every planned tensor was written, flushes the shards to disk and gives them their
    /// final names (<c>model.safetensors</c>, or <c>model-0000k-of-0000N.safetensors</c> plus the index).</summary>
    /// <returns>The file names written, shards first and the index last.</returns>
    /// <exception cref="InvalidOperationException">A planned tensor was never written; the message names it.</exception>
    public IReadOnlyList<string> Complete()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_completed)
        {
            throw new InvalidOperationException("The checkpoint is already complete.");
        }

        var missing = _places.Keys.FirstOrDefault(n => !_written.Contains(n));
        if (missing is not null)
        {
            throw new InvalidOperationException($"Tensor '{missing}' was planned but never written.");
        }

        foreach (var shard in _shards)
        {
            if (shard.File!.HasPendingBytes)
            {
                throw new InvalidOperationException($"Bytes of '{shard.TempPath}' were never written.");
            }

            RandomAccess.FlushToDisk(shard.File.Handle);
            shard.File.Dispose();
        }

        FreeStaging();

        var written = ShardLayout.Finish(Directory, _shards.Select(s => (s.TempPath, (IReadOnlyList<string>)s.Names)).ToList(), TotalSize);
        _completed = true;
        return written;
    }

    /// <summary>Closes the files; if <see cref="Complete"/> was not called, deletes them.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        FreeStaging();
        foreach (var shard in _shards)
        {
            shard.File?.Dispose();
            if (!_completed)
            {
                try
                {
                    File.Delete(shard.TempPath);
                }
                catch (IOException)
                {
                    // Best effort while abandoning a checkpoint.
                }
            }
        }
    }

    private byte* Staging()
    {
        if (_staging is null)
        {
            _staging = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(StagingBytes, AlignedFileWriter.BlockSize);
        }

        return _staging;
    }

    private void FreeStaging()
    {
        if (_staging is not null)
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree(_staging);
            _staging = null;
        }
    }

    /// <summary>huggingface_hub's split: tensors fill a shard in order; one that would overflow it starts
    /// the next; one larger than the limit gets a shard of its own at once, the open shard staying open.</summary>
    private static List<List<PlannedTensor>> Split(IReadOnlyList<PlannedTensor> tensors, long maxShardBytes)
    {
        var shards = new List<List<PlannedTensor>>();
        var open = new List<PlannedTensor>();
        long openBytes = 0;
        foreach (var t in tensors)
        {
            long bytes = t.ByteLength;
            if (bytes > maxShardBytes)
            {
                shards.Add([t]);
                continue;
            }

            if (openBytes + bytes > maxShardBytes)
            {
                shards.Add(open);
                open = [];
                openBytes = 0;
            }

            open.Add(t);
            openBytes += bytes;
        }

        if (open.Count > 0 || shards.Count == 0)
        {
            shards.Add(open);
        }

        return shards;
    }

    private sealed class Shard(string tempPath)
    {
        public string TempPath { get; } = tempPath;

        public AlignedFileWriter? File { get; private set; }

        public long DataStart { get; private set; }

        public List<string> Names { get; } = [];

        /// <summary>Lays out the shard as the reference writer would and writes its size prefix and header.</summary>
        public void Open(List<PlannedTensor> tensors, IReadOnlyDictionary<string, string> metadata,
            Dictionary<string, (Shard, SafetensorsHeader.Entry)> places, byte* staging)
        {
            var ordered = tensors.ToList();
            ordered.Sort((a, b) =>
            {
                int byType = SafetensorsDType.Rank(b.DType).CompareTo(SafetensorsDType.Rank(a.DType));
                return byType != 0 ? byType : CodePointComparer.Instance.Compare(a.Name, b.Name);
            });
            var entries = new List<SafetensorsHeader.Entry>();
            long offset = 0;
            foreach (var t in ordered)
            {
                if (places.ContainsKey(t.Name))
                {
                    throw new ArgumentException($"The tensor name '{t.Name}' occurs twice in the plan.", nameof(tensors));
                }

                var entry = new SafetensorsHeader.Entry(t.Name, t.DType, t.Shape, offset, offset + t.ByteLength);
                entries.Add(entry);
                places.Add(t.Name, (this, entry));
                offset = entry.End;
            }

            Names.AddRange(tensors.Select(t => t.Name));
            byte[] header = SafetensorsHeader.Serialize(metadata, entries);
            DataStart = SafetensorsHeader.SizePrefixBytes + header.Length;
            // Reserving the whole shard up front (fallocate, where the file system supports it) makes a
            // disk that is too small fail here, before any tensor is merged, rather than hours later.
            // Where it is not supported the file is sparse and a full disk fails a later Write.
            // Tensor bytes go to the device by direct I/O where the file system allows it (no page-cache
            // copy); AlignedFileWriter keeps every write whole, aligned blocks.
            File = AlignedFileWriter.Create(TempPath, DataStart + offset);
            Span<byte> prefix = stackalloc byte[SafetensorsHeader.SizePrefixBytes];
            BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
            File.Write(prefix, 0, staging, StagingBytes);
            File.Write(header, SafetensorsHeader.SizePrefixBytes, staging, StagingBytes);
        }
    }
}
