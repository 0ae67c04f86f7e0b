using System.CommandLine;
using System.Globalization;
using MergeLab.Config;
using MergeLab.IO;
using Spectre.Console;

namespace MergeLab.Cli.Commands;

/// <summary>Console helpers: whether to draw live widgets, byte formatting, and the error contract.</summary>
internal static class ConsoleOutput
{
    /// <summary>True when standard output is a terminal; redirected output gets plain lines.</summary>
    public static bool Interactive => !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;

    /// <summary><paramref name="argument"/>, refusing an empty value as a parse error that names it (an empty
    /// path would otherwise reach the library as "the value cannot be an empty string").</summary>
    public static Argument<string> NonEmpty(Argument<string> argument)
    {
        argument.Validators.Add(result =>
        {
            if (string.IsNullOrEmpty(result.GetValueOrDefault<string>()))
            {
                result.AddError($"{argument.Name} is empty; give a path.");
            }
        });
        return argument;
    }

    public static string Bytes(long bytes)
    {
        string[] units = ["B", "KB", "MB", "GB", "TB"];
        double v = bytes;
        int u = 0;
        while (v >= 1000 && u < units.Length - 1)
        {
            v /= 1000;
            u++;
        }

        return u == 0 ? $"{bytes} B" : v.ToString("0.00", CultureInfo.InvariantCulture) + " " + units[u];
    }

    /// <summary>Parses sizes such as <c>5GB</c>, <c>500MB</c>, <c>2GiB</c> or a plain byte count, from 1 byte
    /// to <see cref="long.MaxValue"/> bytes.</summary>
    /// <exception cref="FormatException">Not a size, or one outside that range.</exception>
    public static long ParseSize(string text)
    {
        var t = text.Trim();
        (string Suffix, long Factor)[] units =
        [
            ("KIB", 1L << 10), ("MIB", 1L << 20), ("GIB", 1L << 30), ("TIB", 1L << 40),
            ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000), ("B", 1),
        ];
        foreach (var (suffix, factor) in units)
        {
            if (t.EndsWith(suffix, StringComparison.OrdinalIgnoreCase)
                && double.TryParse(t[..^suffix.Length], NumberStyles.Float, CultureInfo.InvariantCulture, out var n) && n > 0)
            {
                // Whole bytes, at least one; long.MaxValue as a double rounds up to 2^63, just past the range.
                double bytes = Math.Floor(n * factor);
                return bytes >= 1 && bytes < long.MaxValue
                    ? (long)bytes
                    : throw new FormatException($"'{text}' is out of range; a size is from 1 byte to {Bytes(long.MaxValue)}.");
            }
        }

        return long.TryParse(t, NumberStyles.Integer, CultureInfo.InvariantCulture, out var plain) && plain > 0
            ? plain
            : throw new FormatException($"'{text}' is not a size; use e.g. 5GB, 500MB or 2GiB.");
    }
}

/// <summary>The exit-code contract: 0 on success; 1 for a bad input, config or environment, 2 for an
/// internal error, 130 when cancelled; otherwise a one-line reason on standard error.</summary>
internal static class ConsoleErrors
{
    public static int Run(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (OperationCanceledException)
        {
            Console.Error.WriteLine("mergelab: cancelled; nothing was written.");
            return 130;
        }
        catch (Exception e) when (e is MergeException or MergeConfigException or SafetensorsFormatException
                                       or IOException or UnauthorizedAccessException or ArgumentException or FormatException)
        {
            Console.Error.WriteLine("mergelab: " + e.Message.ReplaceLineEndings(" "));
            return 1;
        }
        catch (Exception e)
        {
            // A bug rather than a bad input: still one line (the contract), with the stack on request.
            Console.Error.WriteLine($"mergelab: internal error ({e.GetType().Name}): {e.Message.ReplaceLineEndings(" ")}" +
                (Environment.GetEnvironmentVariable("MERGELAB_DEBUG") is "1" ? Environment.NewLine + e : " (set MERGELAB_DEBUG=1 for details)"));
            return 2;
        }
    }
}
