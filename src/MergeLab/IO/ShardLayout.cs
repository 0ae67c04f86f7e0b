using System.Globalization;
using System.Text;

namespace MergeLab.IO;

/// <summary>
/// The final layout of a written checkpoint, shared by <see cref="ShardedCheckpointWriter"/> and
/// <see cref="PlannedCheckpointWriter"/>: one shard becomes <c>model.safetensors</c>; several become
/// <c>model-0000k-of-0000N.safetensors</c> plus <c>model.safetensors.index.json</c>.
/// </summary>
internal static class ShardLayout
{
    /// <summary>The most shards the 5-digit names can number.</summary>
    public const int MaxShards = 99_999;

    /// <summary>The final file name of shard <paramref name="k"/> (0-based) of <paramref name="n"/>.</summary>
    public static string ShardFileName(int k, int n) =>
        n == 1 ? SafetensorsCheckpoint.SingleFileName : string.Create(CultureInfo.InvariantCulture, $"model-{k + 1:D5}-of-{n:D5}.safetensors");

    /// <summary>The temporary path of shard <paramref name="k"/> (0-based) while the checkpoint is written.</summary>
    public static string TempShardPath(string directory, string prefix, int k) =>
        Path.Combine(directory, string.Create(CultureInfo.InvariantCulture, $"{prefix}-shard-{k + 1:D5}.safetensors"));

    /// <summary>
    /// Renames the written shards (temporary paths, in order, with the tensor names each holds) to their
    /// final names in <paramref name="directory"/>, writes the index when there are several, and deletes
    /// a <c>model.safetensors</c> or index left there by an earlier save of the other layout (loaders
    /// would pick it first).
    /// </summary>
    /// <returns>The file names written, shards first and the index last.</returns>
    /// <exception cref="InvalidOperationException">More than <see cref="MaxShards"/> shards.</exception>
    public static List<string> Finish(string directory, IReadOnlyList<(string TempPath, IReadOnlyList<string> Names)> shards, long totalSize)
    {
        int n = shards.Count;
        if (n > MaxShards)
        {
            throw new InvalidOperationException($"{n} shards do not fit the 5-digit shard names; raise the maximum shard size.");
        }

        var written = new List<string>(n + 1);
        var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
        for (int k = 0; k < n; k++)
        {
            string fileName = ShardFileName(k, n);
            File.Move(shards[k].TempPath, Path.Combine(directory, fileName), overwrite: true);
            written.Add(fileName);
            foreach (var name in shards[k].Names)
            {
                weightMap.Add(name, fileName);
            }
        }

        if (n == 1)
        {
            DeleteIfPresent(directory, SafetensorsCheckpoint.IndexFileName);
        }
        else
        {
            DeleteIfPresent(directory, SafetensorsCheckpoint.SingleFileName);
            byte[] index = Encoding.ASCII.GetBytes(IndexJson(totalSize, weightMap));
            SafetensorsWriter.WriteAtomically(Path.Combine(directory, SafetensorsCheckpoint.IndexFileName), index.Length, s => s.Write(index));
            written.Add(SafetensorsCheckpoint.IndexFileName);
        }

        return written;
    }

    /// <summary>
    /// The index as transformers writes it: <c>json.dumps(index, indent=2, sort_keys=True) + "\n"</c>,
    /// i.e. keys in code-point order, two-space indent, <c>": "</c> after keys, non-ASCII escaped.
    /// </summary>
    public static string IndexJson(long totalSize, IReadOnlyDictionary<string, string> weightMap)
    {
        var sb = new StringBuilder();
        sb.Append("{\n  \"metadata\": {\n    \"total_size\": ")
            .Append(totalSize.ToString(CultureInfo.InvariantCulture))
            .Append("\n  },\n  \"weight_map\": {");
        bool first = true;
        foreach (var name in weightMap.Keys.Order(CodePointComparer.Instance))
        {
            sb.Append(first ? "\n    " : ",\n    ");
            first = false;
            JsonText.AppendPythonString(sb, name);
            sb.Append(": ");
            JsonText.AppendPythonString(sb, weightMap[name]);
        }

        sb.Append(first ? "}\n}\n" : "\n  }\n}\n");
        return sb.ToString();
    }

    private static void DeleteIfPresent(string directory, string fileName)
    {
        string path = Path.Combine(directory, fileName);
        if (File.Exists(path))
        {
            File.Delete(path);
        }
    }
}
