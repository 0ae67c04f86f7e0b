using System.IO.Compression;
using MergeLab.MultiTask;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.MultiTask;

/// <summary>The benchmark's pieces on small synthetic inputs (no dataset needed).</summary>
public class MultiTaskUnitTests
{
    private string _dir = "";

    [SetUp]
    public void CreateDirectory() => _dir = Directory.CreateTempSubdirectory("mergelab-mt-").FullName;

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_dir, recursive: true);

    private static byte[] Idx(int magic, int[] dims, byte[] data)
    {
        var bytes = new List<byte>();
        void Int(int v) => bytes.AddRange([(byte)(v >> 24), (byte)(v >> 16), (byte)(v >> 8), (byte)v]);
        Int(magic);
        foreach (var d in dims)
        {
            Int(d);
        }

        bytes.AddRange(data);
        return bytes.ToArray();
    }

    private void WriteDataset(int train, int test, bool gzip)
    {
        void Write(string name, byte[] content)
        {
            if (gzip)
            {
                using var file = File.Create(Path.Combine(_dir, name + ".gz"));
                using var gz = new GZipStream(file, CompressionLevel.Fastest);
                gz.Write(content);
            }
            else
            {
                File.WriteAllBytes(Path.Combine(_dir, name), content);
            }
        }

        byte[] Images(int n) => Enumerable.Range(0, n * 784).Select(i => (byte)(i % 251)).ToArray();
        byte[] Labels(int n) => Enumerable.Range(0, n).Select(i => (byte)(i % 10)).ToArray();
        Write("train-images-idx3-ubyte", Idx(0x0803, [train, 28, 28], Images(train)));
        Write("train-labels-idx1-ubyte", Idx(0x0801, [train], Labels(train)));
        Write("t10k-images-idx3-ubyte", Idx(0x0803, [test, 28, 28], Images(test)));
        Write("t10k-labels-idx1-ubyte", Idx(0x0801, [test], Labels(test)));
    }

    /// <summary>A training loop may open a dispose scope for each step, around the enumerator's MoveNext as
    /// well: the epoch's shuffled order outlives those scopes, and the batches are the same as without them.</summary>
    [Test]
    public void Train_batches_survive_a_dispose_scope_per_step()
    {
        WriteDataset(train: 40, test: 5, gzip: false);
        using var data = new BenchmarkData(FashionMnist.Load(_dir), BenchmarkTasks.All, trainCount: 32, validationCount: 4, testCount: 5, seed: 0);
        long[] Labels(bool scoped)
        {
            using var noise = new Generator(1);
            using var batches = data.TrainBatches(0, 8, new Random(1), noise).GetEnumerator();
            var labels = new List<long>();
            while (true)
            {
                using var scope = scoped ? NewDisposeScope() : null;
                if (!batches.MoveNext())
                {
                    return labels.ToArray();
                }

                var (x, y) = batches.Current;
                using (x)
                using (y)
                {
                    labels.AddRange(y.data<long>().ToArray());
                }
            }
        }

        var plain = Labels(scoped: false);
        Assert.That(plain, Has.Length.EqualTo(32));
        Assert.That(Labels(scoped: true), Is.EqualTo(plain));
    }

    [TestCase(true)]
    [TestCase(false)]
    public void The_idx_reader_reads_plain_and_gzipped_files(bool gzip)
    {
        WriteDataset(train: 12, test: 5, gzip);
        Assert.That(FashionMnist.IsAvailable(_dir), Is.True);
        var data = FashionMnist.Load(_dir);
        Assert.That((data.TrainCount, data.TestCount), Is.EqualTo((12, 5)));
        Assert.That(data.TrainImagesBytes[785], Is.EqualTo((byte)(785 % 251)));
        Assert.That(data.TestLabelsBytes, Is.EqualTo(new byte[] { 0, 1, 2, 3, 4 }));
    }

    [Test]
    public void A_missing_dataset_says_how_to_install_it()
    {
        Assert.That(FashionMnist.IsAvailable(_dir), Is.False);
        var ex = Assert.Throws<FashionMnistNotFoundException>(() => FashionMnist.Load(_dir));
        Assert.That(ex!.Message, Does.Contain("apt-get install dataset-fashion-mnist").And.Contain(FashionMnist.EnvironmentVariable));
    }

    [Test]
    public void A_file_of_the_wrong_kind_is_rejected()
    {
        WriteDataset(train: 3, test: 2, gzip: false);
        var path = Path.Combine(_dir, "train-labels-idx1-ubyte");
        File.WriteAllBytes(path, Idx(0x0803, [3, 28, 28], new byte[3 * 784]));
        var ex = Assert.Throws<InvalidDataException>(() => FashionMnist.Load(_dir));
        Assert.That(ex!.Message, Is.EqualTo($"'{path}' is not an IDX file of the expected kind (magic 0x00000803, expected 0x00000801)."));
    }

    [Test]
    public void A_corrupt_gzip_file_is_named_with_the_decompressor_s_reason()
    {
        WriteDataset(train: 3, test: 2, gzip: true);
        var path = Path.Combine(_dir, "t10k-images-idx3-ubyte.gz");
        var bytes = File.ReadAllBytes(path);
        bytes[2] = 0x07; // the compression method: 8 (deflate) is the only one defined
        File.WriteAllBytes(path, bytes);
        var ex = Assert.Throws<InvalidDataException>(() => FashionMnist.Load(_dir));
        Assert.That(ex!.Message, Does.StartWith($"'{path}' is not valid: "));
        Assert.That(ex.InnerException, Is.InstanceOf<InvalidDataException>());
    }

    [TestCase(true)]
    [TestCase(false)]
    public void A_cut_short_file_is_named_as_invalid_data(bool gzip)
    {
        WriteDataset(train: 12, test: 5, gzip);
        var name = "train-images-idx3-ubyte" + (gzip ? ".gz" : "");
        var path = Path.Combine(_dir, name);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var ex = Assert.Throws<InvalidDataException>(() => FashionMnist.Load(_dir));
        Assert.That(ex!.Message, Does.Contain(path));
    }

    [Test]
    public void A_label_outside_0_to_9_is_rejected_with_its_file()
    {
        WriteDataset(train: 3, test: 2, gzip: false);
        File.WriteAllBytes(Path.Combine(_dir, "t10k-labels-idx1-ubyte"), Idx(0x0801, [2], [4, 200]));
        var ex = Assert.Throws<InvalidDataException>(() => FashionMnist.Load(_dir));
        Assert.That(ex!.Message, Does.Contain("t10k-labels-idx1-ubyte").And.Contain("label 200 at item 1"));
    }

    [Test]
    public void The_data_fingerprint_follows_the_images_and_labels_not_the_folder()
    {
        WriteDataset(train: 12, test: 5, gzip: false);
        var plain = FashionMnist.Load(_dir).Fingerprint;
        using var copy = new TempDirectory();
        foreach (var file in Directory.GetFiles(_dir))
        {
            File.Copy(file, copy.File(Path.GetFileName(file)));
        }

        Assert.That(FashionMnist.Load(copy.Path).Fingerprint, Is.EqualTo(plain));
        File.WriteAllBytes(copy.File("train-labels-idx1-ubyte"), Idx(0x0801, [12], Enumerable.Range(0, 12).Select(i => (byte)((i + 1) % 10)).ToArray()));
        Assert.That(FashionMnist.Load(copy.Path).Fingerprint, Is.Not.EqualTo(plain), "labels shifted by one");
    }

    [Test]
    public void The_directory_comes_from_the_argument_then_the_environment_then_debian()
    {
        var saved = Environment.GetEnvironmentVariable(FashionMnist.EnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(FashionMnist.EnvironmentVariable, null);
            Assert.That(FashionMnist.ResolveDirectory(), Is.EqualTo("/usr/share/datasets/fashion-mnist"));
            Environment.SetEnvironmentVariable(FashionMnist.EnvironmentVariable, "/data/fm");
            Assert.That(FashionMnist.ResolveDirectory(), Is.EqualTo("/data/fm"));
            Assert.That(FashionMnist.ResolveDirectory("/x"), Is.EqualTo("/x"));
        }
        finally
        {
            Environment.SetEnvironmentVariable(FashionMnist.EnvironmentVariable, saved);
        }
    }

    [Test]
    public void There_are_eight_tasks_with_their_label_spaces()
    {
        var tasks = BenchmarkTasks.All;
        Assert.That(tasks.Select(t => t.Name), Is.EqualTo(new[]
        {
            "plain", "rotated", "inverted", "flipped_noisy", "coarse", "patch_shuffled", "low_res", "thresholded",
        }));
        Assert.That(tasks.Select(t => t.ClassCount), Is.EqualTo(new[] { 10, 10, 10, 10, 4, 10, 10, 10 }));
        using var labels = arange(10, ScalarType.Int64);
        using var coarse = tasks[4].Labels(labels);
        Assert.That(coarse.data<long>().ToArray(), Is.EqualTo(new long[] { 0, 1, 0, 0, 0, 2, 0, 2, 3, 2 }));
        using var plain = tasks[0].Labels(labels);
        Assert.That(plain.data<long>().ToArray(), Is.EqualTo(Enumerable.Range(0, 10).Select(i => (long)i)));
    }

    [Test]
    public void The_transformations_do_what_their_names_say()
    {
        using var scope = NewDisposeScope();
        using var g = new Generator(1);
        var image = rand([1, 28, 28], generator: g);
        var tasks = BenchmarkTasks.All;
        Tensor Raw(int task) => tasks[task].Inputs(image, g).add(1).div(2).reshape(1, 28, 28);

        T.Near(Raw(0), image, 1e-6);
        // Rotated 90° clockwise: the top row becomes the right column, read top to bottom.
        T.Near(Raw(1)[0, .., 27], image[0, 0, ..], 1e-6);
        T.Near(Raw(2), 1 - image, 1e-6);
        var binary = T.Values(Raw(7));
        Assert.That(binary, Is.All.EqualTo(0f).Or.EqualTo(1f));
        // Low resolution: each 4×4 block is constant and equals the block's mean.
        var low = Raw(6);
        T.Near(low[0, 4, 8].reshape(1), image[0, 4..8, 8..12].mean().reshape(1), 1e-6);
        T.Near(low[0, 7, 11].reshape(1), image[0, 4..8, 8..12].mean().reshape(1), 1e-6);
        // Patch shuffling moves whole 4×4 patches: the multiset of pixels is unchanged.
        var shuffled = T.Values(Raw(5)).OrderBy(v => v).ToArray();
        var original = T.Values(image).OrderBy(v => v).ToArray();
        Assert.That(shuffled, Is.EqualTo(original).Within(1e-6));
        // Flipped and noisy stays in [0, 1].
        Assert.That(T.Values(Raw(3)), Is.All.InRange(0f, 1f));
    }

    [Test]
    public void The_patch_index_is_a_permutation_of_whole_patches()
    {
        var index = BenchmarkTasks.PatchShuffleIndex(BenchmarkTasks.PatchPermutationSeed);
        Assert.That(index.OrderBy(i => i), Is.EqualTo(Enumerable.Range(0, 784).Select(i => (long)i)));
        Assert.That(index, Is.Not.EqualTo(Enumerable.Range(0, 784).Select(i => (long)i)));
        // Pixels of one target patch all come from one source patch, in the same relative layout.
        for (int p = 0; p < 49; p++)
        {
            int r0 = p / 7 * 4, c0 = p % 7 * 4;
            long s = index[r0 * 28 + c0];
            for (int i = 0; i < 4; i++)
            {
                for (int j = 0; j < 4; j++)
                {
                    Assert.That(index[(r0 + i) * 28 + c0 + j], Is.EqualTo(s + i * 28 + j));
                }
            }
        }
    }

    [Test]
    public void The_backbone_names_its_blocks_and_normalises_its_features()
    {
        manual_seed(0);
        using var backbone = new MlpBackbone([16, 8]);
        using var sd = backbone.ToStateDict();
        Assert.That(sd.Names, Is.EqualTo(new[] { "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias" }));
        using var x = randn(5, 784);
        using var f = backbone.call(x);
        using var rms = f.pow(2).mean([1]).sqrt();
        T.Near(rms, Enumerable.Repeat(1.0, 5), 1e-5);

        using var other = new MlpBackbone([16, 8]);
        other.Load(sd);
        using var g = other.call(x);
        T.BitEqual(g, f);
    }

    [Test]
    public void The_results_table_has_the_issue_s_csv_header_and_percentages()
    {
        var rows = new[]
        {
            new MethodResult("pretrained", Enumerable.Repeat(50.0, 8).ToArray(), "floor"),
            new MethodResult("task_arithmetic", [60, 61, 62, 63, 64, 65, 66, 67.126], "λ = 0.3"),
        };
        var results = new BenchmarkResults(BenchmarkTasks.All, rows, BenchmarkOptions.Quick, new Dictionary<string, TimeSpan>(),
            new Dictionary<string, string>(), new Dictionary<string, (MergeLab.Adaptive.LayerCoefficients, MergeLab.Adaptive.LayerCoefficients)>());
        var lines = results.ToCsv().TrimEnd('\n').Split('\n');
        Assert.That(lines[0], Is.EqualTo("method,plain,rotated,inverted,flipped_noisy,coarse,patch_shuffled,low_res,thresholded,average"));
        Assert.That(lines[2], Is.EqualTo("task_arithmetic,60.00,61.00,62.00,63.00,64.00,65.00,66.00,67.13,63.52"));
        Assert.That(results["task_arithmetic"].Average, Is.EqualTo(63.51575).Within(1e-9));
        var md = results.ToMarkdown();
        Assert.That(md, Does.Contain("| task_arithmetic | **60.0** |").And.Contain("| pretrained | 50.0 |"));
        var (mdPath, csvPath) = results.Write(Path.Combine(_dir, "out"));
        Assert.That(File.ReadAllText(csvPath), Is.EqualTo(results.ToCsv()));
        Assert.That(File.Exists(mdPath), Is.True);
    }

    [Test]
    public void A_cache_folder_that_cannot_be_created_fails_at_once_not_at_the_first_save()
    {
        string file = Path.Combine(_dir, "a-file");
        File.WriteAllText(file, "");

        var ex = Assert.Throws<IOException>(() => _ = new CheckpointCache(file, BenchmarkOptions.Quick, "data-a"));
        Assert.That(ex!.Message, Does.StartWith($"The cache folder '{file}{Path.DirectorySeparatorChar}quick-").And.Contain("cannot be created"));
        var cache = new CheckpointCache(Path.Combine(_dir, "cache"), BenchmarkOptions.Quick, "data-a");
        Assert.That(Directory.Exists(cache.Directory), Is.True, "created before anything is saved");
        Assert.That(new CheckpointCache(null, BenchmarkOptions.Quick, "data-a").Directory, Is.Null);
    }

    [Test]
    public void A_damaged_cache_file_is_trained_again_not_fatal()
    {
        var messages = new List<string>();
        var cache = new CheckpointCache(_dir, BenchmarkOptions.Quick, "data-a", new SynchronousProgress<string>(messages.Add));
        using (var values = T.Vec(0, 1, 2, 3, 4, 5))
        using (var sd = new StateDict { { "blocks.0.weight", values.reshape(2, 3) } })
        {
            cache.Save("pretrained", sd);
        }

        var path = Path.Combine(cache.Directory!, "pretrained.safetensors");
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length - 5)]);
        Assert.That(cache.TryLoad("pretrained"), Is.Null);
        File.WriteAllBytes(path, []);
        Assert.That(cache.TryLoad("pretrained"), Is.Null);
        Assert.That(messages, Has.Count.EqualTo(2).And.All.Contain("cannot be read").And.All.Contain("training it again"));
    }

    [Test]
    [SetCulture("de-DE")]
    public void Results_are_written_whole_under_any_culture_and_leave_no_temporary_files()
    {
        var rows = new[] { new MethodResult("task_arithmetic", [60, 61, 62, 63, 64, 65, 66, 67.126], "λ = 0.3") };
        var results = new BenchmarkResults(BenchmarkTasks.All, rows, BenchmarkOptions.Quick, new Dictionary<string, TimeSpan> { ["total"] = TimeSpan.FromSeconds(1.5) },
            new Dictionary<string, string>(), new Dictionary<string, (MergeLab.Adaptive.LayerCoefficients, MergeLab.Adaptive.LayerCoefficients)>());
        var output = Path.Combine(_dir, "out");
        results.Write(output);
        File.WriteAllText(Path.Combine(output, "results.csv"), "old");
        var (md, csv) = results.Write(output);
        Assert.That(File.ReadAllText(csv), Does.Contain("67.13,63.52"));
        Assert.That(File.ReadAllText(md), Does.Contain("total 1.5 s").And.Not.Contain("1,5"));
        Assert.That(Directory.GetFiles(output).Select(Path.GetFileName), Is.EquivalentTo(new[] { "results.md", "results.csv" }));
        Assert.Throws<DirectoryNotFoundException>(() => BenchmarkResults.WriteAtomically(Path.Combine(_dir, "missing", "x.md"), "text"));
        Assert.Throws<InvalidOperationException>(() => BenchmarkResults.WriteAtomically(Path.Combine(output, "results.md"), temporary =>
        {
            File.WriteAllText(temporary, "half");
            throw new InvalidOperationException("writer failed");
        }));
        Assert.That(File.ReadAllText(md), Does.Contain("task_arithmetic"), "a failed write leaves the old file");
        Assert.That(Directory.GetFiles(output).Select(Path.GetFileName), Is.EquivalentTo(new[] { "results.md", "results.csv" }));
    }

    [TestCase(-0.5)]
    [TestCase(double.NaN)]
    [TestCase(double.PositiveInfinity)]
    public void A_bad_diversity_weight_is_refused_before_any_training(double weight)
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => _ = BenchmarkOptions.Quick with { AdaMergingDiversityWeight = weight });
        Assert.That(ex!.ParamName, Is.EqualTo(nameof(BenchmarkOptions.AdaMergingDiversityWeight)));
        Assert.That((BenchmarkOptions.Quick with { AdaMergingDiversityWeight = 3 }).AdaMergingDiversityWeight, Is.EqualTo(3));
    }

    [Test]
    public void The_checkpoint_cache_round_trips_and_ignores_other_configurations()
    {
        var options = BenchmarkOptions.Quick with { CacheDirectory = _dir };
        var cache = new CheckpointCache(_dir, options, "data-a");
        Assert.That(cache.TryLoad("pretrained"), Is.Null);
        using (var sd = new StateDict { { "blocks.0.weight", arange(6f).reshape(2, 3) } })
        {
            cache.Save("pretrained", sd);
        }

        using (var loaded = cache.TryLoad("pretrained"))
        {
            Assert.That(loaded, Is.Not.Null);
            T.Near(loaded!["blocks.0.weight"], [0, 1, 2, 3, 4, 5]);
        }

        var other = new CheckpointCache(_dir, options with { Seed = 1 }, "data-a");
        Assert.That(other.Directory, Is.Not.EqualTo(cache.Directory));
        Assert.That(other.TryLoad("pretrained"), Is.Null);
        var otherData = new CheckpointCache(_dir, options, "data-b");
        Assert.That(otherData.Directory, Is.Not.EqualTo(cache.Directory), "other images or labels train other models");
        Assert.That(otherData.TryLoad("pretrained"), Is.Null);
        Assert.That(options.TrainingFingerprint(), Is.EqualTo((options with { AdaMergingSteps = 1, AdaMergingDiversityWeight = 3 }).TrainingFingerprint()),
            "merge-time settings do not invalidate trained checkpoints");
    }
}
