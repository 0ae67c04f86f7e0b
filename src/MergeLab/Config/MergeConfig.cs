namespace MergeLab.Config;

/// <summary>One entry of a config's <c>models</c> list.</summary>
/// <param name="Path">The model's checkpoint directory (or file) as written; relative paths are relative
/// to the config file's directory (see <see cref="MergeConfig.ResolvePath"/>).</param>
/// <param name="Parameters">The model's own parameters (e.g. <c>weight</c>, <c>density</c>), which take
/// precedence over the global ones.</param>
public sealed record ModelReference(string Path, IReadOnlyDictionary<string, ParameterValue> Parameters)
{
    /// <summary>The 1-based line of the entry in the YAML, when it was parsed from one.</summary>
    public int? Line { get; init; }
}

/// <summary>
/// A parsed mergekit-style merge config (the <c>models:</c> form of mergekit's
/// <c>MergeConfiguration</c>). Immutable; <see cref="Load"/> and <see cref="Parse"/> check its keys,
/// method name, parameter names and value types, and dtype names, reporting every problem as a
/// <see cref="MergeConfigException"/> with the file, line and key path. Values that depend on the
/// tensor (gradients, filters) are checked by <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/>.
/// </summary>
/// <remarks>
/// Accepted top-level keys: <c>models</c> (required), <c>merge_method</c> (required), <c>base_model</c>,
/// <c>parameters</c>, <c>dtype</c>, <c>out_dtype</c>, <c>tokenizer_source</c>. mergekit's <c>slices</c>,
/// <c>modules</c>, <c>tokenizer</c> and <c>chat_template</c> are refused with a message saying so, and any
/// other key is an error. A model is a path string, or mergekit's mapping forms <c>{model: path}</c> and
/// <c>{model: {path: path}}</c>; LoRA adapters and hub revisions are not supported.
/// </remarks>
public sealed record MergeConfig
{
    private static readonly IReadOnlyDictionary<string, ParameterValue> NoParameters = new Dictionary<string, ParameterValue>();

    /// <summary>The merge method's name, e.g. <c>ties</c> (see <see cref="MergePlan"/> for the list).</summary>
    public required string MergeMethod { get; init; }

    /// <summary>The input models in config order.</summary>
    public required IReadOnlyList<ModelReference> Models { get; init; }

    /// <summary>The base (pretrained) model's path as written, or null.</summary>
    public string? BaseModel { get; init; }

    /// <summary>The global parameters: method-wide ones (<c>lambda</c>, <c>normalize</c>, …) and
    /// fallbacks for the per-model ones.</summary>
    public IReadOnlyDictionary<string, ParameterValue> Parameters { get; init; } = NoParameters;

    /// <summary>mergekit's <c>dtype</c> (its compute dtype), or null. MergeLab computes in float32 and
    /// uses it only as the output dtype when <see cref="OutDType"/> is not given.</summary>
    public string? DType { get; init; }

    /// <summary>The output dtype's name (<c>float32</c>, <c>bfloat16</c>, <c>fp16</c>, …), or null.</summary>
    public string? OutDType { get; init; }

    /// <summary><c>base</c>, or the path of the model whose tokenizer the output takes, or null.</summary>
    public string? TokenizerSource { get; init; }

    /// <summary>The config file this was read from, or null; relative model paths are resolved against its directory.</summary>
    public string? SourcePath { get; init; }

    /// <summary>Key path → 1-based YAML line, for error messages.</summary>
    internal IReadOnlyDictionary<string, int> Lines { get; init; } = new Dictionary<string, int>();

    /// <summary>Reads and checks the config file at <paramref name="path"/>.</summary>
    /// <exception cref="MergeConfigException">The file cannot be read or the config is invalid.</exception>
    public static MergeConfig Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        string yaml;
        try
        {
            yaml = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException or ArgumentException)
        {
            throw new MergeConfigException(path, null, null, $"cannot read the file: {e.Message}", e);
        }

        return Parse(yaml, path);
    }

    /// <summary>Parses and checks a config.</summary>
    /// <param name="yaml">The YAML text.</param>
    /// <param name="sourcePath">The file it came from, for messages and for resolving relative paths;
    /// null resolves them against the current directory.</param>
    /// <exception cref="MergeConfigException">The config is invalid.</exception>
    public static MergeConfig Parse(string yaml, string? sourcePath = null)
    {
        ArgumentNullException.ThrowIfNull(yaml);
        var config = new MergeConfigParser(sourcePath).Parse(yaml);
        ConfigChecks.CheckStatic(config);
        return config;
    }

    /// <summary>The absolute form of a model path from this config: relative paths are taken relative
    /// to the directory of <see cref="SourcePath"/> (the current directory when there is none).</summary>
    public string ResolvePath(string modelPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(modelPath);
        string directory = SourcePath is null
            ? Environment.CurrentDirectory
            : System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(SourcePath)) ?? Environment.CurrentDirectory;
        var full = System.IO.Path.GetFullPath(modelPath, directory);
        var trimmed = System.IO.Path.TrimEndingDirectorySeparator(full);
        return trimmed.Length == 0 ? full : trimmed;
    }

    /// <summary>The YAML line of the value at <paramref name="keyPath"/>, when known.</summary>
    internal int? LineOf(string keyPath) => Lines.TryGetValue(keyPath, out int line) ? line : null;

    /// <summary>A <see cref="MergeConfigException"/> about the value at <paramref name="keyPath"/>.</summary>
    internal MergeConfigException Error(string? keyPath, string problem, int? line = null) =>
        new(SourcePath, line ?? (keyPath is null ? null : LineOf(keyPath)), keyPath, problem);
}
