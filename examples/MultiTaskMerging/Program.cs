// The multi-task merging benchmark on Fashion-MNIST: pretrains a small MLP backbone, fine-tunes one
// expert per task (8 tasks), merges the experts with every MergeLab method (weight averaging, task
// arithmetic, TIES, DARE-TIES, Breadcrumbs, PCB, AdaMerging task-wise / layer-wise / ++, LiNeS on task
// arithmetic and TIES) and writes the papers' table: each task's test accuracy and the average.
//
// Run from the repository root (needs Debian's dataset-fashion-mnist package, or --data DIR):
//   dotnet run --project examples/MultiTaskMerging -c Release -- [--quick] [--out DIR] [--data DIR] [--cache DIR] [--no-cache] [--seed N] [--diversity W]
//
// DIR (default results/) receives results.md, results.csv and results.png. Trained checkpoints are
// cached as safetensors under DIR/cache (or --cache DIR), so a second run skips training. --seed N
// (default 0) seeds every split, initialisation and shuffle; --diversity W (default 0, the paper's loss)
// gives AdaMerging's rows the class-balance term of AdaMergingOptions.DiversityWeight.

using System.Diagnostics;
using System.Globalization;
using MergeLab.Examples.MultiTaskMerging;
using MergeLab.MultiTask;
using TorchSharp;

string outDir = "results";
string? dataDir = null, cacheDir = null;
bool quick = false, noCache = false;
int seed = 0;
double diversity = 0;
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--quick":
            quick = true;
            break;
        case "--no-cache":
            noCache = true;
            break;
        case "--out" when i + 1 < args.Length && IsValue(args[i + 1]):
            outDir = args[++i];
            break;
        case "--data" when i + 1 < args.Length && IsValue(args[i + 1]):
            dataDir = args[++i];
            break;
        case "--cache" when i + 1 < args.Length && IsValue(args[i + 1]):
            cacheDir = args[++i];
            break;
        case "--seed" when i + 1 < args.Length && int.TryParse(args[i + 1], NumberStyles.Integer, CultureInfo.InvariantCulture, out seed):
            i++;
            break;
        case "--diversity" when i + 1 < args.Length
            && double.TryParse(args[i + 1], NumberStyles.Float, CultureInfo.InvariantCulture, out diversity) && double.IsFinite(diversity) && diversity >= 0:
            i++;
            break;
        case "-h" or "--help":
            Console.WriteLine("usage: MultiTaskMerging [--quick] [--out DIR] [--data DIR] [--cache DIR] [--no-cache] [--seed N] [--diversity W]");
            return 0;
        default:
            Console.Error.WriteLine($"error: unknown, incomplete or invalid argument '{args[i]}' (--seed takes an integer, --diversity a finite number ≥ 0). usage: MultiTaskMerging [--quick] [--out DIR] [--data DIR] [--cache DIR] [--no-cache] [--seed N] [--diversity W]");
            return 2;
    }
}

if (File.Exists(outDir) || (!noCache && cacheDir is not null && File.Exists(cacheDir)))
{
    Console.Error.WriteLine($"error: '{(File.Exists(outDir) ? outDir : cacheDir)}' is a file; --out and --cache take a folder (created if missing).");
    return 1;
}

if (!FashionMnist.IsAvailable(dataDir))
{
    Console.Error.WriteLine("error: " + new FashionMnistNotFoundException(
        $"Fashion-MNIST is not in '{FashionMnist.ResolveDirectory(dataDir)}'.").Message);
    Console.Error.WriteLine($"Install it with: sudo apt-get install dataset-fashion-mnist   (or pass --data DIR / set {FashionMnist.EnvironmentVariable}).");
    return 1;
}

try
{
    Directory.CreateDirectory(outDir); // before the training, not after it
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException)
{
    Console.Error.WriteLine($"error: cannot create the output folder '{outDir}': {e.Message}");
    return 1;
}

torch.set_num_threads(2);
using var cts = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) =>
{
    e.Cancel = true;
    cts.Cancel();
};

var options = (quick ? BenchmarkOptions.Quick : BenchmarkOptions.Full) with
{
    CacheDirectory = noCache ? null : cacheDir ?? Path.Combine(outDir, "cache"),
    Seed = seed,
    AdaMergingDiversityWeight = diversity,
};
Console.WriteLine($"MergeLab multi-task merging benchmark ({options.Name}): 8 Fashion-MNIST tasks, {string.Join("-", options.Widths)} MLP, torch threads {torch.get_num_threads()}");
var clock = Stopwatch.StartNew();
try
{
    var results = MultiTaskBenchmark.Run(options, dataDir, new SynchronousProgress(line => Console.WriteLine($"[{clock.Elapsed:mm\\:ss}] {line}")), cts.Token);
    Console.WriteLine();
    Console.WriteLine(results.ToMarkdown()); // first, so a failure to write the files does not lose the table
    var (md, csv) = results.Write(outDir);
    var png = Path.Combine(outDir, "results.png");
    ResultsChart.Save(results, png);
    Console.WriteLine($"Wrote {md}, {csv} and {png} in {clock.Elapsed.TotalSeconds:F0} s.");
    return 0;
}
catch (OperationCanceledException)
{
    Console.Error.WriteLine("Cancelled.");
    return 130;
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
{
    // Unreadable data or cache, an output folder that cannot be written: one line, not a stack trace.
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}

// A value, not the next option (so "--out --quick" is an error, not a folder named "--quick").
static bool IsValue(string arg) => arg.Length > 0 && !arg.StartsWith("--", StringComparison.Ordinal);

/// <summary>Prints each line at once, on the calling thread (Progress&lt;T&gt; would post to the thread pool).</summary>
internal sealed class SynchronousProgress(Action<string> write) : IProgress<string>
{
    public void Report(string value) => write(value);
}
