using System.Globalization;
using System.Text;
using MergeLab.IO;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Fuzzes the safetensors reader with mutated valid files: each input either loads correctly (checked
/// against its bytes by <see cref="SafetensorsOracle"/>) or is refused with a
/// <see cref="SafetensorsFormatException"/>; never another exception, a crash, a hang, or managed
/// allocation out of proportion to the file. Run alone with <c>dotnet test --filter Category=Fuzz</c>.
/// </summary>
[Category("Fuzz")]
public sealed class SafetensorsFuzzTests : IDisposable
{
    /// <summary>Managed bytes per input byte the reader may allocate (opening, and reading every tensor),
    /// plus a constant for the fixed costs: linear in the file, whatever sizes the header claims.</summary>
    internal const int AllocationPerByte = 40;

    internal const long AllocationConstant = 2 << 20;

    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    [Test]
    public void Mutated_files_load_correctly_or_raise_the_format_error()
    {
        string path = _dir.File("input.safetensors");
        var summary = FuzzHarness.Run("safetensors-file", defaultIterations: 6000, defaultBudget: TimeSpan.FromSeconds(30),
            SafetensorsMutator.Next,
            (input, meter) => CheckFile(path, input.Files.Values.Single(), OptionsFor(input), meter),
            e => e is SafetensorsFormatException,
            input => AllocationPerByte * input.TotalBytes + AllocationConstant);

        if (FuzzHarness.DefaultBudget)
        {
            Assert.That(summary.Iterations, Is.GreaterThanOrEqualTo(1000), "the budget ran at least a thousand inputs");
            Assert.That(summary.Loaded, Is.GreaterThan(summary.Iterations / 50), "some mutations stay valid and load");
            Assert.That(summary.DistinctReasons, Is.GreaterThan(20), "the mutations reach many different checks");
        }
    }

    [Test]
    public void Mutated_sharded_checkpoints_load_correctly_or_raise_the_format_error()
    {
        var checkpoint = Directory.CreateDirectory(_dir.File("checkpoint")).FullName;
        var outside = Directory.CreateDirectory(_dir.File("outside")).FullName;
        var mutator = new CheckpointMutator(outside);
        var summary = FuzzHarness.Run("safetensors-checkpoint", defaultIterations: 2500, defaultBudget: TimeSpan.FromSeconds(15),
            mutator.Next,
            (input, meter) => CheckCheckpoint(checkpoint, input, meter),
            e => e is SafetensorsFormatException,
            input => AllocationPerByte * input.TotalBytes + AllocationConstant);

        if (FuzzHarness.DefaultBudget)
        {
            Assert.That(summary.Iterations, Is.GreaterThanOrEqualTo(500));
            Assert.That(summary.Loaded, Is.GreaterThan(summary.Iterations / 50));
        }
    }

    /// <summary>Every tenth input is opened with a small random header limit, so the limit is fuzzed too.</summary>
    internal static SafetensorsReadOptions OptionsFor(FuzzCase input)
    {
        int h = input.Recipe.GetHashCode(StringComparison.Ordinal);
        return (h & 0xF) == 0 ? new SafetensorsReadOptions { MaxHeaderBytes = 1 + ((h >>> 4) % 4096) } : SafetensorsReadOptions.Default;
    }

    internal static void CheckFile(string path, byte[] bytes, SafetensorsReadOptions options, AllocationMeter meter)
    {
        File.WriteAllBytes(path, bytes);
        using var file = meter.Measure(() => SafetensorsFile.Open(path, options));
        SafetensorsOracle.CheckFile(file, bytes, options, meter);
    }

    /// <summary>Writes the folder, opens it as a checkpoint and checks every tensor against its shard's bytes.</summary>
    internal static void CheckCheckpoint(string directory, FuzzCase input, AllocationMeter meter)
    {
        foreach (var stale in Directory.EnumerateFiles(directory))
        {
            File.Delete(stale);
        }

        foreach (var (name, bytes) in input.Files)
        {
            File.WriteAllBytes(Path.Combine(directory, name), bytes);
        }

        if (!input.Files.ContainsKey(SafetensorsCheckpoint.IndexFileName) && !input.Files.ContainsKey(SafetensorsCheckpoint.SingleFileName))
        {
            // Not a checkpoint folder at all: that is a missing file, not a malformed one.
            Assert.Throws<FileNotFoundException>(() => meter.Measure(() => SafetensorsCheckpoint.Open(directory).Dispose()));
            return;
        }

        using var checkpoint = meter.Measure(() => SafetensorsCheckpoint.Open(directory));
        var shardBytes = new Dictionary<string, byte[]>(StringComparer.Ordinal);
        foreach (var shard in checkpoint.Shards)
        {
            Assert.That(Path.GetDirectoryName(Path.GetFullPath(shard.Path)), Is.EqualTo(Path.GetFullPath(directory)),
                "a shard outside the checkpoint directory was opened");
            shardBytes[shard.Path] = input.Files[Path.GetFileName(shard.Path)];
        }

        Assert.That(checkpoint.TensorNames, Is.Unique);
        long total = 0;
        foreach (var name in checkpoint.TensorNames)
        {
            var shard = checkpoint.GetShard(name);
            var info = checkpoint.GetInfo(name);
            using var t = meter.Measure(() => checkpoint.ReadTensor(name));
            SafetensorsOracle.CheckTensor(t, info, shardBytes[shard.Path]);
            total += info.ByteLength;
        }

        Assert.That(checkpoint.TotalSize, Is.EqualTo(total));
    }
}

/// <summary>
/// Makes hostile checkpoint folders from a valid three-shard one: edits to the index (shard names that
/// climb out of the folder, absolute paths, empty and odd names, wrong JSON types, missing and extra
/// tensors, deep nesting, lone surrogates), mutated shards (<see cref="SafetensorsMutator"/>), and
/// missing, extra or renamed files. A valid shard waits in a sibling folder for an index that points at it.
/// </summary>
internal sealed class CheckpointMutator
{
    private const string Index = SafetensorsCheckpoint.IndexFileName;
    private readonly Dictionary<string, byte[]> _seed;
    private readonly string _outside;

    public CheckpointMutator(string outsideDirectory)
    {
        _outside = outsideDirectory;
        string dir = Path.Combine(Path.GetTempPath(), "mergelab-fuzz-checkpoint-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            using (var writer = new ShardedCheckpointWriter(dir, maxShardBytes: 100))
            {
                for (int i = 0; i < 5; i++)
                {
                    writer.Add($"model.layers.{i}.weight", full([10], i + 0.5, ScalarType.Float32));
                }

                writer.Add("model.norm.weight", ones([4], ScalarType.BFloat16));
                writer.Complete();
            }

            _seed = Directory.EnumerateFiles(dir).ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes, StringComparer.Ordinal);
            // The same first shard, outside the checkpoint: an index that reaches it must be refused.
            File.WriteAllBytes(Path.Combine(_outside, "model-00001-of-00003.safetensors"), _seed["model-00001-of-00003.safetensors"]);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    public FuzzCase Next(Random r)
    {
        var files = new Dictionary<string, byte[]>(_seed, StringComparer.Ordinal);
        var recipe = new StringBuilder("3 shards");
        int count = 1 + (r.Next(4) == 0 ? 1 : 0);
        for (int m = 0; m < count; m++)
        {
            Mutate(r, files, recipe);
        }

        return new FuzzCase(files, recipe.ToString());
    }

    private void Mutate(Random r, Dictionary<string, byte[]> files, StringBuilder recipe)
    {
        var shards = files.Keys.Where(k => k.EndsWith(".safetensors", StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToArray();
        int choice = r.Next(100);
        if (choice < 20 && shards.Length > 0)
        {
            string shard = shards[r.Next(shards.Length)];
            recipe.Append(CultureInfo.InvariantCulture, $", {shard}:");
            files[shard] = SafetensorsMutator.Mutate(r, files[shard], recipe);
            return;
        }

        if (choice < 30)
        {
            switch (r.Next(4))
            {
                case 0 when shards.Length > 0:
                    string gone = shards[r.Next(shards.Length)];
                    files.Remove(gone);
                    recipe.Append(CultureInfo.InvariantCulture, $", delete {gone}");
                    return;
                case 1 when shards.Length > 0:
                    string from = shards[r.Next(shards.Length)];
                    files["model-00009-of-00009.safetensors"] = files[from];
                    files.Remove(from);
                    recipe.Append(CultureInfo.InvariantCulture, $", rename {from}");
                    return;
                case 2 when shards.Length > 0:
                    files[SafetensorsCheckpoint.SingleFileName] = files[shards[r.Next(shards.Length)]];
                    recipe.Append(", add a model.safetensors");
                    return;
                default:
                    files.Remove(Index);
                    files["other.index.json"] = _seed[Index];
                    recipe.Append(", no index (a stray one)");
                    return;
            }
        }

        if (!files.TryGetValue(Index, out var index))
        {
            return;
        }

        if (choice < 45 && index.Length > 0)
        {
            // Byte-level damage to the index.
            var b = (byte[])index.Clone();
            int at = r.Next(b.Length);
            switch (r.Next(3))
            {
                case 0:
                    b[at] ^= (byte)(1 << r.Next(8));
                    recipe.Append(CultureInfo.InvariantCulture, $", index bit flip at {at}");
                    break;
                case 1:
                    b = b[..at];
                    recipe.Append(CultureInfo.InvariantCulture, $", index truncated to {at}");
                    break;
                default:
                    b = [.. b[..at], .. b[Math.Min(b.Length, at + 1 + r.Next(6))..]];
                    recipe.Append(CultureInfo.InvariantCulture, $", index bytes deleted at {at}");
                    break;
            }

            files[Index] = b;
            return;
        }

        string json = Encoding.UTF8.GetString(index);
        string[] shardNames =
        [
            "../outside/model-00001-of-00003.safetensors", Path.Combine(_outside, "model-00001-of-00003.safetensors"),
            "./model-00001-of-00003.safetensors", "model-00001-of-00003.safetensors/", "", ".", "..", "/", "\\\\server\\share",
            "..\\\\outside\\\\model-00001-of-00003.safetensors", "model-00001-of-00003.safetensors\\u0000.txt", "\\ud800",
            Index, "config.json", new string('m', 300) + ".safetensors", "model-00002-of-00003.safetensors",
            "MODEL-00001-OF-00003.SAFETENSORS", " model-00001-of-00003.safetensors",
        ];
        string edited;
        switch (r.Next(8))
        {
            case 0:
            case 1:
            {
                // Point one tensor (or all of them) at a hostile shard name.
                string value = shardNames[r.Next(shardNames.Length)];
                var targets = System.Text.RegularExpressions.Regex.Matches(json, "\"(model-0000[0-9]-of-00003\\.safetensors)\"");
                if (r.Next(3) == 0 || targets.Count == 0)
                {
                    edited = json.Replace("model-00001-of-00003.safetensors", value, StringComparison.Ordinal);
                    recipe.Append(CultureInfo.InvariantCulture, $", every shard 1 -> \"{value}\"");
                }
                else
                {
                    var m = targets[r.Next(targets.Count)];
                    edited = json[..m.Groups[1].Index] + value + json[(m.Groups[1].Index + m.Groups[1].Length)..];
                    recipe.Append(CultureInfo.InvariantCulture, $", a shard -> \"{value}\"");
                }

                break;
            }

            case 2:
            {
                string[] values = ["1", "null", "[]", "{}", "true", "\"model-00001-of-00003.safetensors\""];
                string entry = new[] { "model.layers.0.weight", "missing.weight", "\\ud800", "", "model.layers.0.weight" }[r.Next(5)];
                string value = values[r.Next(values.Length)];
                edited = json.Replace("\"weight_map\": {", $"\"weight_map\": {{\n    \"{entry}\": {value},", StringComparison.Ordinal);
                recipe.Append(CultureInfo.InvariantCulture, $", weight_map entry \"{entry}\": {value}");
                break;
            }

            case 3:
            {
                string[] roots = ["[]", "null", "\"x\"", "{}", "{\"weight_map\": []}", "{\"weight_map\": null}", "{\"metadata\": {}}", "\uFEFF{}", ""];
                edited = roots[r.Next(roots.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", index = {edited}");
                break;
            }

            case 4:
            {
                int depth = new[] { 100, 127, 128, 129, 5000 }[r.Next(5)];
                edited = json.Replace("\"metadata\": {", $"\"deep\": {new string('[', depth)}{new string(']', depth)},\n  \"metadata\": {{", StringComparison.Ordinal);
                recipe.Append(CultureInfo.InvariantCulture, $", nested {depth} deep");
                break;
            }

            case 5:
            {
                // Drop one weight_map line: the index then hides a tensor its shard holds.
                var lines = json.Split('\n').ToList();
                var mapLines = lines.Select((l, i) => (l, i)).Where(x => x.l.Contains(".safetensors\"", StringComparison.Ordinal)).ToArray();
                if (mapLines.Length == 0)
                {
                    edited = json;
                    break;
                }

                var victim = mapLines[r.Next(mapLines.Length)];
                lines.RemoveAt(victim.i);
                edited = string.Join('\n', lines).Replace(",\n  }", "\n  }", StringComparison.Ordinal);
                recipe.Append(", drop a weight_map line");
                break;
            }

            case 6:
            {
                // A huge weight_map: many names for one shard (refused: the shard lacks them).
                int n = new[] { 10, 1000, 50_000 }[r.Next(3)];
                var sb = new StringBuilder();
                for (int i = 0; i < n; i++)
                {
                    sb.Append(CultureInfo.InvariantCulture, $"\n    \"extra.{i}\": \"model-00001-of-00003.safetensors\",");
                }

                edited = json.Replace("\"weight_map\": {", "\"weight_map\": {" + sb, StringComparison.Ordinal);
                recipe.Append(CultureInfo.InvariantCulture, $", {n} extra weight_map entries");
                break;
            }

            default:
            {
                int at = r.Next(json.Length);
                string[] tokens = ["\"", "{", "}", "[", "]", ",", ":", "\\", "\\u", "\\ud800", "null", "\u0000", "é"];
                string token = tokens[r.Next(tokens.Length)];
                edited = json.Insert(at, token);
                recipe.Append(CultureInfo.InvariantCulture, $", insert {token} at {at}");
                break;
            }
        }

        files[Index] = Encoding.UTF8.GetBytes(edited);
    }
}
