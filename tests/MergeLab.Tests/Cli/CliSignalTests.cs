using System.Diagnostics;
using System.Runtime.InteropServices;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Cli;

/// <summary>Ctrl+C and SIGTERM sent to a real <c>mergelab merge</c> process: it stops, removes what it
/// wrote and exits with 130. (The in-process tests cannot send a signal; the handling lives in Main.) And
/// Main's own ending of a merge process, which the in-process tests do not reach.</summary>
[NonParallelizable]
[Platform("Linux")]
public partial class CliSignalTests
{
    private const int SigInt = 2, SigTerm = 15;

    [LibraryImport("libc", SetLastError = true)]
    private static partial int kill(int pid, int sig);

    [TestCase(SigInt)]
    [TestCase(SigTerm)]
    public void A_signal_during_a_merge_removes_its_output_and_exits_130(int signal)
    {
        using var dir = new TempDirectory();
        string config = WriteModels(dir);
        string output = dir.File("out");

        // PCB over the whole model reads every input in four statistics passes before the merge pass, and
        // 6,000 small tensors take a second or more (the per-tensor work dominates), so the merge is still
        // running when the first progress line (a tenth of pass 1) has been printed.
        using var child = StartMerge(dir.Path, config, output);
        var process = child.Process;
        var error = process.StandardError.ReadToEndAsync();
        var firstLine = process.StandardOutput.ReadLineAsync();
        Assert.That(firstLine.Wait(TimeSpan.FromSeconds(60)), Is.True, "a progress line within a minute");
        string? first = firstLine.Result;
        if (first is null || !first.StartsWith("statistics pass 1:", StringComparison.Ordinal))
        {
            process.WaitForExit(30_000);
            Assert.Fail($"expected a progress line, got '{first}'; stderr: {(process.HasExited ? error.Result : "")}");
        }

        // .NET leaves a signal its process inherited as ignored ignored (a background job of a
        // non-interactive shell ignores SIGINT); the handling cannot be tested there.
        if (signal == SigInt && IgnoresSigInt(process.Id))
        {
            Assert.Ignore("this process tree ignores SIGINT (started in the background by a non-interactive shell?)");
        }

        int sent = kill(process.Id, signal);
        Assert.That(sent, Is.EqualTo(0), $"errno {Marshal.GetLastPInvokeError()}, exited {process.HasExited}");
        var rest = process.StandardOutput.ReadToEndAsync();
        Assert.That(process.WaitForExit(60_000), Is.True, "the process ends after the signal");

        // The signal comes at a tenth of the first of five passes; a merge that completes anyway has
        // not honoured it.
        Assert.That(process.ExitCode, Is.EqualTo(130), $"stdout: {rest.Result} stderr: {error.Result}");
        Assert.That(error.Result, Does.Contain("cancelling").And.Contain("cancelled; nothing was written."));
        Assert.That(Directory.Exists(output), Is.False);
        Assert.That(Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName),
            Is.EquivalentTo(new[] { "base", "e1", "e2", "e3", "pcb.yaml" }), "no temporary folder left");
    }

    /// <summary>A completed merge ends the process without libtorch's teardown (<c>_exit</c>); its output,
    /// exit code and console lines must all be there.</summary>
    [TestCase(false)]
    [TestCase(true)]
    public void A_completed_or_failed_merge_process_keeps_its_output_and_exit_code(bool fail)
    {
        using var dir = new TempDirectory();
        var generator = new Generator(seed: 3);
        using var baseModel = new StateDict();
        baseModel.Add("w", randn([64, 64], generator: generator));
        using var expert = new StateDict();
        expert.Add("w", randn([64, 64], generator: generator));
        CliTests.Save(dir, "base", baseModel);
        CliTests.Save(dir, "e1", expert);
        string config = dir.File("ta.yaml");
        File.WriteAllText(config, "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e1\n    parameters: {weight: 1.0}\n");
        string output = dir.File("out");
        if (fail)
        {
            Directory.CreateDirectory(output);
            File.WriteAllText(Path.Combine(output, "notes.txt"), "not a checkpoint");
        }

        using var child = StartMerge(dir.Path, config, output);
        var process = child.Process;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        Assert.That(process.WaitForExit(120_000), Is.True);
        if (fail)
        {
            Assert.That((process.ExitCode, stderr.Result), Is.EqualTo((1, $"mergelab: The output '{output}' already exists; choose a new directory or allow overwriting (the CLI's --overwrite).{Environment.NewLine}")));
            return;
        }

        Assert.That(process.ExitCode, Is.EqualTo(0), stderr.Result);
        string last = stdout.Result.TrimEnd().Split('\n')[^1];
        Assert.That(last, Does.StartWith("Merged 1 tensors (").And.Contain($") into {output} in ").And.EndWith(" s."), stdout.Result);
        using var merged = MergeLab.IO.SafetensorsCheckpoint.Open(output);
        Assert.That(merged.TensorNames, Is.EqualTo(new[] { "w" }));
    }

    /// <summary>Whether the process ignores SIGINT (bit 2 of SigIgn in /proc/PID/status).</summary>
    private static bool IgnoresSigInt(int pid)
    {
        string? line = File.ReadLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("SigIgn:", StringComparison.Ordinal));
        return line is not null && (Convert.ToUInt64(line["SigIgn:".Length..].Trim(), 16) & (1UL << (SigInt - 1))) != 0;
    }

    /// <summary>A base and three experts of 6,000 float32 tensors of 256 entries (6 MiB each), and a PCB config.</summary>
    private static string WriteModels(TempDirectory dir)
    {
        var generator = new Generator(seed: 7);
        using var baseModel = new StateDict();
        for (int i = 0; i < 6_000; i++)
        {
            baseModel.Add($"layers.{i}.weight", randn([256], generator: generator));
        }

        CliTests.Save(dir, "base", baseModel);
        for (int k = 1; k <= 3; k++)
        {
            using var expert = new StateDict();
            foreach (var name in baseModel.Names)
            {
                using var noise = randn([256], generator: generator);
                expert.Add(name, baseModel[name].add(noise, alpha: 0.01));
            }

            CliTests.Save(dir, $"e{k}", expert);
        }

        string config = dir.File("pcb.yaml");
        File.WriteAllText(config, """
            merge_method: pcb
            base_model: base
            models:
              - model: e1
              - model: e2
              - model: e3
            """);
        return config;
    }

    /// <summary>Starts <c>mergelab merge CONFIG OUT_DIR</c> as a process in <paramref name="directory"/>, its
    /// output redirected; disposing the result kills the process tree if it is still running (a failed
    /// assertion leaves no merge behind).</summary>
    private static ChildProcess StartMerge(string directory, string config, string output) =>
        new(Process.Start(new ProcessStartInfo(DotnetHost(), [Path.Combine(AppContext.BaseDirectory, "MergeLab.Cli.dll"), "merge", config, output])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = directory,
        })!);

    /// <summary>A started process that is killed, with its children, when disposed before it ends.</summary>
    private sealed class ChildProcess(Process process) : IDisposable
    {
        public Process Process { get; } = process;

        public void Dispose()
        {
            if (!Process.HasExited)
            {
                Process.Kill(entireProcessTree: true);
                Process.WaitForExit();
            }

            Process.Dispose();
        }
    }

    /// <summary>The dotnet host: the one the SDK names for the tests (DOTNET_HOST_PATH), the one running them,
    /// else dotnet on the PATH.</summary>
    private static string DotnetHost() =>
        Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } sdkHost && File.Exists(sdkHost) ? sdkHost
        : Environment.ProcessPath is { } host && Path.GetFileNameWithoutExtension(host) == "dotnet" ? host
        : "dotnet";
}
