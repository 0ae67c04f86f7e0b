using MergeLab.IO;
using MergeLab.Tensors;

namespace MergeLab.MultiTask;

/// <summary>
/// Safetensors checkpoints of a benchmark's trained models under
/// <c>&lt;cache&gt;/&lt;configuration&gt;-&lt;fingerprint&gt;/</c>, so a second run with the same
/// training settings and data reuses them. Each file records the fingerprint in its metadata and is written
/// atomically (<see cref="SafetensorsWriter"/>).
/// </summary>
internal sealed class CheckpointCache
{
    private const string FingerprintKey = "mergelab_multitask_fingerprint";
    private readonly string? _directory;
    private readonly string _fingerprint;
    private readonly IProgress<string>? _log;

    /// <param name="root">The cache's root folder; null: no cache.</param>
    /// <param name="options">The configuration; its <see cref="BenchmarkOptions.TrainingFingerprint"/> is part of the key.</param>
    /// <param name="dataFingerprint">The data's <see cref="FashionMnist.Fingerprint"/>, the other part: other
    /// images or labels (another <c>--data</c> folder) must not reuse models trained on these.</param>
    /// <param name="log">Told when a cached file cannot be read and is trained again.</param>
    /// <exception cref="IOException">The cache's folder cannot be created (a file is in its way, a full disk);
    /// found here, before any model is trained, not when the first one is saved.</exception>
    /// <exception cref="UnauthorizedAccessException">The cache's folder cannot be created for lack of permission.</exception>
    public CheckpointCache(string? root, BenchmarkOptions options, string dataFingerprint, IProgress<string>? log = null)
    {
        _fingerprint = CacheKeys.Of(options.TrainingFingerprint() + "|" + dataFingerprint);
        _log = log;
        if (root is not null)
        {
            _directory = Path.Combine(root, $"{options.Name}-{_fingerprint}");
            try
            {
                System.IO.Directory.CreateDirectory(_directory);
            }
            catch (IOException e)
            {
                throw new IOException($"The cache folder '{_directory}' cannot be created: {e.Message}", e);
            }
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

        try
        {
            using var checkpoint = SafetensorsCheckpoint.Open(path);
            var header = checkpoint.Shards[0].Metadata;
            if (header is null || !header.TryGetValue(FingerprintKey, out var stored) || stored != _fingerprint)
            {
                return null;
            }

            return checkpoint.ReadAll();
        }
        catch (Exception e) when (e is SafetensorsFormatException or IOException or UnauthorizedAccessException)
        {
            // A damaged cache file (cut short, overwritten) is trained again and replaced, not fatal.
            _log?.Report($"cached '{path}' cannot be read ({e.Message}); training it again");
            return null;
        }
    }

    /// <summary>Writes checkpoint <paramref name="name"/> (no-op without a cache).</summary>
    public void Save(string name, StateDict tensors)
    {
        if (_directory is null)
        {
            return;
        }

        System.IO.Directory.CreateDirectory(_directory); // again, in case it was removed while training
        SafetensorsWriter.Write(PathOf(name), tensors, new Dictionary<string, string> { [FingerprintKey] = _fingerprint });
    }

    private string PathOf(string name) => Path.Combine(_directory!, name + ".safetensors");
}
