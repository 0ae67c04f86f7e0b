namespace MergeLab.Config;

/// <summary>
/// Limits applied when a merge config is read, so that a hostile or corrupt file is refused with a
/// <see cref="MergeConfigException"/> before it can exhaust the stack, memory or time. The defaults are
/// far above any real config (mergekit configs are a few kilobytes and a few levels deep).
/// </summary>
/// <remarks>The checks run over YamlDotNet's event stream, which needs no recursion, before the document
/// is built (building it recurses once per nesting level). Aliases are not copied by the parser, but
/// they are counted as if they were, so an alias bomb ("billion laughs") is refused however it is used.
/// Immutable and thread-safe.</remarks>
public sealed record MergeConfigReadOptions
{
    /// <summary>Default <see cref="MaxLength"/>: 1,048,576 (1 MiB).</summary>
    public const int DefaultMaxLength = 1 << 20;

    /// <summary>Default <see cref="MaxDepth"/>: 64.</summary>
    public const int DefaultMaxDepth = 64;

    /// <summary>Default <see cref="MaxNodes"/>: 100,000.</summary>
    public const int DefaultMaxNodes = 100_000;

    /// <summary>The options used when none are given.</summary>
    public static MergeConfigReadOptions Default { get; } = new();

    /// <summary>
    /// The longest config accepted: its length in characters for <see cref="MergeConfig.Parse(string, string?, MergeConfigReadOptions)"/>,
    /// its size in bytes for <see cref="MergeConfig.Load(string, MergeConfigReadOptions)"/> (checked before the file is read).
    /// Default 1,048,576; at least 1.
    /// </summary>
    public int MaxLength { get; init; } = DefaultMaxLength;

    /// <summary>The deepest nesting of mappings and sequences accepted. Default 64; at least 1.</summary>
    public int MaxDepth { get; init; } = DefaultMaxDepth;

    /// <summary>The most YAML nodes (scalars, mappings, sequences) accepted, each alias counted as the
    /// nodes it stands for. Default 100,000; at least 1.</summary>
    public int MaxNodes { get; init; } = DefaultMaxNodes;

    internal void Validate()
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxLength, 1, nameof(MaxLength));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxDepth, 1, nameof(MaxDepth));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxNodes, 1, nameof(MaxNodes));
    }
}
