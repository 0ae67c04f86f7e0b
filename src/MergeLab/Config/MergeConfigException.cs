using System.Text;

namespace MergeLab.Config;

/// <summary>
/// A merge config is invalid: bad YAML, an unknown key or parameter, a value out of range for some
/// tensor, a missing model. Raised by <see cref="MergeConfig.Load(string)"/>, <see cref="MergeConfig.Parse(string, string?)"/>
/// and <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/>, before any tensor is merged. The message names the file, the
/// line (where the YAML gives one) and the key path, e.g.
/// <c>merge.yml, line 7, models[1].parameters.densty: unknown parameter …</c>.
/// </summary>
public class MergeConfigException : Exception
{
    /// <summary>Creates an exception about the value at <paramref name="keyPath"/>.</summary>
    /// <param name="filePath">The config file, or null for a config parsed from a string.</param>
    /// <param name="line">The 1-based line of the offending YAML node, when known.</param>
    /// <param name="keyPath">Where in the config, e.g. <c>models[1].parameters.density</c>; null for
    /// the file as a whole.</param>
    /// <param name="problem">What is wrong, as a sentence.</param>
    /// <param name="innerException">The underlying error, if any.</param>
    public MergeConfigException(string? filePath, int? line, string? keyPath, string problem, Exception? innerException = null)
        : base(Format(filePath, line, keyPath, problem), innerException)
    {
        FilePath = filePath;
        Line = line;
        KeyPath = keyPath;
    }

    /// <summary>Creates an exception with a message.</summary>
    public MergeConfigException(string message) : base(message)
    {
    }

    /// <summary>Creates an exception with a message and inner exception.</summary>
    public MergeConfigException(string message, Exception innerException) : base(message, innerException)
    {
    }

    /// <summary>Creates an exception with no message.</summary>
    public MergeConfigException()
    {
    }

    /// <summary>The config file, or null for a config parsed from a string.</summary>
    public string? FilePath { get; }

    /// <summary>The 1-based line of the offending YAML node, when known.</summary>
    public int? Line { get; }

    /// <summary>The key path of the offending value, e.g. <c>models[1].parameters.density</c>, when there is one.</summary>
    public string? KeyPath { get; }

    private static string Format(string? filePath, int? line, string? keyPath, string problem)
    {
        var sb = new StringBuilder();
        sb.Append(filePath is null ? "merge config" : $"merge config '{filePath}'");
        if (line is int l)
        {
            sb.Append(", line ").Append(l);
        }

        if (!string.IsNullOrEmpty(keyPath))
        {
            sb.Append(", ").Append(keyPath);
        }

        return sb.Append(": ").Append(problem).ToString();
    }
}
