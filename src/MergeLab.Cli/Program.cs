using System.CommandLine;
using System.CommandLine.Help;
using System.Runtime.InteropServices;
using MergeLab.Cli.Commands;
using MergeLab.Engine;

namespace MergeLab.Cli;

/// <summary>The <c>mergelab</c> command line: argument parsing and console output only; the merging
/// lives in the library.</summary>
internal static partial class Program
{
    /// <summary>The process entry point: <see cref="Run"/>, then, after a merge on Linux, the exit without
    /// the native libraries' teardown.</summary>
    internal static int Main(string[] args)
    {
        int exit = Run(args, out bool merge);
        if (merge && OperatingSystem.IsLinux() && Environment.GetEnvironmentVariable("MERGELAB_FULL_EXIT") != "1")
        {
            // Everything is written and renamed into place; what is left of a normal exit is libtorch's
            // static destructors deregistering each of its thousands of operator kernels, about 0.1 s of a
            // few-second merge. The console writers flush as they write; flushed again to be sure. .NET's
            // own exit handlers are skipped too: tools that write their files then (a dotnet-trace session,
            // coverage of this process) need MERGELAB_FULL_EXIT=1.
            Console.Out.Flush();
            Console.Error.Flush();
            ExitNow(exit);
        }

        return exit;
    }

    /// <summary>libc's <c>_exit</c>: ends the process at once, without running exit handlers.</summary>
    [LibraryImport("libc", EntryPoint = "_exit")]
    private static partial void ExitNow(int status);

    /// <summary>Runs the command line and returns the process exit code; <paramref name="merge"/> says
    /// whether the command was a merge (which loads libtorch), whatever its outcome.</summary>
    internal static int Run(string[] args, out bool merge)
    {
        merge = false;
        // A plain command named as the tool is installed, not RootCommand, which takes the assembly's name
        // (MergeLab.Cli) for the usage text; it then needs the help and version options added.
        var root = new Command("mergelab", "MergeLab: merge fine-tuned checkpoints that share a base model.")
        {
            new HelpOption(),
            new VersionOption(),
            MergeCommand.Create(),
            InspectCommand.Create(),
        };
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            // The error contract: one line on standard error (System.CommandLine would add the whole help).
            // A token it did not recognise says more than the missing command it then also reports
            // ("mergelab frob").
            var error = parse.Errors.FirstOrDefault(e => parse.UnmatchedTokens.Any(t => e.Message.Contains($"'{t}'", StringComparison.Ordinal)))
                ?? parse.Errors[0];
            Console.Error.WriteLine($"mergelab: {error.Message.ReplaceLineEndings(" ")} See '--help'.");
            return 1;
        }

        // During a merge, the first Ctrl+C or SIGTERM cancels it, and it then removes what it wrote and exits
        // with 130; a second one ends the process at once. (System.CommandLine's own handling would end it
        // after two seconds, whatever the merge was doing.) Other commands are short and keep the default.
        using var cancel = new CancellationTokenSource();
        void Stop(PosixSignalContext context)
        {
            if (!cancel.IsCancellationRequested)
            {
                context.Cancel = true;
                Console.Error.WriteLine("mergelab: cancelling (again to stop at once, leaving the unfinished output behind)…");
                _ = cancel.CancelAsync(); // the token's callbacks run off the signal thread
            }
            else
            {
                // The process ends with the signal's default action, so nothing removes the hidden folder
                // (if the merge got as far as making it, or the first signal's cleanup has not removed it yet).
                var output = parse.GetValue<string>(MergeCommand.OutputArgument);
                var left = string.IsNullOrWhiteSpace(output) ? []
                    : CheckpointMerger.FindLeftovers(output).Where(l => !l.IsPreviousOutput).Select(l => $"'{l.Path}'").ToArray();
                Console.Error.WriteLine(left.Length == 0 ? "mergelab: stopped at once."
                    : $"mergelab: stopped at once; the unfinished output may stay in {string.Join(", ", left)}: delete it if so.");
            }
        }

        merge = parse.CommandResult.Command.Name == MergeCommand.Name;
        using var interrupt = merge ? PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop) : null;
        using var terminate = merge ? PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop) : null;
        return parse.InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = null }, cancel.Token).GetAwaiter().GetResult();
    }
}
