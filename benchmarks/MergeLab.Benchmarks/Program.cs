// MergeLab benchmarks. From the repository root:
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*'                          (everything)
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*Kernels_BF16_4096x4096*'   (one shape and dtype)
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*Kernels_*.Ties' '*Kernels_*.Copy'
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*Threshold*'                (k-th magnitude alone)
//   ... -- --filter '*' --device cuda            (tensors on the GPU; needs a TorchSharp-cuda build)
//   ... -- --filter '*' --job short | dry        (BenchmarkDotNet's jobs instead of the default below)
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- generate --out DIR --params 1B --models 4 --seed 1
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- e2e --dir DIR --params 1B --models 4 [--cold] [--repeat 3]
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using MergeLab.Benchmarks;

const string Usage = """
    usage: generate --out DIR [--params tiny|100M|1B|7B] [--models 4] [--seed 1] [--shard-size 1GB]
           e2e --dir DIR [--params 1B] [--models 4] [--seed 1] [--method ties] [--nonfinite fail|pass] [--read map|copy] [--omp-passive] [--cold] [--repeat 3] [--keep] [--clean]
    """;
if (args.Length > 0 && args[0] is "generate" or "e2e")
{
    if (args.Skip(1).Any(a => a is "--help" or "-h" or "-?"))
    {
        Console.WriteLine(Usage);
        return 0;
    }

    try
    {
        return args[0] == "generate" ? SyntheticCheckpoints.Run(args[1..]) : EndToEnd.Run(args[1..]);
    }
    catch (UsageException e)
    {
        // A mistyped option is the user's to fix: the message, the usage, no stack trace.
        Console.Error.WriteLine($"error: {e.Message}");
        Console.Error.WriteLine(Usage);
        return 2;
    }
}

// --device cpu|cuda is ours; everything else goes to BenchmarkDotNet.
var rest = new List<string>();
for (int i = 0; i < args.Length; i++)
{
    if (args[i] == "--device")
    {
        string device = i + 1 < args.Length ? args[++i].ToLowerInvariant() : "";
        if (device is not ("cpu" or "cuda"))
        {
            Console.Error.WriteLine($"error: --device must be cpu or cuda{(device.Length > 0 ? $", not '{args[i]}'" : "")}.");
            Console.Error.WriteLine("usage: [--filter PATTERN ...] [--device cpu|cuda] [BenchmarkDotNet options]");
            return 2;
        }

        BenchmarkDevice.Name = device;
    }
    else
    {
        rest.Add(args[i]);
    }
}

// Every job runs in this process. BenchmarkDotNet's default toolchain builds a generated project that
// skips Directory.Build.targets, so it would load TorchSharp's unpatched native library, which fails
// on Debian 12 (GLIBCXX_3.4.32). A mutator job is applied to every job, including those picked on the
// command line with --job short / --job dry, so they all get the in-process toolchain.
var config = DefaultConfig.Instance
    .AddJob(Job.Default.WithToolchain(InProcessEmitToolchain.Instance).AsMutator())
    .AddColumn(StatisticColumn.Median) // next to the mean: on a shared machine one slow call moves the mean
    .AddColumn(new BandwidthColumn(fractionOfCopy: false), new BandwidthColumn(fractionOfCopy: true));

// Without a job on the command line, a compact one: each operation reads gigabytes and takes
// milliseconds to seconds, so 4 warm-ups and 7 measured calls give stable medians in reasonable time
// (with 2 warm-ups, a case's first measured call was often its slowest, by up to 1.6x).
bool jobGiven = rest.Any(a => a is "--job" or "-j" || a.StartsWith("--iterationCount", StringComparison.Ordinal) || a.StartsWith("--warmupCount", StringComparison.Ordinal));
if (!jobGiven)
{
    config = config.AddJob(Job.Default.WithWarmupCount(4).WithIterationCount(7).WithInvocationCount(1).WithUnrollFactor(1)
        .WithToolchain(InProcessEmitToolchain.Instance).WithId("MergeLab"));
}

var summaries = BenchmarkSwitcher.FromAssembly(typeof(BenchmarkDevice).Assembly).Run(rest.ToArray(), config);
return summaries.Any(s => s.HasCriticalValidationErrors || s.Reports.Any(r => !r.Success)) ? 1 : 0;
