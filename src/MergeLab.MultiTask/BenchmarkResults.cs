using System.Globalization;
using System.Text;
using MergeLab.Adaptive;

namespace MergeLab.MultiTask;

/// <summary>One row of the table: a method's test accuracy on every task.</summary>
/// <param name="Method">The snake_case method name (e.g. <c>task_arithmetic</c>).</param>
/// <param name="Accuracies">Test accuracy per task in percent, in task order.</param>
/// <param name="Setting">The hyper-parameters used or chosen (e.g. <c>λ = 0.3 (validation)</c>).</param>
public sealed record MethodResult(string Method, IReadOnlyList<double> Accuracies, string Setting)
{
    /// <summary>The mean of the per-task accuracies, in percent.</summary>
    public double Average => Accuracies.Average();
}

/// <summary>The benchmark's table plus what produced it; writes Markdown and CSV.</summary>
public sealed class BenchmarkResults
{
    internal BenchmarkResults(IReadOnlyList<ImageTask> tasks, IReadOnlyList<MethodResult> rows, BenchmarkOptions options,
        IReadOnlyDictionary<string, TimeSpan> timings, IReadOnlyDictionary<string, string> notes,
        IReadOnlyDictionary<string, (LayerCoefficients Initial, LayerCoefficients Learned)> coefficients)
    {
        Coefficients = coefficients;
        Tasks = tasks;
        Rows = rows;
        Options = options;
        Timings = timings;
        Notes = notes;
    }

    /// <summary>The tasks, in column order.</summary>
    public IReadOnlyList<ImageTask> Tasks { get; }

    /// <summary>One row per method, in table order.</summary>
    public IReadOnlyList<MethodResult> Rows { get; }

    /// <summary>The configuration that was run.</summary>
    public BenchmarkOptions Options { get; }

    /// <summary>Wall-clock time of each phase.</summary>
    public IReadOnlyDictionary<string, TimeSpan> Timings { get; }

    /// <summary>Extra facts (learned coefficients, cache use), keyed by topic.</summary>
    public IReadOnlyDictionary<string, string> Notes { get; }

    /// <summary>The AdaMerging rows' initial and learned coefficients, keyed by method name.</summary>
    public IReadOnlyDictionary<string, (LayerCoefficients Initial, LayerCoefficients Learned)> Coefficients { get; }

    /// <summary>The row of <paramref name="method"/>.</summary>
    /// <exception cref="KeyNotFoundException">No such row.</exception>
    public MethodResult this[string method] =>
        Rows.FirstOrDefault(r => r.Method == method) ?? throw new KeyNotFoundException($"There is no row '{method}'.");

    /// <summary>The CSV: header <c>method,&lt;task 1&gt;,…,&lt;task 8&gt;,average</c>, then one row per
    /// method, accuracies in percent with two decimals.</summary>
    public string ToCsv()
    {
        var sb = new StringBuilder();
        sb.Append("method,").AppendJoin(',', Tasks.Select(t => t.Name)).Append(",average\n");
        foreach (var row in Rows)
        {
            sb.Append(row.Method).Append(',').AppendJoin(',', row.Accuracies.Select(F)).Append(',').Append(F(row.Average)).Append('\n');
        }

        return sb.ToString();
    }

    /// <summary>The Markdown table (accuracies in percent, best merge per column in bold) with a
    /// legend of the tasks and the settings of each method.</summary>
    public string ToMarkdown()
    {
        var sb = new StringBuilder();
        sb.Append("# Multi-task merging on Fashion-MNIST (").Append(Options.Name).Append(" configuration)\n\n");
        sb.Append("Test accuracy (%) of each task with its own head; the backbone is the pretrained one, the task's own expert, or one merged backbone for all tasks.\n\n");
        sb.Append("| method | ").AppendJoin(" | ", Tasks.Select(t => t.Name)).Append(" | average | setting |\n");
        sb.Append("|---|").Append(string.Concat(Enumerable.Repeat("---:|", Tasks.Count + 1))).Append("---|\n");
        var merges = Rows.Where(r => r.Method is not ("pretrained" or "individual")).ToArray();
        var best = Enumerable.Range(0, Tasks.Count + 1)
            .Select(c => merges.Length == 0 ? double.NaN : merges.Max(r => c < Tasks.Count ? r.Accuracies[c] : r.Average)).ToArray();
        foreach (var row in Rows)
        {
            bool isMerge = merges.Contains(row);
            sb.Append("| ").Append(row.Method);
            for (int c = 0; c <= Tasks.Count; c++)
            {
                double v = c < Tasks.Count ? row.Accuracies[c] : row.Average;
                var text = v.ToString("F1", CultureInfo.InvariantCulture);
                sb.Append(" | ").Append(isMerge && Math.Round(v, 1) == Math.Round(best[c], 1) ? $"**{text}**" : text);
            }

            sb.Append(" | ").Append(row.Setting).Append(" |\n");
        }

        sb.Append("\nTasks: ").AppendJoin("; ", Tasks.Select(t => $"`{t.Name}` {t.Description} ({t.ClassCount} classes)")).Append(".\n");
        if (Notes.Count > 0)
        {
            sb.Append('\n');
            foreach (var (key, value) in Notes)
            {
                sb.Append("- ").Append(key).Append(": ").Append(value).Append('\n');
            }
        }

        if (Timings.Count > 0)
        {
            sb.Append("\nTime: ").AppendJoin(", ", Timings.Select(kv => $"{kv.Key} {kv.Value.TotalSeconds.ToString("F1", CultureInfo.InvariantCulture)} s")).Append(".\n");
        }

        return sb.ToString();
    }

    /// <summary>Writes <c>results.md</c> and <c>results.csv</c> into <paramref name="directory"/>
    /// (created if missing) and returns their paths. Each file is written under a temporary name and
    /// then renamed over the old one, so a crash never leaves a cut-short table.</summary>
    public (string Markdown, string Csv) Write(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        Directory.CreateDirectory(directory);
        var md = Path.Combine(directory, "results.md");
        var csv = Path.Combine(directory, "results.csv");
        WriteAtomically(md, ToMarkdown());
        WriteAtomically(csv, ToCsv());
        return (md, csv);
    }

    /// <summary>Writes <paramref name="text"/> to a temporary file beside <paramref name="path"/>, flushes it
    /// to disk, then renames it to <paramref name="path"/> (replacing any old file).</summary>
    public static void WriteAtomically(string path, string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        WriteAtomically(path, temporary => File.WriteAllText(temporary, text));
    }

    /// <summary>Lets <paramref name="write"/> create a temporary file beside <paramref name="path"/>, flushes
    /// it to disk, then renames it to <paramref name="path"/> (replacing any old file); the temporary file
    /// is deleted if the write, the flush or the rename fails.</summary>
    public static void WriteAtomically(string path, Action<string> write)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(write);
        // The extension stays last, for writers that look at it (an image library's SavePng).
        var temporary = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!,
            $".{Path.GetFileNameWithoutExtension(path)}.{Guid.NewGuid():N}.tmp{Path.GetExtension(path)}");
        try
        {
            write(temporary);

            // Durable before it becomes visible under its real name, as the checkpoint writer's files are
            // (the writer may have closed the file without flushing it to disk).
            using (var written = new FileStream(temporary, FileMode.Open, FileAccess.Write, FileShare.Read))
            {
                written.Flush(flushToDisk: true);
            }

            File.Move(temporary, path, overwrite: true);
        }
        catch
        {
            try
            {
                File.Delete(temporary);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The write's own error is the one to report.
            }

            throw;
        }
    }

    private static string F(double v) => v.ToString("F2", CultureInfo.InvariantCulture);
}
