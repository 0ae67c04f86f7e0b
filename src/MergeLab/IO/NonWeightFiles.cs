using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using MergeLab.Config;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// The files of a Hugging Face model directory other than its weights — config.json,
/// generation_config.json, tokenizer.json, tokenizer_config.json, tokenizer.model,
/// special_tokens_map.json, vocab/merges files, chat templates — which a merged model needs beside its
/// new weights to be loadable.
/// </summary>
/// <remarks>
/// <para>A model folder is not trusted: a repository can hold symbolic links (git stores them), and a
/// <c>tokenizer.json</c> that links to, say, <c>~/.aws/credentials</c> would otherwise be copied into
/// the merged model, which its owner may then publish. So a link is followed only when its final target
/// lies inside the source folder, or, for a Hugging Face cache snapshot
/// (<c>…/models--org--name/snapshots/REV/</c>), inside that repository's <c>blobs/</c> folder; any
/// other link is refused with an <see cref="IOException"/> before anything is copied. An empty file is
/// recreated rather than read, so a FIFO or device (which report a size of 0) is never opened.</para>
/// <para>Stateless and thread-safe.</para>
/// </remarks>
public static class NonWeightFiles
{
    // Tokenizer and configuration assets; .jinja is the chat template file newer transformers writes,
    // .tiktoken the vocabulary of tiktoken-based tokenizers.
    private static readonly string[] Extensions = [".json", ".txt", ".model", ".jinja", ".tiktoken"];

    /// <summary>
    /// Whether the file named <paramref name="fileName"/> is one to copy: a <c>.json</c>, <c>.txt</c>,
    /// <c>.model</c>, <c>.jinja</c> or <c>.tiktoken</c> file that is not a weight index
    /// (<c>*.index.json</c>, e.g. <c>model.safetensors.index.json</c> or <c>pytorch_model.bin.index.json</c>).
    /// Weights (<c>.safetensors</c>, <c>.bin</c>, …), code (<c>.py</c>) and documentation are not copied.
    /// </summary>
    public static bool IsNonWeightFile(string fileName)
    {
        ArgumentNullException.ThrowIfNull(fileName);
        string name = Path.GetFileName(fileName);
        if (name.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase))
        {
            // The index describes the source's shards, not the merged model's.
            return false;
        }

        return Extensions.Any(e => name.EndsWith(e, StringComparison.OrdinalIgnoreCase));
    }

    /// <summary>
    /// Copies the non-weight files (see <see cref="IsNonWeightFile"/>) at the top level of
    /// <paramref name="sourceDirectory"/> into <paramref name="destinationDirectory"/>, which must exist.
    /// A file already in the destination is kept unless <paramref name="overwrite"/> is true, so files the
    /// merge wrote itself (e.g. its own config.json) win.
    /// </summary>
    /// <param name="sourceDirectory">The model folder to copy from.</param>
    /// <param name="destinationDirectory">The folder to copy into.</param>
    /// <param name="overwrite">Whether a file already in the destination is replaced.</param>
    /// <param name="include">Which of the non-weight files (by file name) to copy; null: all of them.</param>
    /// <returns>The names of the files copied, in ordinal order.</returns>
    /// <exception cref="DirectoryNotFoundException">Either directory does not exist.</exception>
    /// <exception cref="IOException">A file to copy is a symbolic link to a file outside the source folder
    /// (see the remarks); nothing was copied.</exception>
    public static IReadOnlyList<string> Copy(string sourceDirectory, string destinationDirectory, bool overwrite = false, Func<string, bool>? include = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(sourceDirectory);
        ArgumentException.ThrowIfNullOrEmpty(destinationDirectory);
        foreach (var dir in new[] { sourceDirectory, destinationDirectory })
        {
            if (!Directory.Exists(dir))
            {
                throw new DirectoryNotFoundException($"The directory '{dir}' does not exist.");
            }
        }

        var sources = Directory.EnumerateFiles(sourceDirectory)
            .Where(f => IsNonWeightFile(Path.GetFileName(f)) && (include is null || include(Path.GetFileName(f))))
            .Order(StringComparer.Ordinal).ToArray();
        foreach (var source in sources)
        {
            // Every link is checked before the first file is copied, so a refusal copies nothing.
            RequireLinkInside(sourceDirectory, source);
        }

        var copied = new List<string>();
        foreach (var source in sources)
        {
            string name = Path.GetFileName(source);
            string destination = Path.Combine(destinationDirectory, name);
            if (!overwrite && File.Exists(destination))
            {
                continue;
            }

            if (new FileInfo(source).Length == 0)
            {
                File.WriteAllBytes(destination, []);
            }
            else
            {
                File.Copy(source, destination, overwrite);
            }

            copied.Add(name);
        }

        return copied;
    }

    /// <summary>Whether <paramref name="fileName"/> describes the model rather than its tokenizer:
    /// <c>config.json</c> or <c>generation_config.json</c>.</summary>
    public static bool IsModelFile(string fileName)
    {
        ArgumentNullException.ThrowIfNull(fileName);
        string name = Path.GetFileName(fileName);
        return name.Equals("config.json", StringComparison.OrdinalIgnoreCase) || name.Equals("generation_config.json", StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>Whether <paramref name="fileName"/> is one of the files a Hugging Face tokenizer is loaded
    /// from: <c>tokenizer*</c> (tokenizer.json, tokenizer.model, tokenizer_config.json), a vocabulary or
    /// merges file, a SentencePiece model, or the special and added tokens.</summary>
    public static bool IsTokenizerFile(string fileName)
    {
        ArgumentNullException.ThrowIfNull(fileName);
        string name = Path.GetFileName(fileName);
        return name.StartsWith("tokenizer", StringComparison.OrdinalIgnoreCase)
            || TokenizerFileNames.Contains(name, StringComparer.OrdinalIgnoreCase);
    }

    private static readonly string[] TokenizerFileNames =
        ["vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json", "added_tokens.json"];

    /// <summary>
    /// Sets the dtype a Hugging Face <c>config.json</c> declares (<c>torch_dtype</c>, and <c>dtype</c>, the
    /// newer name, where present) to <paramref name="dtype"/>, as mergekit does for its output; a config that
    /// declares neither with a value gets <c>torch_dtype</c>, as mergekit's written by transformers always has
    /// (a key declared as null is set too). A file that <see cref="ReadConfig"/> does not read is left as it is.
    /// </summary>
    /// <param name="configPath">The config.json to edit in place.</param>
    /// <param name="dtype">The merged weights' dtype.</param>
    public static void SetConfigDType(string configPath, ScalarType dtype)
    {
        ArgumentNullException.ThrowIfNull(configPath);
        if (ReadConfig(configPath) is not { } config)
        {
            return;
        }

        string name = DTypeNames.TorchName(dtype);
        bool changed = false;
        foreach (var key in new[] { "torch_dtype", "dtype" })
        {
            // A key declared as a string or as null is set; torch_dtype is added when neither key has a value.
            bool declared = config.ContainsKey(key) && config[key]?.GetValueKind() is null or JsonValueKind.String;
            bool missing = key == "torch_dtype" && config["torch_dtype"] is null && config["dtype"] is null;
            if ((declared || missing) && (string?)config[key] != name)
            {
                config[key] = name;
                changed = true;
            }
        }

        if (changed)
        {
            // Relaxed escaping keeps non-ASCII text and characters such as + and < as they were written.
            var options = new JsonSerializerOptions { WriteIndented = true, IndentSize = 2, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
            File.WriteAllText(configPath, config.ToJsonString(options) + "\n");
        }
    }

    /// <summary>The <c>vocab_size</c> that the <c>config.json</c> of <paramref name="folder"/> declares at its top
    /// level as a whole number, or null (also when <see cref="ReadConfig"/> does not read the file, or reading
    /// it fails).</summary>
    internal static long? ConfigVocabSize(string folder)
    {
        try
        {
            return ReadConfig(Path.Combine(folder, "config.json")) is { } config
                && config["vocab_size"] is JsonValue value && value.TryGetValue(out long size) ? size : null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null; // not this check's to report
        }
    }

    /// <summary>A model's <c>config.json</c> as a JSON object, or null when there is no such file, it is empty
    /// (as a FIFO or device reports itself, so neither is opened), larger than 16 MiB, not JSON, has duplicate
    /// keys or is not an object.</summary>
    private static JsonObject? ReadConfig(string path)
    {
        var file = new FileInfo(path);
        if (!file.Exists || file.Length is 0 or > 16L << 20)
        {
            return null;
        }

        try
        {
            // Duplicate keys are refused here rather than by the first lookup.
            return JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }) as JsonObject;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    /// <summary>Refuses a symbolic link whose final target is outside <paramref name="directory"/> (or, for a
    /// Hugging Face cache snapshot, outside its repository's <c>blobs/</c> folder).</summary>
    private static void RequireLinkInside(string directory, string file)
    {
        var info = new FileInfo(file);
        if (info.LinkTarget is null)
        {
            return;
        }

        var target = info.ResolveLinkTarget(returnFinalTarget: true)
            ?? throw new IOException($"'{file}' is a symbolic link that cannot be resolved; MergeLab does not copy it.");
        string full = Path.GetFullPath(target.FullName);
        string dir = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory));
        if (PathCase.IsInside(full, dir))
        {
            return;
        }

        // A cache snapshot: <cache>/models--org--name/snapshots/<revision>/file -> ../../blobs/<hash>.
        var snapshots = Path.GetDirectoryName(dir);
        var repository = snapshots is null ? null : Path.GetDirectoryName(snapshots);
        if (snapshots is not null && repository is not null && Path.GetFileName(snapshots) == "snapshots"
            && PathCase.IsInside(full, Path.Combine(repository, "blobs")))
        {
            return;
        }

        throw new IOException(
            $"'{file}' is a symbolic link to '{full}', outside the model folder '{dir}'. MergeLab does not copy files from " +
            "elsewhere into a merged model (a downloaded model could otherwise make it copy your own files); replace the link with the file.");
    }
}
