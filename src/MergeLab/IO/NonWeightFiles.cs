namespace MergeLab.IO;

/// <summary>
/// The files of a Hugging Face model directory other than its weights — config.json,
/// generation_config.json, tokenizer.json, tokenizer_config.json, tokenizer.model,
/// special_tokens_map.json, vocab/merges files, chat templates — which a merged model needs beside its
/// new weights to be loadable.
/// </summary>
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
    /// <returns>The names of the files copied, in ordinal order.</returns>
    /// <exception cref="DirectoryNotFoundException">Either directory does not exist.</exception>
    public static IReadOnlyList<string> Copy(string sourceDirectory, string destinationDirectory, bool overwrite = false)
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

        var copied = new List<string>();
        foreach (var source in Directory.EnumerateFiles(sourceDirectory).Order(StringComparer.Ordinal))
        {
            string name = Path.GetFileName(source);
            if (!IsNonWeightFile(name))
            {
                continue;
            }

            string destination = Path.Combine(destinationDirectory, name);
            if (!overwrite && File.Exists(destination))
            {
                continue;
            }

            File.Copy(source, destination, overwrite);
            copied.Add(name);
        }

        return copied;
    }
}
