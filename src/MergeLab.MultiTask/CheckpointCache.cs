using MergeLab.IO;
using MergeLab.Tensors;

namespace MergeLab.MultiTask;

/// <summary>
/// Safetensors checkpoints of a benchmark's trained models under
/// <c>&lt;cache&gt;/&lt;configuration&gt;-&lt;fingerprint&gt;/</c>, so a second run with the same
/// training settings reuses them. Each file records the fingerprint in its metadata and is written
/// atomically (<see cref="SafetensorsWriter"/>).
/// </summary>
internal sealed class CheckpointCache
{
    private const string FingerprintKey = "mergelab_multitask_fingerprint";
    private readonly string? _directory;
    private readonly string _fingerprint;

    public CheckpointCache(string? root, BenchmarkOptions options)
    {
        _fingerprint = options.TrainingFingerprint();
        if (root is not null)
        {
            _directory = Path.Combine(root, $"{options.Name}-{_fingerprint}");
        }
    }

    /// <summary>The folder of this configuration's checkpoints, or null without a cache.</summary>
    public string? Directory => _directory;

    /// <summary>Reads checkpoint <paramref name="name"/> if it exists with this fingerprint.</summary>
    public StateDict? TryLoad(string name)
    {
        if (_directory is null)
        {
            return null;
        }

        var path = PathOf(name);
        if (!File.Exists(path))
        {
            return null;
        }

        using var checkpoint = SafetensorsCheckpoint.Open(path);
        var header = checkpoint.Shards[0].Metadata;
        if (header is null || !header.TryGetValue(FingerprintKey, out var stored) || stored != _fingerprint)
        {
            return null;
        }

        return checkpoint.ReadAll();
    }

    /// <summary>Writes checkpoint <paramref name="name"/> (no-op without a cache).</summary>
    public void Save(string name, StateDict tensors)
    {
        if (_directory is null)
        {
            return;
        }

        System.IO.Directory.CreateDirectory(_directory);
        SafetensorsWriter.Write(PathOf(name), tensors, new Dictionary<string, string> { [FingerprintKey] = _fingerprint });
    }

    private string PathOf(string name) => Path.Combine(_directory!, name + ".safetensors");
}
