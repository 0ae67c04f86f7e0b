using System.CommandLine;
using System.Runtime.InteropServices;
using MergeLab.Cli.Commands;

namespace MergeLab.Cli;

/// <summary>The <c>mergelab</c> command line: argument parsing and console output only; the merging
/// lives in the library.</summary>
internal static class Program
{
    /// <summary>Runs the command line and returns the process exit code.</summary>
    internal static int Main(string[] args)
    {
        var root = new RootCommand("MergeLab: merge fine-tuned checkpoints that share a base model.")
        {
            MergeCommand.Create(),
            InspectCommand.Create(),
        };
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            // The error contract: one line on standard error (System.CommandLine would add the whole help).
            Console.Error.WriteLine($"mergelab: {parse.Errors[0].Message.ReplaceLineEndings(" ")} See '--help'.");
            return 1;
        }

        // The first Ctrl+C or SIGTERM cancels the merge, which then removes what it wrote and exits with 130;
        // a second one ends the process at once. (System.CommandLine's own handling would end it after two
        // seconds, whatever the merge was doing.)
        using var cancel = new CancellationTokenSource();
        void Stop(PosixSignalContext context)
        {
            if (!cancel.IsCancellationRequested)
            {
                context.Cancel = true;
                Console.Error.WriteLine("mergelab: cancelling (again to stop at once)…");
                cancel.Cancel();
            }
        }

        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
        using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
        return parse.InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = null }, cancel.Token).GetAwaiter().GetResult();
    }
}
