using System.Diagnostics;
using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Tests.Engine;
using MergeLab.Tests.IO;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// A downloaded model folder cannot make MergeLab copy the user's own files into a merged model: links
/// out of the folder are refused (except a Hugging Face cache snapshot's links into its blobs), and
/// special files are never opened.
/// </summary>
[FixtureLifeCycle(LifeCycle.InstancePerTestCase)] // a fresh folder per test
[Platform(Exclude = "Win", Reason = "symbolic links and FIFOs need privileges or do not exist there")]
public sealed class ModelFolderTrustTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private string Folder(string relative) => Directory.CreateDirectory(Path.Combine(_dir.Path, relative)).FullName;

    [Test]
    public void A_link_to_a_file_outside_the_model_folder_is_refused_and_nothing_is_copied()
    {
        string secret = _dir.File("credentials.txt");
        File.WriteAllText(secret, "aws_secret_access_key = hunter2");
        string model = Folder("model");
        File.WriteAllText(Path.Combine(model, "config.json"), "{}");
        File.CreateSymbolicLink(Path.Combine(model, "tokenizer.json"), secret);
        string output = Folder("out");

        var ex = Assert.Throws<IOException>(() => NonWeightFiles.Copy(model, output))!;
        Assert.That(ex.Message, Does.Contain("tokenizer.json").And.Contain("outside the model folder"));
        Assert.That(Directory.GetFiles(output), Is.Empty, "not even config.json was copied");
    }

    [Test]
    public void A_merge_whose_base_folder_links_out_fails_before_merging()
    {
        using var baseModel = T.RandomModel(41);
        using var expert = T.Expert(baseModel, 42);
        string basePath = MergeFixtures.Save(_dir, "base", baseModel);
        string expertPath = MergeFixtures.Save(_dir, "expert", expert);
        File.WriteAllText(_dir.File("secret.txt"), "private");
        File.CreateSymbolicLink(Path.Combine(basePath, "special_tokens_map.json"), _dir.File("secret.txt"));

        var reports = new List<CheckpointMergeProgress>();
        Assert.Throws<IOException>(() => CheckpointMerger.Merge(new CheckpointMergeRequest
        {
            BaseModel = basePath,
            Experts = [expertPath],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = _dir.File("out"),
        }, new SynchronousProgress<CheckpointMergeProgress>(reports.Add)));

        Assert.That(reports, Is.Empty, "no tensor was merged");
        Assert.That(Directory.GetDirectories(_dir.Path).Select(Path.GetFileName), Is.EquivalentTo(new[] { "base", "expert" }));
    }

    [Test]
    public void Links_inside_the_folder_and_a_hub_cache_snapshot_are_followed()
    {
        string model = Folder("model");
        File.WriteAllText(Path.Combine(model, "real.txt"), "vocab");
        File.CreateSymbolicLink(Path.Combine(model, "vocab.txt"), "real.txt");

        string repository = Folder("hub/models--org--name");
        string blobs = Folder("hub/models--org--name/blobs");
        string snapshot = Folder("hub/models--org--name/snapshots/0123abc");
        File.WriteAllText(Path.Combine(blobs, "9f86d08"), "{\"model_type\": \"llama\"}");
        File.CreateSymbolicLink(Path.Combine(snapshot, "config.json"), "../../blobs/9f86d08");

        string output = Folder("out");
        Assert.That(NonWeightFiles.Copy(model, output), Is.EqualTo(new[] { "real.txt", "vocab.txt" }));
        Assert.That(NonWeightFiles.Copy(snapshot, output), Is.EqualTo(new[] { "config.json" }));
        Assert.That(File.ReadAllText(Path.Combine(output, "config.json")), Does.Contain("llama"));
        Assert.That(File.ReadAllText(Path.Combine(output, "vocab.txt")), Is.EqualTo("vocab"));
        Assert.That(repository, Does.EndWith("models--org--name"));
    }

    [Test]
    public void A_fifo_among_the_files_is_never_opened()
    {
        string model = Folder("model");
        string fifo = Path.Combine(model, "generation_config.json");
        using (var mkfifo = Process.Start("mkfifo", fifo))
        {
            mkfifo.WaitForExit();
            Assume.That(mkfifo.ExitCode, Is.Zero, "mkfifo is available");
        }

        string output = Folder("out");
        var copy = Task.Run(() => NonWeightFiles.Copy(model, output));
        Assert.That(copy.Wait(TimeSpan.FromSeconds(10)), Is.True, "copying did not block on the FIFO");
        Assert.That(new FileInfo(Path.Combine(output, "generation_config.json")).Length, Is.Zero);
    }
}
