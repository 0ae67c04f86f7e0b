using System.CommandLine;
using System.Globalization;
using MergeLab.IO;
using Spectre.Console;

namespace MergeLab.Cli.Commands;

/// <summary><c>mergelab inspect PATH</c>: tensor names, dtypes, shapes and sizes of a checkpoint.</summary>
internal static class InspectCommand
{
    public static Command Create()
    {
        var path = ConsoleOutput.NonEmpty(new Argument<string>("PATH") { Description = "A .safetensors file, a checkpoint directory, or a model.safetensors.index.json." });
        var command = new Command("inspect", "List the tensors of a safetensors file or checkpoint directory, with totals.") { path };
        command.SetAction(parse => ConsoleErrors.Run(() => Inspect(parse.GetValue(path)!)));
        return command;
    }

    private static int Inspect(string path)
    {
        using var checkpoint = SafetensorsCheckpoint.Open(path);
        var infos = checkpoint.TensorNames.Select(checkpoint.GetInfo).ToArray();
        long elements = infos.Sum(i => i.ElementCount);
        if (ConsoleOutput.Interactive)
        {
            AnsiConsole.Write(TensorTable(infos));
        }
        else
        {
            foreach (var i in infos)
            {
                Console.WriteLine($"{i.Name}\t{i.DTypeName}\t{Shape(i.Shape)}\t{i.ByteLength}");
            }
        }

        var dtypes = string.Join(", ", infos.GroupBy(i => i.DTypeName).Select(g => $"{g.Count()} {g.Key}"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{infos.Length} tensors ({dtypes}), {elements:N0} parameters, {ConsoleOutput.Bytes(checkpoint.TotalSize)} in {checkpoint.Shards.Count} file(s)"));
        return 0;
    }

    /// <summary>The terminal's table of <paramref name="infos"/>. Its cells are plain text, not Spectre markup,
    /// in which a shape such as <c>[4, 2]</c> or a name with brackets would read as a style tag.</summary>
    internal static Table TensorTable(IEnumerable<SafetensorsTensorInfo> infos)
    {
        var table = new Table().AddColumns("tensor", "dtype", "shape", "size");
        foreach (var i in infos)
        {
            table.AddRow(new Text(i.Name), new Text(i.DTypeName), new Text(Shape(i.Shape)), new Text(ConsoleOutput.Bytes(i.ByteLength)));
        }

        return table;
    }

    private static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";
}
