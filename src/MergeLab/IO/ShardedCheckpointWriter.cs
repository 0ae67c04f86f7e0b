using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// Writes a model's tensors, streamed one at a time, as a Hugging Face safetensors checkpoint: shards
/// <c>model-00001-of-00003.safetensors</c>, … plus <c>model.safetensors.index.json</c>, or a single
/// <c>model.safetensors</c> with no index when everything fits in one shard.
/// </summary>
/// <remarks>
/// <para>
/// Sharding follows huggingface_hub's <c>split_torch_state_dict_into_shards</c>, which transformers'
/// <c>save_pretrained</c> uses: tensors fill the current shard in the order added; one that would take
/// the shard past <see cref="MaxShardBytes"/> starts a new shard, and one larger than
/// <see cref="MaxShardBytes"/> by itself goes alone into a shard of its own, numbered where it occurs
/// while the current shard stays open. Sizes count tensor bytes only, not headers.
/// </para>
/// <para>
/// Memory: the tensors of the current shard are held (on the CPU) until the shard is full, because a
/// shard's header, which precedes its data, must list all of them in the reference writer's order.
/// So at most about <see cref="MaxShardBytes"/> of tensor data is held. Full shards are written at
/// once under hidden temporary names, and renamed to their final names by <see cref="Complete"/>, when
/// the shard count is known. Disposing without <see cref="Complete"/> deletes them.
/// </para>
/// <para>
/// Each shard carries the <c>__metadata__</c> given to the constructor, by default
/// <c>{"format": "pt"}</c> as transformers writes: transformers refuses to load a shard whose metadata
/// exists but lacks a "format" of pt, tf, flax or mlx.
/// </para>
/// <para>Not thread-safe: one thread adds tensors at a time.</para>
/// </remarks>
public sealed class ShardedCheckpointWriter : IDisposable
{
    /// <summary>transformers' default <c>max_shard_size="5GB"</c>: 5,000,000,000 bytes.</summary>
    public const long DefaultMaxShardBytes = 5_000_000_000;

    private readonly IReadOnlyDictionary<string, string> _shardMetadata;
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);
    private readonly List<KeyValuePair<string, Tensor>> _pending = [];
    private readonly List<(string TempPath, List<string> Names)> _shards = [];
    private readonly string _tempPrefix = $".mergelab-{Guid.NewGuid():N}";
    private long _pendingBytes;
    private bool _completed;
    private bool _disposed;

    /// <summary>Creates a writer that writes into the existing directory <paramref name="directory"/>.</summary>
    /// <param name="directory">Where the shards and index go; it must exist.</param>
    /// <param name="maxShardBytes">The most tensor bytes per shard (a single larger tensor gets a shard
    /// of its own). Default <see cref="DefaultMaxShardBytes"/>; at least 1.</param>
    /// <param name="shardMetadata">The <c>__metadata__</c> of every shard; null means <c>{"format": "pt"}</c>.</param>
    /// <exception cref="DirectoryNotFoundException">The directory does not exist.</exception>
    public ShardedCheckpointWriter(string directory, long maxShardBytes = DefaultMaxShardBytes,
        IReadOnlyDictionary<string, string>? shardMetadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxShardBytes, 1);
        if (!System.IO.Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"Cannot write a checkpoint into '{directory}': the directory does not exist.");
        }

        Directory = directory;
        MaxShardBytes = maxShardBytes;
        _shardMetadata = shardMetadata ?? new Dictionary<string, string> { ["format"] = "pt" };
    }

    /// <summary>The directory the checkpoint is written into.</summary>
    public string Directory { get; }

    /// <summary>The most tensor bytes per shard.</summary>
    public long MaxShardBytes { get; }

    /// <summary>The number of tensors added so far.</summary>
    public int Count => _names.Count;

    /// <summary>The bytes of all tensors added so far: the index's <c>metadata.total_size</c>.</summary>
    public long TotalSize { get; private set; }

    /// <summary>
    /// Adds a tensor and takes ownership of it: it is disposed once written (a non-CPU or non-contiguous
    /// tensor is replaced by a contiguous CPU copy at once, freeing device memory). Writes the current
    /// shard first when this tensor would take it past <see cref="MaxShardBytes"/>. If this method
    /// throws an <see cref="ArgumentException"/>, the tensor stays the caller's.
    /// </summary>
    /// <exception cref="ArgumentException">The name was already added, is <c>__metadata__</c>, or the element
    /// type has no safetensors name.</exception>
    public void Add(string name, Tensor tensor)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_completed)
        {
            throw new InvalidOperationException("The checkpoint is complete; no more tensors can be added.");
        }

        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(tensor);
        if (_names.Contains(name))
        {
            throw new ArgumentException($"The tensor name '{name}' was already added.", nameof(name));
        }

        // Checks the name and the element type before taking ownership.
        SafetensorsWriter.Order([new(name, tensor)]);
        long bytes = SafetensorsDType.ByteLength(tensor);
        var owned = ToContiguousCpu(tensor.DetachFromDisposeScope());
        _names.Add(name);
        TotalSize += bytes;

        if (bytes > MaxShardBytes)
        {
            WriteShard([new(name, owned)]);
            return;
        }

        if (_pendingBytes + bytes > MaxShardBytes)
        {
            FlushPending();
        }

        _pending.Add(new(name, owned));
        _pendingBytes += bytes;
    }

    /// <summary>
    /// Writes the last shard, renames the shards to <c>model-0000k-of-0000N.safetensors</c> and writes
    /// <c>model.safetensors.index.json</c>; or, when there is a single shard, names it
    /// <c>model.safetensors</c> and writes no index. A <c>model.safetensors</c> or index left in the
    /// directory by an earlier save of the other layout is deleted, since loaders would pick it first.
    /// </summary>
    /// <returns>The file names written, shards first and the index last.</returns>
    public IReadOnlyList<string> Complete()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_completed)
        {
            throw new InvalidOperationException("The checkpoint is already complete.");
        }

        if (_pending.Count > 0 || _shards.Count == 0)
        {
            FlushPending();
        }

        var written = ShardLayout.Finish(Directory, _shards.Select(s => (s.TempPath, (IReadOnlyList<string>)s.Names)).ToList(), TotalSize);
        _shards.Clear();
        _completed = true;
        return written;
    }

    /// <summary>Releases held tensors; if <see cref="Complete"/> was not called, deletes the shards written so far.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        foreach (var (_, tensor) in _pending)
        {
            tensor.Dispose();
        }

        _pending.Clear();
        foreach (var (tempPath, _) in _shards)
        {
            TryDelete(tempPath);
        }

        _shards.Clear();
    }

    private static Tensor ToContiguousCpu(Tensor owned)
    {
        if (owned.device_type == DeviceType.CPU && owned.is_contiguous())
        {
            return owned;
        }

        Tensor copy;
        using (torch.NewDisposeScope())
        {
            var cpu = owned.device_type == DeviceType.CPU ? owned : owned.to(CPU);
            copy = (cpu.is_contiguous() ? cpu : cpu.contiguous()).DetachFromDisposeScope();
        }

        owned.Dispose();
        return copy;
    }

    private void FlushPending()
    {
        var shard = _pending.ToList();
        _pending.Clear();
        _pendingBytes = 0;
        WriteShard(shard);
    }

    /// <summary>Writes one shard under a temporary name and disposes its tensors.</summary>
    private void WriteShard(List<KeyValuePair<string, Tensor>> tensors)
    {
        string tempPath = ShardLayout.TempShardPath(Directory, _tempPrefix, _shards.Count);
        try
        {
            SafetensorsWriter.Write(tempPath, tensors, _shardMetadata);
            _shards.Add((tempPath, tensors.Select(t => t.Key).ToList()));
        }
        finally
        {
            foreach (var (_, tensor) in tensors)
            {
                tensor.Dispose();
            }
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
            // Best effort while abandoning a checkpoint.
        }
        catch (UnauthorizedAccessException)
        {
            // As above.
        }
    }
}
