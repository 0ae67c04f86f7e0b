using System.Diagnostics;
using System.Globalization;
using System.Text;
using MergeLab.Config;
using MergeLab.Engine;
using MergeLab.IO;
using TorchSharp;

namespace MergeLab.Benchmarks;

/// <summary>
/// <c>e2e --dir DIR [--params 1B] [--models 4] [--seed 1] [--method ties] [--nonfinite fail|pass]
/// [--read map|copy] [--omp-passive] [--cold] [--repeat 3] [--keep] [--clean]</c>: the end-to-end
/// streaming merge. Generates the synthetic checkpoints into DIR unless they are there, then measures,
/// on the same files:
/// <list type="number">
/// <item>reading them alone: the raw files (sequential reads into a reused buffer), every tensor through
/// MergeLab's reader in the engine's order (base and experts per name), one group in memory at a time, and
/// every group as the merge reads it (a group's inputs in parallel), copied and mapped;</item>
/// <item>writing alone the bytes the merge writes (the base's shard sizes, which the bf16 output matches)
/// from one warm buffer into new files, flushed to disk (fsync) as the merge flushes its output;</item>
/// <item>the CLI merging them (<c>MergeLab.Cli merge</c> with a YAML config) under <c>/usr/bin/time -v</c>:
/// wall time, input throughput (input bytes over wall time) and peak RSS.</item>
/// </list>
/// <c>--nonfinite pass</c> is handed to the CLI (it then skips its NaN/∞ scan of the inputs), and so is
/// <c>--read copy</c> (copied instead of mapped inputs);
/// <c>--omp-passive</c> runs it with <c>OMP_WAIT_POLICY=PASSIVE</c> (libtorch's OpenMP threads sleep
/// instead of spinning between operations, which on two cores steals time from the merge).
/// By default every step finds the inputs in the page cache (they are read once first). <c>--cold</c>
/// (Linux) drops them from the page cache before each read and the merge instead, so that every step reads
/// them from the disk, as a merge of checkpoints larger than the machine's memory does.
/// The reads and the merge run <c>--repeat</c> times, in rounds (raw read, tensor read, group read, merge),
/// so that a drift of the machine's speed (large on a shared virtual machine) falls on all of them alike;
/// the table gives each step's median and range, and each throughput ratio is the median of the rounds'
/// own ratios. A failed merge ends the rounds and prints no table.
/// The output is deleted at the end, and so are the checkpoints this run generated (unless <c>--keep</c>) or found
/// there already (with <c>--clean</c>).
/// </summary>
public static class EndToEnd
{
    public static int Run(string[] args)
    {
        var options = Args.Parse(args, "e2e", ["dir", "params", "models", "seed", "method", "nonfinite", "read", "repeat"], ["omp-passive", "cold", "keep", "clean"]);
        // Every option is checked before gigabytes are generated or read.
        string dir = Path.GetFullPath(options.Get("dir") ?? throw new UsageException("e2e needs --dir DIR."));
        string method = options.Get("method") ?? "ties";
        var spec = MethodCatalog.Find(method) ?? throw new UsageException(MethodCatalog.UnknownMethodProblem(method));

        if (options.Get("nonfinite") is { } nonFiniteMode and not ("fail" or "pass"))
        {
            throw new UsageException($"--nonfinite must be fail or pass, not '{nonFiniteMode}'.");
        }

        if (options.Get("read") is { } mode and not ("map" or "copy"))
        {
            throw new UsageException($"--read must be map or copy, not '{mode}'.");
        }

        long repeat = options.Long("repeat", 3);
        if (repeat is < 1 or > 1000)
        {
            throw new UsageException($"--repeat must be between 1 and 1000, not {repeat}.");
        }

        bool cold = options.Has("cold");
        if (cold && !OperatingSystem.IsLinux())
        {
            throw new UsageException("--cold drops files from the page cache with posix_fadvise, which needs Linux.");
        }

        int experts = options.Models();
        var shape = options.Shape();
        long seed = options.Long("seed", 1);
        bool generated = false;
        if (!Directory.Exists(Path.Combine(dir, "base")))
        {
            Console.WriteLine($"Generating {experts} experts and a base ({shape.Name}) in {dir} ...");
            var sw = Stopwatch.StartNew();
            SyntheticCheckpoints.Generate(dir, shape, experts, seed, 1_000_000_000);
            Console.WriteLine($"  generated in {sw.Elapsed.TotalSeconds:F1} s");
            generated = true;
        }
        else if (options.Has("params") || options.Has("seed"))
        {
            Console.WriteLine($"Using the checkpoints already in {dir}: --params and --seed only apply when they are generated.");
        }

        var models = new[] { Path.Combine(dir, "base") }.Concat(Enumerable.Range(1, experts).Select(k => Path.Combine(dir, $"expert-{k}"))).ToArray();
        if (models.Skip(1).FirstOrDefault(d => !Directory.Exists(d)) is { } missing)
        {
            throw new UsageException($"{dir} has no {Path.GetFileName(missing)} for --models {experts}; give fewer models, or a new --dir to generate them.");
        }

        var files = models.SelectMany(m => Directory.GetFiles(m, "*.safetensors")).ToArray();
        long inputBytes = files.Sum(f => new FileInfo(f).Length);
        string output = Path.Combine(dir, "merged");
        string config = Path.Combine(dir, $"{method}.yaml");
        File.WriteAllText(config, Config(spec, models));

        try
        {
            torch.set_num_threads(2);
            var outputSizes = Directory.GetFiles(models[0], "*.safetensors").Select(f => new FileInfo(f).Length).ToArray();
            long outputBytes = outputSizes.Sum();
            var (write, flush) = WriteAlone(outputSizes, Path.Combine(dir, "write-alone"));
            var extra = new List<string>();
            if (options.Get("nonfinite") is { } nonFinite)
            {
                extra.AddRange(["--nonfinite", nonFinite]);
            }

            if (options.Get("read") is { } readMode)
            {
                extra.AddRange(["--read", readMode]);
            }

            if (!cold)
            {
                ReadRawFiles(files); // once to warm the page cache, as the merge will find it
            }

            // Each timed step, from disk with --cold (refused above off Linux; the analyzer needs the check here).
            T Step<T>(Func<T> timed)
            {
                if (cold && OperatingSystem.IsLinux())
                {
                    PageCache.Drop(files);
                }

                return timed();
            }

            var raw = new double[repeat];
            var tensors = new double[repeat];
            var groups = new double[repeat];
            var mapped = new double[repeat];
            var wall = new double[repeat];
            long peakKb = 0;
            int exit = 0;
            int rounds = 0;
            while (rounds < repeat && exit == 0)
            {
                Console.WriteLine($"Round {rounds + 1} of {repeat}:");
                raw[rounds] = Step(() => ReadRawFiles(files));
                tensors[rounds] = Step(() => ReadTensors(models));
                groups[rounds] = Step(() => ReadGroups(models, map: false));
                mapped[rounds] = Step(() => ReadGroups(models, map: true));
                // The previous round's output goes before the clock starts: replacing it would add deleting
                // 2.2 GB (about 0.3 s here) to the merge's time.
                if (Directory.Exists(output))
                {
                    Directory.Delete(output, recursive: true);
                }

                (wall[rounds], long peak, exit) = Step(() => RunCli(config, output, extra, options.Has("omp-passive")));
                peakKb = Math.Max(peakKb, peak);
                rounds++;
            }

            if (exit != 0)
            {
                // Its time and memory say nothing about merging: no table.
                Console.WriteLine($"The merge failed in round {rounds} (CLI exit code {exit}); see its output above.");
                return exit;
            }

            Console.WriteLine();
            Console.WriteLine($"Inputs: {models.Length} checkpoints, {inputBytes / 1e9:F2} GB ({files.Length} shards), bfloat16, "
                + $"{(cold ? "read from the disk (dropped from the page cache before each step)" : "in the page cache")}; "
                + $"method {method}; {Environment.ProcessorCount} cores; {repeat} round(s): median (range)");
            Console.WriteLine("| Step | Time (s) | Input GB/s | Peak RSS |");
            Console.WriteLine("|---|---|---|---|");
            Console.WriteLine($"| read the files alone (raw) | {Spread(raw)} | {inputBytes / Median(raw) / 1e9:F2} | - |");
            Console.WriteLine($"| read every tensor alone (MergeLab reader) | {Spread(tensors)} | {inputBytes / Median(tensors) / 1e9:F2} | - |");
            Console.WriteLine($"| read every group alone, copied (a group's inputs in parallel; the merge with --read copy) | {Spread(groups)} | {inputBytes / Median(groups) / 1e9:F2} | - |");
            Console.WriteLine($"| read every group alone, mapped and checked for NaN/∞ (the merge's read; per-tensor selections such as TIES check after merging instead) | {Spread(mapped)} | {inputBytes / Median(mapped) / 1e9:F2} | - |");
            Console.WriteLine($"| write the output's {outputBytes / 1e9:F2} GB alone, then fsync (of which fsync) | {write + flush:F2} ({flush:F2}) | - | - |");
            string flags = string.Join(' ', extra) + (options.Has("omp-passive") ? " OMP_WAIT_POLICY=PASSIVE" : "");
            Console.WriteLine($"| mergelab merge ({method}{(flags.Length > 0 ? ", " + flags.Trim() : "")}) | {Spread(wall)} | {inputBytes / Median(wall) / 1e9:F2} | {(peakKb > 0 ? $"{peakKb / 1024.0 / 1024.0:F2} GiB" : "n/a")} |");
            Console.WriteLine($"{Ratios("raw-read", raw, wall)}.");
            Console.WriteLine($"{Ratios("copied-group-read", groups, wall)}.");
            Console.WriteLine($"{Ratios("tensor-read", tensors, wall)}; "
                + $"against reading the inputs and writing the output alone: {(Median(tensors) + write + flush) / Median(wall):P0}.");
            return 0;
        }
        finally
        {
            if (Directory.Exists(output))
            {
                Directory.Delete(output, recursive: true);
            }

            if (!options.Has("keep") && (generated || options.Has("clean")))
            {
                foreach (var m in models)
                {
                    Directory.Delete(m, recursive: true);
                }

                File.Delete(config);
            }
        }
    }

    /// <summary>The median of <paramref name="values"/> (the mean of the middle two for an even count).</summary>
    private static double Median(double[] values)
    {
        var sorted = values.Order().ToArray();
        int mid = sorted.Length / 2;
        return sorted.Length % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
    }

    /// <summary>The merge's input throughput over a read's, per round (the read's seconds over the merge's)
    /// and their median, as one line.</summary>
    private static string Ratios(string read, double[] readSeconds, double[] mergeSeconds)
    {
        var ratios = readSeconds.Zip(mergeSeconds, (r, m) => r / m).ToArray();
        return $"Merge throughput / {read} throughput, per round: {string.Join(", ", ratios.Select(x => x.ToString("P0", CultureInfo.InvariantCulture)))} (median {Median(ratios):P0})";
    }

    /// <summary>"median (min–max)" in seconds, or the one value.</summary>
    private static string Spread(double[] values) => values.Length == 1
        ? values[0].ToString("F2", CultureInfo.InvariantCulture)
        : string.Create(CultureInfo.InvariantCulture, $"{Median(values):F2} ({values.Min():F2}–{values.Max():F2})");

    /// <summary>The merge config: each expert with weight 1 and density 0.2 where <paramref name="method"/>
    /// takes them per model (PCB takes neither), the method's defaults otherwise.</summary>
    private static string Config(MethodSpec spec, string[] models)
    {
        var perModel = new[] { ("weight", "1.0"), ("density", "0.2") }
            .Where(p => spec.Find(p.Item1)?.Scope == ParameterScope.PerModel)
            .Select(p => $"{p.Item1}: {p.Item2}")
            .ToArray();
        var yaml = new StringBuilder();
        yaml.AppendLine(CultureInfo.InvariantCulture, $"merge_method: {spec.Name}");
        yaml.AppendLine(CultureInfo.InvariantCulture, $"base_model: {models[0]}");
        yaml.AppendLine("models:");
        foreach (var m in models.Skip(1))
        {
            yaml.AppendLine(CultureInfo.InvariantCulture, $"  - model: {m}");
            if (perModel.Length > 0)
            {
                yaml.AppendLine(CultureInfo.InvariantCulture, $"    parameters: {{{string.Join(", ", perModel)}}}");
            }
        }

        yaml.AppendLine("dtype: bfloat16");
        return yaml.ToString();
    }

    /// <summary>Every shard read sequentially into one reused 16 MiB buffer: the file-system floor.</summary>
    private static double ReadRawFiles(string[] files)
    {
        var buffer = new byte[16 << 20];
        var sw = Stopwatch.StartNew();
        foreach (var f in files)
        {
            using var stream = new FileStream(f, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan);
            while (stream.Read(buffer, 0, buffer.Length) > 0)
            {
            }
        }

        double seconds = sw.Elapsed.TotalSeconds;
        Console.WriteLine($"  raw read: {seconds:F2} s");
        return seconds;
    }

    /// <summary>Files of <paramref name="sizes"/> written sequentially from one reused 16 MiB buffer into
    /// <paramref name="dir"/> and flushed to disk; returns the write and the flush seconds, and deletes them.</summary>
    private static (double Write, double Flush) WriteAlone(long[] sizes, string dir)
    {
        var buffer = new byte[16 << 20];
        Random.Shared.NextBytes(buffer);
        Directory.CreateDirectory(dir);
        try
        {
            var streams = new List<FileStream>();
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < sizes.Length; i++)
            {
                var stream = new FileStream(Path.Combine(dir, $"shard-{i}"), FileMode.CreateNew, FileAccess.Write, FileShare.None, 1);
                streams.Add(stream);
                for (long left = sizes[i]; left > 0; left -= buffer.Length)
                {
                    stream.Write(buffer, 0, (int)Math.Min(left, buffer.Length));
                }
            }

            double write = sw.Elapsed.TotalSeconds;
            sw.Restart();
            foreach (var stream in streams)
            {
                stream.Flush(flushToDisk: true);
                stream.Dispose();
            }

            double flush = sw.Elapsed.TotalSeconds;
            Console.WriteLine($"  write alone: {write:F2} s + fsync {flush:F2} s");
            return (write, flush);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>Every tensor through SafetensorsCheckpoint.ReadTensor, group by group as the engine reads.</summary>
    private static double ReadTensors(string[] models) => TimeReads(models, "tensor read", checkpoints => () =>
    {
        var group = new List<torch.Tensor>(checkpoints.Length);
        foreach (var name in checkpoints[0].TensorNames)
        {
            try
            {
                foreach (var c in checkpoints)
                {
                    group.Add(c.ReadTensor(name));
                }
            }
            finally
            {
                // Also when a read throws: the group's earlier tensors are not left to the finalizer.
                group.ForEach(t => t.Dispose());
                group.Clear();
            }
        }
    });

    /// <summary>Every group (one name's tensors from the base and every expert) read as the merge reads
    /// it, a group's inputs in parallel, one group in memory at a time: copied without the NaN/∞ check, or
    /// mapped with it (<paramref name="map"/>; the check is what touches, and so faults in, every page).</summary>
    private static double ReadGroups(string[] models, bool map) => TimeReads(models, map ? "mapped group read" : "group read", checkpoints =>
    {
        var set = new CheckpointSet(checkpoints[0], checkpoints[1..], requiresBase: true) { MapInputs = map };
        return () =>
        {
            foreach (var name in set.Names)
            {
                set.Load(name, torch.CPU, checkFinite: map).Dispose();
            }
        };
    });

    /// <summary>Opens <paramref name="models"/>, lets <paramref name="prepare"/> set up a read of them
    /// (untimed), and returns the seconds the read takes, printed under <paramref name="label"/>.</summary>
    private static double TimeReads(string[] models, string label, Func<SafetensorsCheckpoint[], Action> prepare)
    {
        var checkpoints = models.Select(m => SafetensorsCheckpoint.Open(m)).ToArray();
        try
        {
            var read = prepare(checkpoints);
            var sw = Stopwatch.StartNew();
            read();
            double seconds = sw.Elapsed.TotalSeconds;
            Console.WriteLine($"  {label}: {seconds:F2} s");
            return seconds;
        }
        finally
        {
            foreach (var c in checkpoints)
            {
                c.Dispose();
            }
        }
    }

    /// <summary>Runs the built CLI under /usr/bin/time -v (when present); returns wall seconds, peak RSS
    /// in KiB (0 when unknown) and the exit code.</summary>
    private static (double Wall, long PeakKb, int Exit) RunCli(string config, string output, List<string> extra, bool ompPassive)
    {
        string cli = FindCli();
        bool timeTool = File.Exists("/usr/bin/time");
        var start = new ProcessStartInfo(timeTool ? "/usr/bin/time" : "dotnet")
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            UseShellExecute = false,
        };
        if (timeTool)
        {
            start.ArgumentList.Add("-v");
            start.ArgumentList.Add("dotnet");
        }

        foreach (var a in new[] { cli, "merge", config, output, "--overwrite" }.Concat(extra))
        {
            start.ArgumentList.Add(a);
        }

        if (ompPassive)
        {
            start.Environment["OMP_WAIT_POLICY"] = "PASSIVE";
        }

        var sw = Stopwatch.StartNew();
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        string stderr = process.StandardError.ReadToEnd();
        process.WaitForExit();
        double wall = sw.Elapsed.TotalSeconds;
        long peak = 0;
        foreach (var line in stderr.Split('\n'))
        {
            var t = line.Trim();
            if (t.StartsWith("Maximum resident set size (kbytes):", StringComparison.Ordinal))
            {
                peak = long.Parse(t[(t.IndexOf(':', StringComparison.Ordinal) + 1)..].Trim(), CultureInfo.InvariantCulture);
            }
        }

        Console.WriteLine($"  merge: {wall:F2} s (exit {process.ExitCode})");
        if (process.ExitCode != 0)
        {
            Console.WriteLine(stdout.Result);
            Console.WriteLine(stderr);
        }

        return (wall, peak, process.ExitCode);
    }

    /// <summary>src/MergeLab.Cli/bin/Release/net10.0/MergeLab.Cli.dll above this program (build it first).</summary>
    private static string FindCli()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            string candidate = Path.Combine(d.FullName, "src", "MergeLab.Cli", "bin", "Release", "net10.0", "MergeLab.Cli.dll");
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        throw new FileNotFoundException("MergeLab.Cli.dll not found: run `dotnet build -c Release src/MergeLab.Cli` first.");
    }
}
