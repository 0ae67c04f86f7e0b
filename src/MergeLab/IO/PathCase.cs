namespace MergeLab.IO;

/// <summary>
/// How file paths compare: case-sensitively on Linux, whose file systems are, and case-insensitively
/// elsewhere (the default file systems of Windows and macOS), so that two spellings of one folder are
/// recognised as the same model and a link cannot leave a folder by changing case.
/// </summary>
internal static class PathCase
{
    /// <summary>The comparison of paths and path prefixes.</summary>
    public static StringComparison Comparison { get; } = OperatingSystem.IsLinux() ? StringComparison.Ordinal : StringComparison.OrdinalIgnoreCase;

    /// <summary>The comparer of whole paths (for dictionaries and equality).</summary>
    public static StringComparer Comparer { get; } = OperatingSystem.IsLinux() ? StringComparer.Ordinal : StringComparer.OrdinalIgnoreCase;

    /// <summary>Whether the absolute <paramref name="path"/> lies below the absolute <paramref name="directory"/>
    /// (not the directory itself; everything lies below a root).</summary>
    public static bool IsInside(string path, string directory)
    {
        string prefix = Path.EndsInDirectorySeparator(directory) ? directory : directory + Path.DirectorySeparatorChar;
        return path.StartsWith(prefix, Comparison);
    }
}
