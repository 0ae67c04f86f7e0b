// MergeLab benchmarks. From the repository root:
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*'              (full run)
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*' --job short  (quicker)
//   dotnet run -c Release --project benchmarks/MergeLab.Benchmarks -- --filter '*' --job dry    (smoke test)
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;

// Every job runs in this process. BenchmarkDotNet's default toolchain builds a generated project that
// skips Directory.Build.targets, so it would load TorchSharp's unpatched native library, which fails
// on Debian 12 (GLIBCXX_3.4.32). A mutator job is applied to every job, including those picked on the
// command line with --job short / --job dry, so they all get the in-process toolchain.
var config = DefaultConfig.Instance
    .AddJob(Job.Default.WithToolchain(InProcessEmitToolchain.Instance).AsMutator());

var summaries = BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args, config);
return summaries.Any(s => s.HasCriticalValidationErrors || s.Reports.Any(r => !r.Success)) ? 1 : 0;
