using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;

namespace MergeLab.Tests.Cli;

/// <summary>Runs the mergelab command line in process, with its output captured.</summary>
[NonParallelizable]
public class CliTests
{
    private static (int Exit, string Out, string Err) Run(params string[] args)
    {
        var (stdout, stderr) = (Console.Out, Console.Error);
        using var o = new StringWriter();
        using var e = new StringWriter();
        Console.SetOut(o);
        Console.SetError(e);
        try
        {
            int exit = MergeLab.Cli.Program.Run(args, out _);
            return (exit, o.ToString(), e.ToString());
        }
        finally
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
        }
    }

    /// <summary>Saves <paramref name="model"/> as the checkpoint folder <paramref name="name"/> of
    /// <paramref name="dir"/>, with a small config.json; returns the folder.</summary>
    internal static string Save(TempDirectory dir, string name, StateDict model)
    {
        string path = Directory.CreateDirectory(Path.Combine(dir.Path, name)).FullName;
        SafetensorsWriter.Write(Path.Combine(path, SafetensorsCheckpoint.SingleFileName), model);
        File.WriteAllText(Path.Combine(path, "config.json"), "{\"model_type\": \"toy\"}");
        return path;
    }

    [Test]
    public void Merge_runs_a_yaml_config_and_matches_the_library()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(120);
        using var e1 = T.Expert(baseModel, 121);
        using var e2 = T.Expert(baseModel, 122);
        Save(dir, "base", baseModel);
        Save(dir, "math", e1);
        Save(dir, "code", e2);
        string config = dir.File("ties.yaml");
        File.WriteAllText(config, """
            merge_method: ties
            base_model: base
            models:
              - model: math
                parameters: {weight: 1.0, density: 0.5}
              - model: code
                parameters: {weight: 0.5, density: 0.7}
            dtype: float32
            """);
        string output = dir.File("merged");

        var (exit, stdout, stderr) = Run("merge", config, output, "--shard-size", "400B");

        Assert.That(exit, Is.EqualTo(0), stderr);
        Assert.That(stdout, Does.Contain("Merged 4 tensors"));
        Assert.That(stdout, Does.Contain("merge pass 1: 4/4 tensors"), "redirected output gets plain progress lines");
        Assert.That(File.Exists(Path.Combine(output, SafetensorsCheckpoint.IndexFileName)), Is.True);
        Assert.That(File.Exists(Path.Combine(output, "config.json")), Is.True);

        var expected = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Densities = [.5, .7], Weights = [1, .5] });
        using var reference = expected.Merge(baseModel, [e1, e2]);
        T.CheckpointHolds(output, reference);
    }

    [Test]
    public void A_merge_notes_the_hidden_folder_a_merge_stopped_at_once_left_behind()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(130);
        using var e1 = T.Expert(baseModel, 131);
        Save(dir, "base", baseModel);
        Save(dir, "one", e1);
        string config = dir.File("linear.yaml");
        File.WriteAllText(config, """
            merge_method: linear
            parameters: {weight: 1.0}
            models:
              - model: base
              - model: one
            dtype: float32
            """);
        string output = dir.File("merged");
        var leftover = Directory.CreateDirectory(dir.File($".merged.mergelab-{T.MergeId}")).FullName;
        File.WriteAllBytes(Path.Combine(leftover, "model-00001-of-00001.safetensors"), new byte[3000]);
        Directory.CreateDirectory(dir.File($".other.mergelab-{T.MergeId}")); // another output's: not named
        var movedAside = Directory.CreateDirectory(dir.File($".merged.mergelab-{T.OtherMergeId}.old")).FullName;

        var (exit, _, stderr) = Run("merge", config, output);

        Assert.That(exit, Is.EqualTo(0), stderr);
        Assert.That(stderr, Does.Contain($"note: '{leftover}' (3.00 KB) is the unfinished output of a merge into the same folder"));
        Assert.That(stderr, Does.Not.Contain(".other.mergelab-"));
        Assert.That(stderr, Does.Contain($"note: '{movedAside}' (0 B) is an earlier output of this folder that an --overwrite merge moved aside"));
        Assert.That(Directory.Exists(leftover), Is.True, "noted, not deleted");
        Assert.That(CheckpointMerger.FindLeftovers(output + "/"), Is.EqualTo(new[] { new LeftoverFolder(leftover, false), new LeftoverFolder(movedAside, true) }),
            "a trailing separator names the same folder");
    }

    [Test]
    public void Inspect_lists_tensors_and_totals()
    {
        using var dir = new TempDirectory();
        using var model = T.RandomModel(123);
        string path = Save(dir, "m", model);
        var (exit, stdout, _) = Run("inspect", path);
        Assert.That(exit, Is.EqualTo(0));
        Assert.That(stdout, Does.Contain("layers.0.weight\tF32\t[8, 8]\t256"));
        Assert.That(stdout, Does.Contain("4 tensors (4 F32), 232 parameters"));
    }

    [Test]
    public void Inspect_s_terminal_table_shows_shapes_and_bracketed_names_as_text()
    {
        // In a terminal the table is drawn by Spectre, where "[8, 8]" as markup is a malformed style tag.
        var infos = new[]
        {
            new SafetensorsTensorInfo("layers.0.weight", TorchSharp.torch.ScalarType.Float32, [8, 8], 0, 256),
            new SafetensorsTensorInfo("experts[0].bias", TorchSharp.torch.ScalarType.BFloat16, [3], 256, 6),
        };
        using var text = new StringWriter();
        var console = Spectre.Console.AnsiConsole.Create(new Spectre.Console.AnsiConsoleSettings
        {
            Out = new Spectre.Console.AnsiConsoleOutput(text),
            Ansi = Spectre.Console.AnsiSupport.No,
            ColorSystem = Spectre.Console.ColorSystemSupport.NoColors,
        });
        console.Write(MergeLab.Cli.Commands.InspectCommand.TensorTable(infos));
        var rows = text.ToString().Split('\n').Select(l => string.Join(' ', l.Split(['│', '|', ' '], StringSplitOptions.RemoveEmptyEntries))).ToArray();
        Assert.That(rows, Does.Contain("layers.0.weight F32 [8, 8] 256 B"));
        Assert.That(rows, Does.Contain("experts[0].bias BF16 [3] 6 B"));
    }

    [Test]
    public void An_empty_path_argument_is_named()
    {
        foreach (var (args, name) in new[] { (new[] { "merge", "", "out" }, "CONFIG"), (["merge", "c.yaml", ""], "OUT_DIR"), (["inspect", ""], "PATH") })
        {
            var (exit, _, stderr) = Run(args);
            Assert.That(exit, Is.EqualTo(1), name);
            Assert.That(stderr, Is.EqualTo($"mergelab: {name} is empty; give a path. See '--help'.{Environment.NewLine}"), name);
        }
    }

    [Test]
    public void A_bad_config_fails_with_one_line_naming_the_key()
    {
        using var dir = new TempDirectory();
        using var model = T.RandomModel(124);
        Save(dir, "base", model);
        string config = dir.File("bad.yaml");
        File.WriteAllText(config, "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n    parameters: {densty: 0.5}\n");
        var (exit, stdout, stderr) = Run("merge", config, dir.File("out"));
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(stderr.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(stderr, Does.StartWith("mergelab: ").And.Contain("densty"));
        Assert.That(Directory.Exists(dir.File("out")), Is.False);
    }

    [Test]
    public void A_merge_whose_source_has_no_config_json_says_so()
    {
        using var dir = new TempDirectory();
        using var a = T.RandomModel(125);
        using var b = T.Expert(a, 126);
        SafetensorsWriter.Write(Path.Combine(Directory.CreateDirectory(dir.File("a")).FullName, SafetensorsCheckpoint.SingleFileName), a);
        Save(dir, "b", b); // only the second model has a config.json
        string config = dir.File("linear.yaml");
        File.WriteAllText(config, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n");
        var (exit, stdout, stderr) = Run("merge", config, dir.File("out"));
        Assert.That(exit, Is.EqualTo(0), stderr);
        Assert.That(stdout, Does.Contain("Merged 4 tensors"));
        Assert.That(stderr, Does.Contain("note: the output has no config.json"));

        File.WriteAllText(dir.File("swapped.yaml"), "merge_method: linear\nmodels:\n  - model: b\n    parameters: {weight: 1}\n  - model: a\n    parameters: {weight: 1}\n");
        (exit, _, stderr) = Run("merge", dir.File("swapped.yaml"), dir.File("out3"));
        Assert.That(exit, Is.EqualTo(0), stderr);
        Assert.That(stderr, Is.Empty, "a config.json was copied");
    }

    [Test]
    public void Inspecting_a_malformed_file_fails_cleanly()
    {
        using var dir = new TempDirectory();
        string path = dir.File("broken.safetensors");
        File.WriteAllBytes(path, [1, 2, 3]);
        var (exit, _, stderr) = Run("inspect", path);
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(stderr, Does.StartWith("mergelab: ").And.Contain("broken.safetensors"));
    }

    [Test]
    public void Non_finite_inputs_fail_by_default_and_pass_with_the_flag()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(125);
        using var expert = T.Expert(baseModel, 126);
        using (var flat = expert["layers.0.bias"].view(-1))
        {
            flat[3] = TorchSharp.torch.tensor(float.NaN);
        }

        Save(dir, "base", baseModel);
        Save(dir, "math", expert);
        string config = dir.File("ta.yaml");
        File.WriteAllText(config, "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: math\n    parameters: {weight: 1}\n");

        var (exit, _, stderr) = Run("merge", config, dir.File("out"));
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(stderr.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(stderr, Does.Contain("layers.0.bias").And.Contain("1 NaN").And.Contain(Path.Combine(dir.Path, "math")).And.Contain("--nonfinite pass"));
        Assert.That(Directory.Exists(dir.File("out")), Is.False);

        (exit, _, stderr) = Run("merge", config, dir.File("out"), "--nonfinite", "pass");
        Assert.That(exit, Is.EqualTo(0), stderr);
        using var merged = SafetensorsCheckpoint.Open(dir.File("out"));
        using var bias = merged.ReadTensor("layers.0.bias");
        Assert.That(float.IsNaN(T.Values(bias)[3]), Is.True);

        (exit, _, stderr) = Run("merge", config, dir.File("out2"), "--nonfinite", "maybe");
        Assert.That(exit, Is.Not.EqualTo(0));
        Assert.That(stderr, Does.Contain("maybe"));
    }

    [Test]
    public void Inputs_are_mapped_by_default_and_copied_with_read_copy()
    {
        using var dir = new TempDirectory();
        // Beside the small tensors, one large enough to be mapped: the base's and the expert's copy of it
        // come to 2 × 128 KiB, the default floor below which a group is copied (mapping costs more).
        using var baseModel = T.RandomModel(127);
        using var expert = T.Expert(baseModel, 128);
        baseModel.Add("large.weight", TorchSharp.torch.randn(256, 128));
        expert.Add("large.weight", baseModel["large.weight"] + 0.01f);
        Save(dir, "base", baseModel);
        Save(dir, "math", expert);
        string config = dir.File("ta.yaml");
        File.WriteAllText(config, "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: math\n    parameters: {weight: 0.5}\n");

        long before = MergeLab.IO.MappedTensors.MappedCount;
        var (exit, _, stderr) = Run("merge", config, dir.File("mapped"));
        Assert.That(exit, Is.EqualTo(0), stderr);
        long mapped = MergeLab.IO.MappedTensors.MappedCount - before;
        (exit, _, stderr) = Run("merge", config, dir.File("copied"), "--read", "copy");
        Assert.That(exit, Is.EqualTo(0), stderr);

        Assert.That(mapped, Is.EqualTo(2), "the base's and the expert's large tensor; the small ones are copied");
        Assert.That(MergeLab.IO.MappedTensors.MappedCount - before, Is.EqualTo(mapped), "--read copy maps nothing");
        string file = SafetensorsCheckpoint.SingleFileName;
        Assert.That(File.ReadAllBytes(Path.Combine(dir.File("copied"), file)), Is.EqualTo(File.ReadAllBytes(Path.Combine(dir.File("mapped"), file))));

        (exit, _, stderr) = Run("merge", config, dir.File("out"), "--read", "maybe");
        Assert.That(exit, Is.Not.EqualTo(0));
        Assert.That(stderr, Does.Contain("maybe"));
    }

    [TestCase("lots", "'lots' is not a size")]
    [TestCase("1e30GB", "'1e30GB' is out of range")] // overflowed a checked conversion: exit 2, "internal error"
    [TestCase("InfinityGB", "'InfinityGB' is out of range")]
    [TestCase("0.5B", "'0.5B' is out of range")] // rounded down to a shard size of 0 bytes
    public void A_bad_shard_size_is_refused(string size, string message)
    {
        var (exit, _, stderr) = Run("merge", "x.yaml", "out", "--shard-size", size);
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain(message));
    }

    [Test]
    public void An_argument_error_is_one_line_on_standard_error()
    {
        var (exit, output, error) = Run("merge", "config.yaml", "out", "--seed", "abc");
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(output, Is.Empty, "no help text");
        Assert.That(error.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(error, Does.StartWith("mergelab: ").And.Contain("--seed"));

        (exit, _, error) = Run("merge", "config.yaml", "out", "--device", "gpu");
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(error, Does.Contain("--device gpu").And.Contain("cpu, cuda or cuda:N"));

        // An index that is not a number: TorchSharp's parser throws FormatException, not ArgumentException.
        (exit, _, error) = Run("merge", "config.yaml", "out", "--device", "cuda:x");
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(error.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(error, Does.Contain("--device cuda:x").And.Contain("cpu, cuda or cuda:N"));

        // A mistyped command is named (System.CommandLine reports the missing command first).
        (exit, _, error) = Run("marge", "config.yaml", "out");
        Assert.That(exit, Is.EqualTo(1));
        Assert.That(error, Does.Contain("'marge'").And.Not.Contain("Required command"));
    }

    [Test]
    public void Help_names_the_tool_as_it_is_installed()
    {
        var (exit, output, _) = Run("merge", "--help");
        Assert.That(exit, Is.EqualTo(0));
        Assert.That(output, Does.Contain("mergelab merge <CONFIG> <OUT_DIR> [options]").And.Not.Contain("MergeLab.Cli"));
        (exit, output, _) = Run("--version");
        Assert.That(exit, Is.EqualTo(0));
        Assert.That(output, Is.Not.Empty);
    }

    [Test]
    public void Compiling_ahead_stops_once_libtorch_is_loaded_and_otherwise_compiles_the_engine_without_failing()
    {
        Assert.That(MergeLab.Cli.Commands.MergeCommand.CompileAhead(Task.CompletedTask), Is.Zero, "loaded already: nothing to wait for");

        // A load that never ends: the whole sweep, every method of the engine's namespaces compiled (a method
        // skipped for a failure, or a sweep ended early, would show in the count; both are quiet).
        var never = new TaskCompletionSource().Task;
        int compiled = MergeLab.Cli.Commands.MergeCommand.CompileAhead(never);
        int expected = MergeLab.Cli.Commands.MergeCommand.MethodsToCompileAhead().Count();
        Assert.That(compiled, Is.EqualTo(expected).And.GreaterThan(800));
    }

    [Test]
    public void Between_reports_the_time_left_counts_down_from_the_last_one()
    {
        var now = TimeSpan.Zero;
        var clock = new MergeLab.Cli.Commands.MergeCommand.PassClock(() => now);
        static MergeLab.Engine.CheckpointMergeProgress Merged(long done) => new("merge", 1, 1, 4, done, 10_000_000_000, "t");

        // The pass began with the merge; half its bytes in 10 s: 0.5 GB/s, 10 s left.
        now = TimeSpan.FromSeconds(10);
        Assert.That(clock.Observe(Merged(5_000_000_000)), Is.True);
        Assert.That(clock.Describe(5_000_000_000, 10_000_000_000), Is.EqualTo("0.50 GB/s, ETA 00:00:10"));

        // One large tensor under way: no report, the time left goes down, the rate stays.
        now = TimeSpan.FromSeconds(13);
        Assert.That(clock.Tick(), Is.EqualTo("0.50 GB/s, ETA 00:00:07"));
        now = TimeSpan.FromSeconds(25);
        Assert.That(clock.Tick(), Is.EqualTo("0.50 GB/s, ETA 00:00:00"), "not below 0 when the tensor takes longer than foreseen");

        // The next report starts from its own figures: 6 GB in 25 s, 4 GB left at 0.24 GB/s.
        Assert.That(clock.Observe(Merged(6_000_000_000)), Is.False);
        Assert.That(clock.Describe(6_000_000_000, 10_000_000_000), Is.EqualTo("0.24 GB/s, ETA 00:00:17"));
    }
}
