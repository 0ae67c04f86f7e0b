using System.CommandLine;
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
        return root.Parse(args).Invoke();
    }
}
