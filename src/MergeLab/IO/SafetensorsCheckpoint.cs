using System.Diagnostics.CodeAnalysis;
using System.Text.Json;
using System.Text.Unicode;
using MergeLab.Tensors;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// A model's weights stored as safetensors, in one file or sharded across several with a
/// <c>model.safetensors.index.json</c> (the Hugging Face layout): one name space over all shards,
/// with tensors read one at a time on demand.
/// </summary>
/// <remarks>
/// <para>
/// <see cref="Open"/> accepts a directory, a <c>.safetensors</c> file or an <c>*.index.json</c> file.
/// In a directory it looks, as transformers does, first for <c>model.safetensors</c> and then for
/// <c>model.safetensors.index.json</c>. The index's <c>weight_map</c> is authoritative: tensors a
/// shard holds but the index does not list are not exposed. Every shard's header is read and validated
/// when the checkpoint is opened, so a missing shard or a tensor missing from its shard is reported
/// before any work starts; no tensor data is read until asked for.
/// </para>
/// <para>Thread-safe once opened: every member, <see cref="ReadTensor(string, Device?)"/> included, may be called from
/// several threads at once, except <see cref="Dispose"/>, which must not race with them.</para>
/// </remarks>
public sealed class SafetensorsCheckpoint : IDisposable
{
    /// <summary>The file name of an unsharded checkpoint.</summary>
    public const string SingleFileName = "model.safetensors";

    /// <summary>The file name of a sharded checkpoint's index.</summary>
    public const string IndexFileName = "model.safetensors.index.json";

    private readonly SafetensorsFile[] _shards;
    private readonly Dictionary<string, SafetensorsFile> _shardOf;
    private readonly string[] _names;

    private SafetensorsCheckpoint(string path, string? indexPath, SafetensorsFile[] shards, Dictionary<string, SafetensorsFile> shardOf)
    {
        Path = path;
        IndexPath = indexPath;
        _shards = shards;
        _shardOf = shardOf;
        _names = shards.SelectMany(s => s.TensorNames.Where(n => shardOf.TryGetValue(n, out var owner) && owner == s)).ToArray();
        TotalSize = _names.Sum(n => shardOf[n].GetInfo(n).ByteLength);
    }

    /// <summary>The path given to <see cref="Open"/>.</summary>
    public string Path { get; }

    /// <summary>The index file, or null for a single-file checkpoint.</summary>
    public string? IndexPath { get; }

    /// <summary>The open shard files, in file-name order (a single file for an unsharded checkpoint).</summary>
    public IReadOnlyList<SafetensorsFile> Shards => _shards;

    /// <summary>
    /// Every tensor name, in disk order: shard by shard in file-name order, and by data offset within a
    /// shard, which is the order for sequential reading.
    /// </summary>
    public IReadOnlyList<string> TensorNames => _names;

    /// <summary>The number of tensors.</summary>
    public int Count => _names.Length;

    /// <summary>The sum of all tensors' sizes in bytes (what an index's <c>metadata.total_size</c> records),
    /// computed from the shard headers.</summary>
    public long TotalSize { get; }

    /// <summary>
    /// Opens the checkpoint at <paramref name="path"/> (a directory, a <c>.safetensors</c> file, or an
    /// index file) and validates every shard's header.
    /// </summary>
    /// <exception cref="FileNotFoundException">Nothing at <paramref name="path"/>, or a directory with neither
    /// <c>model.safetensors</c> nor <c>model.safetensors.index.json</c>.</exception>
    /// <exception cref="SafetensorsFormatException">The index or a shard is malformed, the index names a
    /// shard that does not exist, or a shard lacks a tensor the index assigns to it.</exception>
    public static SafetensorsCheckpoint Open(string path, SafetensorsReadOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (File.Exists(path))
        {
            return path.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase)
                ? OpenIndex(path, path, options)
                : OpenSingle(path, path, options);
        }

        if (!Directory.Exists(path))
        {
            throw new FileNotFoundException($"There is no checkpoint file or directory at '{path}'.", path);
        }

        string single = System.IO.Path.Combine(path, SingleFileName);
        if (File.Exists(single))
        {
            return OpenSingle(path, single, options);
        }

        string index = System.IO.Path.Combine(path, IndexFileName);
        if (File.Exists(index))
        {
            return OpenIndex(path, index, options);
        }

        throw new FileNotFoundException(MissingWeights(path), single);
    }

    /// <summary>Why the directory <paramref name="path"/> holds no safetensors checkpoint, or null when it
    /// holds one (or is not a directory).</summary>
    internal static string? MissingWeights(string path)
    {
        if (!Directory.Exists(path)
            || File.Exists(System.IO.Path.Combine(path, SingleFileName)) || File.Exists(System.IO.Path.Combine(path, IndexFileName)))
        {
            return null;
        }

        bool pytorch = Directory.EnumerateFiles(path).Any(f => f.EndsWith(".bin", StringComparison.OrdinalIgnoreCase)
                                                             || f.EndsWith(".pt", StringComparison.OrdinalIgnoreCase)
                                                             || f.EndsWith(".pth", StringComparison.OrdinalIgnoreCase));
        return $"The directory '{path}' has neither {SingleFileName} nor {IndexFileName}"
            + (pytorch ? "; it has PyTorch weights (.bin/.pt), which MergeLab does not read: convert them to safetensors first." : ".");
    }

    /// <summary>Whether the checkpoint has a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _shardOf.ContainsKey(name);

    /// <summary>The location and type of the tensor named <paramref name="name"/> within its shard, or
    /// false when there is none.</summary>
    public bool TryGetInfo(string name, [MaybeNullWhen(false)] out SafetensorsTensorInfo info)
    {
        if (_shardOf.TryGetValue(name, out var shard))
        {
            info = shard.GetInfo(name);
            return true;
        }

        info = null;
        return false;
    }

    /// <summary>The location and type of the tensor named <paramref name="name"/> within its shard
    /// (<see cref="SafetensorsTensorInfo.DataOffset"/> is an offset in <see cref="GetShard"/>'s file).</summary>
    /// <exception cref="KeyNotFoundException">There is no such tensor; the message names it.</exception>
    public SafetensorsTensorInfo GetInfo(string name) => GetShard(name).GetInfo(name);

    /// <summary>The shard file that holds the tensor named <paramref name="name"/>.</summary>
    /// <exception cref="KeyNotFoundException">There is no such tensor; the message names it.</exception>
    public SafetensorsFile GetShard(string name) =>
        _shardOf.TryGetValue(name, out var shard)
            ? shard
            : throw new KeyNotFoundException($"{Path}: the checkpoint has no tensor named '{name}'.");

    /// <summary>Reads the tensor named <paramref name="name"/> into a new tensor on <paramref name="device"/>
    /// (CPU when null); only its bytes are read. The caller owns the result.</summary>
    /// <exception cref="KeyNotFoundException">There is no such tensor.</exception>
    public Tensor ReadTensor(string name, Device? device = null) => GetShard(name).ReadTensor(name, device);

    /// <summary><see cref="ReadTensor(string, Device?)"/> with float32 and bfloat16 values checked for NaN
    /// and ±∞ as they are read (<paramref name="finite"/>: whether all are finite; null when not checked),
    /// and mapped from its file rather than copied with <paramref name="map"/> (see
    /// <see cref="SafetensorsFile.ReadTensor(string, Device?, int, bool, out bool?, bool)"/>).</summary>
    internal Tensor ReadTensor(string name, Device? device, bool checkFinite, out bool? finite, bool map = false) =>
        GetShard(name).ReadTensor(name, device, TensorBytes.DefaultChunkBytes, checkFinite, out finite, map);

    /// <summary>Reads every tensor, in <see cref="TensorNames"/> order, into a new state dict.</summary>
    public StateDict ReadAll(Device? device = null)
    {
        var result = new StateDict();
        try
        {
            foreach (var name in _names)
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

    /// <summary>Closes every shard file.</summary>
    public void Dispose()
    {
        foreach (var shard in _shards)
        {
            shard.Dispose();
        }
    }

    private static SafetensorsCheckpoint OpenSingle(string path, string file, SafetensorsReadOptions? options)
    {
        var shard = SafetensorsFile.Open(file, options);
        return new SafetensorsCheckpoint(path, null, [shard], shard.TensorNames.ToDictionary(n => n, _ => shard, StringComparer.Ordinal));
    }

    private static SafetensorsCheckpoint OpenIndex(string path, string indexPath, SafetensorsReadOptions? options)
    {
        var weightMap = ReadWeightMap(indexPath, options ?? SafetensorsReadOptions.Default);
        string directory = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(indexPath))!;
        var shardNames = weightMap.Values.Distinct(StringComparer.Ordinal).Order(CodePointComparer.Instance).ToArray();
        var opened = new List<SafetensorsFile>();
        try
        {
            var byFileName = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            foreach (var shardName in shardNames)
            {
                string shardPath = System.IO.Path.Combine(directory, shardName);
                if (!File.Exists(shardPath))
                {
                    var example = weightMap.First(kv => kv.Value == shardName).Key;
                    throw new SafetensorsFormatException(indexPath,
                        $"the index assigns tensors (e.g. '{example}') to shard '{shardName}', which does not exist in '{directory}'.");
                }

                var shard = SafetensorsFile.Open(shardPath, options);
                opened.Add(shard);
                byFileName.Add(shardName, shard);
            }

            var shardOf = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            foreach (var (name, shardName) in weightMap)
            {
                var shard = byFileName[shardName];
                if (!shard.Contains(name))
                {
                    throw new SafetensorsFormatException(indexPath,
                        $"the index assigns tensor '{name}' to shard '{shardName}', but that shard has no such tensor.");
                }

                shardOf.Add(name, shard);
            }

            return new SafetensorsCheckpoint(path, indexPath, opened.ToArray(), shardOf);
        }
        catch
        {
            foreach (var shard in opened)
            {
                shard.Dispose();
            }

            throw;
        }
    }

    /// <summary>Reads <c>{"metadata": {...}, "weight_map": {tensor: shard file}}</c>; the metadata is not needed.</summary>
    private static Dictionary<string, string> ReadWeightMap(string indexPath, SafetensorsReadOptions options)
    {
        long length = new FileInfo(indexPath).Length;
        if (length > options.MaxHeaderBytes)
        {
            // An index lists names only; one this large is corrupt, so do not load it.
            throw new SafetensorsFormatException(indexPath,
                $"the index is {length} bytes, above the limit of {options.MaxHeaderBytes} bytes ({nameof(SafetensorsReadOptions)}.{nameof(SafetensorsReadOptions.MaxHeaderBytes)}).");
        }

        if (length == 0)
        {
            // Also what a FIFO or device reports: refused before opening it, which could block forever.
            throw new SafetensorsFormatException(indexPath, "the index is empty (0 bytes); it must be a JSON object with a weight_map.");
        }

        byte[] bytes = File.ReadAllBytes(indexPath);

        if (!Utf8.IsValid(bytes))
        {
            // JsonDocument checks the UTF-8 of a string only when it is read, with an InvalidOperationException.
            throw new SafetensorsFormatException(indexPath, "the index is not valid UTF-8.");
        }

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(bytes, new JsonDocumentOptions { MaxDepth = 128 });
        }
        catch (JsonException ex)
        {
            throw new SafetensorsFormatException(indexPath, $"the index is not valid JSON: {ex.Message}", ex);
        }

        try
        {
            return ParseWeightMap(document, indexPath);
        }
        catch (InvalidOperationException ex)
        {
            // GetString and the property names refuse an escaped lone surrogate ("\ud800"), as serde_json does.
            throw new SafetensorsFormatException(indexPath, $"the index is not valid JSON: {ex.Message}", ex);
        }
        finally
        {
            document.Dispose();
        }
    }

    private static Dictionary<string, string> ParseWeightMap(JsonDocument document, string indexPath)
    {
        var root = document.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new SafetensorsFormatException(indexPath, $"the index is a JSON {root.ValueKind}, but must be an object with a weight_map.");
        }

        if (!root.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
        {
            throw new SafetensorsFormatException(indexPath, "the index has no weight_map object mapping tensor names to shard files.");
        }

        var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var entry in map.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.String)
            {
                throw new SafetensorsFormatException(indexPath,
                    $"weight_map entry '{entry.Name}' is a JSON {entry.Value.ValueKind}, but must be a shard file name.");
            }

            string shard = entry.Value.GetString()!;
            if (shard.Length == 0 || shard is "." or ".." || System.IO.Path.GetFileName(shard) != shard
                || shard.Contains('/', StringComparison.Ordinal) || shard.Contains('\\', StringComparison.Ordinal)
                || shard.AsSpan().IndexOfAny(System.IO.Path.GetInvalidFileNameChars()) >= 0)
            {
                // Shards live next to the index; a path could point anywhere on disk. Both separators are
                // refused on every system, so an index means the same everywhere.
                throw new SafetensorsFormatException(indexPath,
                    $"weight_map entry '{entry.Name}' names the shard '{shard}', which is not a file name in the index's directory.");
            }

            if (!weightMap.TryAdd(entry.Name, shard))
            {
                throw new SafetensorsFormatException(indexPath, $"weight_map lists tensor '{entry.Name}' twice.");
            }
        }

        return weightMap;
    }
}
