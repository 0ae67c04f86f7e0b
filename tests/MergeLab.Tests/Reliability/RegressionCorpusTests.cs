using MergeLab.Config;
using MergeLab.IO;
using MergeLab.Tests.Config;
using MergeLab.Tests.IO;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Replays every input that once failed a fuzz target (or was found by hand), kept under
/// <c>Reliability/Regressions/</c>: <c>safetensors/*.safetensors</c> single files,
/// <c>checkpoints/NAME/</c> checkpoint folders and <c>config/*.yaml</c> configs. Each must meet its
/// target's contract again: load correctly or raise the format error, within the allocation bound
/// and the time limit. See <c>Regressions/README.md</c>.
/// </summary>
public class RegressionCorpusTests
{
    private static string Corpus => Path.Combine(Path.GetDirectoryName(typeof(RegressionCorpusTests).Assembly.Location)!, "Reliability", "Regressions");

    private static IEnumerable<TestCaseData> Files(string folder, string pattern) =>
        Directory.Exists(Path.Combine(Corpus, folder))
            ? Directory.EnumerateFiles(Path.Combine(Corpus, folder), pattern).Order(StringComparer.Ordinal)
                .Select(f => new TestCaseData(Path.GetFileName(f)).SetName($"{folder}/{Path.GetFileName(f)}"))
            : [];

    private static IEnumerable<TestCaseData> SafetensorsFiles() => Files("safetensors", "*.safetensors");

    private static IEnumerable<TestCaseData> Configs() => Files("config", "*.yaml");

    private static IEnumerable<TestCaseData> Checkpoints() =>
        Directory.Exists(Path.Combine(Corpus, "checkpoints"))
            ? Directory.EnumerateDirectories(Path.Combine(Corpus, "checkpoints")).Order(StringComparer.Ordinal)
                .Select(d => new TestCaseData(Path.GetFileName(d)).SetName($"checkpoints/{Path.GetFileName(d)}"))
            : [];

    [Test]
    public void The_corpus_is_copied_to_the_test_output()
    {
        Assert.That(SafetensorsFiles().Count(), Is.GreaterThan(0), Corpus);
        Assert.That(Configs().Count(), Is.GreaterThan(0), Corpus);
        Assert.That(Checkpoints().Count(), Is.GreaterThan(0), Corpus);
    }

    [TestCaseSource(nameof(SafetensorsFiles))]
    public void Safetensors_file(string name)
    {
        using var dir = new TempDirectory();
        var bytes = File.ReadAllBytes(Path.Combine(Corpus, "safetensors", name));
        var input = FuzzCase.Single(name, bytes, name);
        Replay(input,
            (c, meter) => SafetensorsFuzzTests.CheckFile(dir.File("input.safetensors"), bytes, SafetensorsReadOptions.Default, meter),
            e => e is SafetensorsFormatException,
            SafetensorsFuzzTests.AllocationPerByte, SafetensorsFuzzTests.AllocationConstant);
    }

    [TestCaseSource(nameof(Checkpoints))]
    public void Checkpoint_folder(string name)
    {
        using var dir = new TempDirectory();
        string folder = Path.Combine(Corpus, "checkpoints", name);
        var files = Directory.EnumerateFiles(folder).Where(f => !f.EndsWith("FAILURE.txt", StringComparison.Ordinal))
            .ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes, StringComparer.Ordinal);
        // An index may point at the valid shard the fuzzer keeps beside the checkpoint.
        string outside = Directory.CreateDirectory(dir.File("outside")).FullName;
        _ = new CheckpointMutator(outside);
        string checkpoint = Directory.CreateDirectory(dir.File("checkpoint")).FullName;
        Replay(new FuzzCase(files, name),
            (c, meter) => SafetensorsFuzzTests.CheckCheckpoint(checkpoint, c, meter),
            e => e is SafetensorsFormatException,
            SafetensorsFuzzTests.AllocationPerByte, SafetensorsFuzzTests.AllocationConstant);
    }

    [TestCaseSource(nameof(Configs))]
    public void Config(string name)
    {
        using var folder = new ConfigFolder("base", "math", "code");
        var bytes = File.ReadAllBytes(Path.Combine(Corpus, "config", name));
        Replay(FuzzCase.Single(name, bytes, name),
            (c, meter) => ConfigFuzzTests.Check(folder.Root, c, meter),
            e => e is MergeConfigException,
            ConfigFuzzTests.AllocationPerByte, ConfigFuzzTests.AllocationConstant);
    }

    private static void Replay(FuzzCase input, Action<FuzzCase, AllocationMeter> check, Func<Exception, bool> isFormatError, int perByte, long constant)
    {
        string? failure = null;
        var thread = new Thread(() => failure = FuzzHarness.RunOne(input, check, isFormatError, c => perByte * c.TotalBytes + constant, null),
            maxStackSize: 16 << 20) { IsBackground = true };
        thread.Start();
        Assert.That(thread.Join(FuzzHarness.InputTimeout), Is.True, "hang");
        Assert.That(failure, Is.Null);
    }
}
