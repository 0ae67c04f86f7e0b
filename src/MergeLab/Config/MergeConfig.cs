namespace MergeLab.Config;

/// <summary>One entry of a config's <c>models</c> list.</summary>
/// <param name="Path">The model's checkpoint directory (or file) as written; relative paths are relative
/// to the config file's directory (see <see cref="MergeConfig.ResolvePath"/>).</param>
/// <param name="Parameters">The model's own parameters (e.g. <c>weight</c>, <c>density</c>), which take
/// precedence over the global ones.</param>
/// <remarks>Immutable and thread-safe (the parser never modifies a dictionary once it has given it out).</remarks>
public sealed record ModelReference(string Path, IReadOnlyDictionary<string, ParameterValue> Parameters)
{
    /// <summary>The 1-based line of the entry in the YAML, when it was parsed from one.</summary>
    public int? Line { get; init; }
}

/// <summary>
/// A parsed mergekit-style merge config (the <c>models:</c> form of mergekit's
/// <c>MergeConfiguration</c>). Immutable; <see cref="Load(string)"/> and <see cref="Parse(string, string?)"/> check its keys,
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
/// <para>YAML is read as data only (no tag can make the parser build an object of some type), within the
/// size, depth and alias-expansion limits of <see cref="MergeConfigReadOptions"/>. A config is immutable
/// and thread-safe; <see cref="Load(string)"/> and <see cref="Parse(string, string?)"/> may run on several threads at once.</para>
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

    /// <summary>Reads and checks the config file at <paramref name="path"/>, with the default limits.</summary>
    /// <exception cref="MergeConfigException">The file cannot be read or the config is invalid.</exception>
    public static MergeConfig Load(string path) => Load(path, MergeConfigReadOptions.Default);

    /// <summary>Reads and checks the config file at <paramref name="path"/>. A file larger than
    /// <see cref="MergeConfigReadOptions.MaxLength"/> bytes is refused before it is read.</summary>
    /// <exception cref="MergeConfigException">The file cannot be read, is beyond a limit, or the config is invalid.</exception>
    public static MergeConfig Load(string path, MergeConfigReadOptions options)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        string yaml;
        if (Directory.Exists(path))
        {
            throw new MergeConfigException(path, null, null, "this is a folder; give the path of a YAML merge config file.");
        }

        try
        {
            long length = new FileInfo(path).Length;
            if (length > options.MaxLength)
            {
                throw new MergeConfigException(path, null, null,
                    $"the file is {length} bytes, above the limit of {options.MaxLength} ({nameof(MergeConfigReadOptions)}.{nameof(MergeConfigReadOptions.MaxLength)}); a merge config is a few kilobytes.");
            }

            if (length == 0)
            {
                // Also what a FIFO or a device reports; reading one could block forever.
                throw new MergeConfigException(path, null, null, "the config is empty.");
            }

            yaml = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException or ArgumentException)
        {
            throw new MergeConfigException(path, null, null, $"cannot read the file: {e.Message}", e);
        }

        return Parse(yaml, path, options);
    }

    /// <summary>Parses and checks a config, with the default limits.</summary>
    /// <param name="yaml">The YAML text.</param>
    /// <param name="sourcePath">The file it came from, for messages and for resolving relative paths;
    /// null resolves them against the current directory.</param>
    /// <exception cref="MergeConfigException">The config is invalid.</exception>
    public static MergeConfig Parse(string yaml, string? sourcePath = null) => Parse(yaml, sourcePath, MergeConfigReadOptions.Default);

    /// <summary>Parses and checks a config. YAML is read as data only: no tag can make the parser build
    /// an object of some type (tags other than the core schema's <c>!!str</c>, <c>!!int</c>, … are refused).</summary>
    /// <param name="yaml">The YAML text.</param>
    /// <param name="sourcePath">The file it came from, for messages and for resolving relative paths;
    /// null resolves them against the current directory.</param>
    /// <param name="options">Size, depth and node-count limits.</param>
    /// <exception cref="MergeConfigException">The config is invalid or beyond a limit.</exception>
    public static MergeConfig Parse(string yaml, string? sourcePath, MergeConfigReadOptions options)
    {
        ArgumentNullException.ThrowIfNull(yaml);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        var config = new MergeConfigParser(sourcePath, options).Parse(yaml);
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
