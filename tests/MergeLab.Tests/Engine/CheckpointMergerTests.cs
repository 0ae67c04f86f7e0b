using MergeLab.Engine;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Engine;

public class CheckpointMergerTests
{
    /// <summary>Writes <paramref name="model"/> as a checkpoint directory, sharded when <paramref name="maxShardBytes"/> is small.</summary>
    private static string Save(TempDirectory dir, string name, StateDict model, long maxShardBytes = long.MaxValue)
    {
        string path = Path.Combine(dir.Path, name);
        Directory.CreateDirectory(path);
        using (var writer = new ShardedCheckpointWriter(path, maxShardBytes))
        {
            foreach (var (n, t) in model)
            {
                writer.Add(n, t.clone()); // the writer takes ownership
            }

            writer.Complete();
        }

        File.WriteAllText(Path.Combine(path, "config.json"), $"{{\"name\": \"{name}\"}}");
        return path;
    }

    private static IEnumerable<MergeMethod> Methods() =>
    [
        new TiesMerge(), // whole-model threshold and majority sign: three statistic passes
        new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .4, Weights = [1, .5, 2] }),
        new DareMerge(new DareOptions { DropRate = .6, Seed = 5, Combination = Combination.Ties }),
        new PcbMerge(new PcbOptions { Ratio = .3 }),
        new BreadcrumbsMerge(),
        new WeightAverageMerge(),
    ];

    [TestCaseSource(nameof(Methods))]
    public void Streaming_merge_is_bit_identical_to_the_in_memory_merge(MergeMethod method)
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(90, ScalarType.BFloat16);
        using var e1 = T.Expert(baseModel, 91);
        using var e2 = T.Expert(baseModel, 92);
        using var e3 = T.Expert(baseModel, 93);
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel, maxShardBytes: 300),
            Experts = [Save(dir, "e1", e1), Save(dir, "e2", e2, 200), Save(dir, "e3", e3)],
            Method = method,
            OutputDirectory = Path.Combine(dir.Path, "out"),
            MaxShardBytes = 250,
        };
        var result = CheckpointMerger.Merge(request);

        using var expected = method.Merge(baseModel, [e1, e2, e3]);
        T.CheckpointHolds(result.OutputDirectory, expected, sameNames: true);

        Assert.That(result.Files, Does.Contain("config.json").And.Contain(SafetensorsCheckpoint.IndexFileName));
        Assert.That(File.ReadAllText(Path.Combine(result.OutputDirectory, "config.json")), Does.Contain("base"));
    }

    [Test]
    public void A_base_given_to_weight_averaging_gives_the_output_its_dtypes_and_copied_tensors()
    {
        // Weight averaging merges without the base, but the output still follows it, as the library's merge does.
        using var dir = new TempDirectory();
        using var baseModel = new StateDict { { "w", tensor(new float[] { 1, 2, 3, 4 }, ScalarType.BFloat16) }, { "ids", tensor(new long[] { 0, 1, 2 }) } };
        using var e1 = new StateDict { { "w", tensor(new float[] { 3, 4, 5, 6 }) }, { "ids", tensor(new long[] { 7, 7, 7 }) } };
        using var e2 = new StateDict { { "w", tensor(new float[] { 5, 6, 7, 9 }) }, { "ids", tensor(new long[] { 8, 8, 8 }) } };
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1), Save(dir, "e2", e2)],
            Method = new WeightAverageMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        var result = CheckpointMerger.Merge(request);
        using var expected = new StateDict { { "w", tensor(new float[] { 4, 5, 6, 7.5f }, ScalarType.BFloat16) }, { "ids", tensor(new long[] { 0, 1, 2 }) } };
        T.CheckpointHolds(result.OutputDirectory, expected, sameNames: true);
        using var library = request.Method.Merge(baseModel, [e1, e2]);
        T.CheckpointHolds(result.OutputDirectory, library);
    }

    [Test]
    public void A_tensor_that_is_floating_point_in_one_model_and_not_in_another_is_refused_before_anything_is_written()
    {
        using var dir = new TempDirectory();
        using var baseModel = new StateDict { { "w", zeros(4) }, { "ids", tensor(new long[] { 0, 1, 2 }) } };
        using var floatIds = new StateDict { { "w", ones(4) }, { "ids", tensor(new float[] { 0, 1, 2 }) } };
        using var intIds = new StateDict { { "w", ones(4) }, { "ids", tensor(new int[] { 0, 1, 2 }) } };
        using var floatW = new StateDict { { "w", ones(4, dtype: ScalarType.Int64) }, { "ids", tensor(new long[] { 0, 1, 2 }) } };
        string basePath = Save(dir, "base", baseModel);
        string output = Path.Combine(dir.Path, "out");
        foreach (var (name, expert, message) in new[] { ("float-ids", floatIds, "has it as F32 but"), ("int-w", floatW, "has it as I64 but") })
        {
            var request = new CheckpointMergeRequest { BaseModel = basePath, Experts = [Save(dir, name, expert)], Method = new TaskArithmeticMerge(), OutputDirectory = output };
            var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request), name);
            Assert.That(ex!.Message, Does.Contain(message).And.Contain(name), name);
            Assert.That(Directory.Exists(output), Is.False, name);
        }

        // Integer buffers of two widths are both copied tensors: the base's is taken.
        var copied = new CheckpointMergeRequest { BaseModel = basePath, Experts = [Save(dir, "int32-ids", intIds)], Method = new TaskArithmeticMerge(), OutputDirectory = output };
        CheckpointMerger.Merge(copied);
        using var expected = new StateDict { { "w", ones(4) }, { "ids", tensor(new long[] { 0, 1, 2 }) } };
        T.CheckpointHolds(output, expected, sameNames: true);

        // The library's merges refuse the same tensors: whole state dicts before merging anything, groups one by one.
        var whole = Assert.Throws<MergeException>(() => new TiesMerge().Merge(baseModel, [floatIds]).Dispose());
        Assert.That(whole!.Message, Does.Contain("'ids'").And.Contain("expert 0 has it as Float32 but the base model as Int64"));
        using var tensorIds = tensor(new float[] { 0, 1, 2 });
        var group = new TensorGroup("ids", baseModel["ids"], [tensorIds]);
        var refused = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().MergeTensor(group).Dispose());
        Assert.That(refused!.Message, Does.Contain("expert 0 is Float32 but the base is Int64"));
        var floats = new TensorGroup("w", baseModel["w"], [floatW["w"]]);
        refused = Assert.Throws<MergeException>(() => new TaskArithmeticMerge().MergeTensor(floats).Dispose());
        Assert.That(refused!.Message, Does.Contain("expert 0 is Int64 but the base is Float32"));
    }

    [Test]
    public void Merged_tensors_are_placed_as_in_their_file_and_written_from_their_own_memory()
    {
        // Tensors of several 4 KiB blocks at offsets that are not multiples of 4 KiB (the header's length
        // and the tensors before each decide them): each merged tensor is placed at its offset's remainder,
        // so all its whole blocks go to the file without the staging copy, with the same bytes.
        using var dir = new TempDirectory();
        using var baseModel = T.DrawnModel(97, ("a.weight", [3, 1000], ScalarType.BFloat16), ("b.weight", [40, 130], ScalarType.BFloat16), ("c.weight", [7, 1003], ScalarType.Float32));
        using var e1 = T.Expert(baseModel, 98);
        using var e2 = T.Expert(baseModel, 99);
        var method = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .3 });
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1), Save(dir, "e2", e2)],
            Method = method,
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        long before = AlignedFileWriter.InPlaceBytes;
        var result = CheckpointMerger.Merge(request);
        long inPlace = AlignedFileWriter.InPlaceBytes - before;

        // Every whole 4 KiB block of the file inside each tensor's bytes; the partial ones at its two ends are staged.
        using (var file = SafetensorsFile.Open(Path.Combine(result.OutputDirectory, SafetensorsCheckpoint.SingleFileName)))
        {
            const long B = AlignedFileWriter.BlockSize;
            long wholeBlocks = file.Tensors.Sum(t => Math.Max(0, ((t.DataOffset + t.ByteLength) / B) - ((t.DataOffset + B - 1) / B)));
            Assert.That(file.Tensors.Count(t => t.DataOffset % B != 0), Is.EqualTo(3), "no tensor starts on a block");
            Assert.That(inPlace, Is.EqualTo(wholeBlocks * B), "all of each tensor's whole blocks from its memory");
        }

        using var expected = method.Merge(baseModel, [e1, e2]);
        T.CheckpointHolds(result.OutputDirectory, expected);
    }

    /// <summary>A task-arithmetic request over a random base (<paramref name="seed"/>) and one expert (seed + 1),
    /// saved as <c>base</c> and <c>e1</c> under <paramref name="folder"/> of <paramref name="dir"/>, into
    /// <c>out</c> there.</summary>
    private static CheckpointMergeRequest OneExpertRequest(TempDirectory dir, long seed, string folder = "")
    {
        using var baseModel = T.RandomModel(seed);
        using var e1 = T.Expert(baseModel, seed + 1);
        return new CheckpointMergeRequest
        {
            BaseModel = Save(dir, Path.Combine(folder, "base"), baseModel),
            Experts = [Save(dir, Path.Combine(folder, "e1"), e1)],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
    }

    [Test]
    public void Mapped_and_copied_inputs_give_the_same_bytes()
    {
        // TIES reads every input four times (three statistic passes, then the merge); bfloat16 and float32
        // inputs, some sharded, all mapped by default and all copied when MapInputs is off.
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(94, ScalarType.BFloat16);
        using var e1 = T.Expert(baseModel, 95);
        using var e2f = T.Expert(baseModel, 96);
        using var e2 = e2f.To(ScalarType.Float32);
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel, maxShardBytes: 300),
            Experts = [Save(dir, "e1", e1, 200), Save(dir, "e2", e2)],
            Method = new TiesMerge(),
            OutputDirectory = Path.Combine(dir.Path, "mapped"),
        };

        // By default these small tensors are copied: mapping one costs more than copying it.
        long before = MappedTensors.MappedCount;
        var small = CheckpointMerger.Merge(request with { OutputDirectory = Path.Combine(dir.Path, "small") });
        Assert.That(MappedTensors.MappedCount, Is.EqualTo(before), "groups under CheckpointSet.SmallGroupBytes are copied");

        before = MappedTensors.MappedCount;
        var mapped = CheckpointMerger.Merge(request with { SmallGroupBytes = 0 });
        long count = MappedTensors.MappedCount - before;

        var copied = CheckpointMerger.Merge(request with { OutputDirectory = Path.Combine(dir.Path, "copied"), MapInputs = false, SmallGroupBytes = 0 });
        Assert.That(small.Files, Is.EqualTo(mapped.Files));
        foreach (var f in small.Files)
        {
            Assert.That(File.ReadAllBytes(Path.Combine(small.OutputDirectory, f)), Is.EqualTo(File.ReadAllBytes(Path.Combine(mapped.OutputDirectory, f))), f);
        }

        Assert.That(count, Is.EqualTo(4 * 3 * baseModel.Count), "every input tensor mapped on each of the four passes");
        Assert.That(MappedTensors.MappedCount - before, Is.EqualTo(count), "nothing mapped with MapInputs off");
        Assert.That(copied.Files, Is.EqualTo(mapped.Files));
        foreach (var f in mapped.Files)
        {
            Assert.That(File.ReadAllBytes(Path.Combine(copied.OutputDirectory, f)), Is.EqualTo(File.ReadAllBytes(Path.Combine(mapped.OutputDirectory, f))), f);
        }

        using var expected = request.Method.Merge(baseModel, [e1, e2]);
        T.CheckpointHolds(mapped.OutputDirectory, expected);
    }

    [Test]
    public void Progress_covers_every_tensor_and_byte_of_each_pass()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(95);
        using var e1 = T.Expert(baseModel, 96);
        var reports = new List<CheckpointMergeProgress>();
        var result = CheckpointMerger.Merge(new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "e1", e1)],
            Method = new TiesMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        }, new SynchronousProgress<CheckpointMergeProgress>(reports.Add));

        Assert.That(result.StatisticPasses, Is.EqualTo(3));
        var merge = reports.Where(r => r.Stage == "merge").ToArray();
        Assert.That(merge, Has.Length.EqualTo(baseModel.Count));
        Assert.That(merge[^1].BytesDone, Is.EqualTo(merge[^1].BytesTotal));
        Assert.That(merge[^1].BytesTotal, Is.EqualTo(2 * baseModel.ElementCount * 4));
        Assert.That(reports.Count(r => r.Stage == "statistics"), Is.EqualTo(3 * baseModel.Count));
    }

    [Test]
    public void Cancelled_merge_leaves_no_output_and_no_temporary_directory()
    {
        using var dir = new TempDirectory();
        using var cts = new CancellationTokenSource();
        var request = OneExpertRequest(dir, 97);
        var progress = new SynchronousProgress<CheckpointMergeProgress>(p =>
        {
            if (p.TensorsDone == 2)
            {
                cts.Cancel();
            }
        });
        Assert.Throws<OperationCanceledException>(() => CheckpointMerger.Merge(request, progress, cts.Token));
        Assert.That(Directory.GetDirectories(dir.Path).Select(Path.GetFileName), Is.EquivalentTo(new[] { "base", "e1" }));
    }

    [Test]
    public void A_failing_method_names_the_tensor_and_leaves_nothing()
    {
        using var dir = new TempDirectory();
        var request = OneExpertRequest(dir, 99) with
        {
            MethodForTensor = name => name == "layers.0.bias" ? new FailingMethod() : new TaskArithmeticMerge(),
        };
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("layers.0.bias").And.Contain("boom"));
        Assert.That(Directory.GetDirectories(dir.Path), Has.Length.EqualTo(2));
    }

    [Test]
    public void Mismatched_architectures_are_refused_before_any_work()
    {
        using var dir = new TempDirectory();
        using var baseModel = T.RandomModel(101);
        using var other = new StateDict { { "embed.weight", zeros(16, 8) } };
        var request = new CheckpointMergeRequest
        {
            BaseModel = Save(dir, "base", baseModel),
            Experts = [Save(dir, "other", other)],
            Method = new TaskArithmeticMerge(),
            OutputDirectory = Path.Combine(dir.Path, "out"),
        };
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("has no tensor of this name").And.Contain("other"));
        Assert.That(Directory.Exists(request.OutputDirectory), Is.False);
    }

    [Test]
    public void An_existing_output_is_refused_unless_overwriting()
    {
        using var dir = new TempDirectory();
        var request = OneExpertRequest(dir, 102);
        string output = request.OutputDirectory;
        Directory.CreateDirectory(output); // an earlier merge's output
        File.Copy(Path.Combine(request.Experts[0], SafetensorsCheckpoint.SingleFileName), Path.Combine(output, SafetensorsCheckpoint.SingleFileName));
        File.WriteAllText(Path.Combine(output, "keep.txt"), "mine");
        request = request with { OutputDirectory = output + Path.DirectorySeparatorChar }; // a trailing separator names the same folder
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("already exists").And.Contain("--overwrite"));
        Assert.That(File.Exists(Path.Combine(output, "keep.txt")), Is.True);

        // A mistyped source of the other files is named as such before overwriting looks into it for links
        // into the output (it looked into the parent, or failed there when that was missing too).
        var mistyped = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { Overwrite = true, CopyFilesFrom = Path.Combine(dir.Path, "no-such", "model") }));
        Assert.That(mistyped!.Message, Does.Contain("CopyFilesFrom '").And.Contain("does not exist"));
        Assert.That(File.Exists(Path.Combine(output, "keep.txt")), Is.True);

        CheckpointMerger.Merge(request with { Overwrite = true });
        Assert.That(File.Exists(Path.Combine(output, "keep.txt")), Is.False);
        Assert.That(File.Exists(Path.Combine(output, SafetensorsCheckpoint.SingleFileName)), Is.True);
    }

    [Test]
    public void A_failed_rename_into_place_puts_the_old_output_back()
    {
        using var dir = new TempDirectory();
        string output = Path.Combine(dir.Path, "out");
        Directory.CreateDirectory(output);
        File.WriteAllText(Path.Combine(output, "model.safetensors"), "earlier merge");
        string missing = Path.Combine(dir.Path, ".out.mergelab-test"); // the finished merge, gone before its rename

        Assert.Throws<DirectoryNotFoundException>(() => CheckpointMerger.MoveIntoPlace(missing, output, overwrite: true));
        Assert.That(File.ReadAllText(Path.Combine(output, "model.safetensors")), Is.EqualTo("earlier merge"));
        Assert.That(Directory.GetFileSystemEntries(dir.Path), Is.EqualTo(new[] { output }), "nothing left under a temporary name");
    }

    [Test]
    public void Overwriting_refuses_a_folder_that_holds_an_input_or_is_no_checkpoint_and_deletes_nothing()
    {
        using var dir = new TempDirectory();
        var request = OneExpertRequest(dir, 104, "models") with { OutputDirectory = Path.Combine(dir.Path, "models"), Overwrite = true };

        // The folder of the inputs, directly and through a link to it.
        var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request));
        Assert.That(ex!.Message, Does.Contain("holds the input").And.Contain("never writes over its inputs"));
        string link = Path.Combine(dir.Path, "link");
        Directory.CreateSymbolicLink(link, Path.Combine(dir.Path, "models"));
        Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = link }));

        // An earlier output whose weights file an input links to (an expert assembled from its shards).
        string earlier = Path.Combine(dir.Path, "earlier");
        Directory.CreateDirectory(earlier);
        string weights = Path.Combine(request.Experts[0], SafetensorsCheckpoint.SingleFileName);
        File.Move(weights, Path.Combine(earlier, SafetensorsCheckpoint.SingleFileName));
        File.CreateSymbolicLink(weights, Path.Combine(earlier, SafetensorsCheckpoint.SingleFileName));
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = earlier }));
        Assert.That(ex!.Message, Does.Contain($"has '{SafetensorsCheckpoint.SingleFileName}' linked into the output"));
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = earlier, Experts = [weights] }));
        Assert.That(ex!.Message, Does.Contain("never writes over its inputs"), "an input given as its weights file");
        // A mistyped input beside that link: missing, which is the error, not its folder's link.
        string missing = Path.Combine(request.Experts[0], "no-such-expert");
        var notFound = Assert.Catch<IOException>(() => CheckpointMerger.Merge(request with { OutputDirectory = earlier, Experts = [missing] }));
        Assert.That(notFound!.Message, Does.Contain("no-such-expert"));
        Assert.That(File.Exists(Path.Combine(earlier, SafetensorsCheckpoint.SingleFileName)), Is.True, "the earlier output is kept");
        File.Delete(weights);
        File.Move(Path.Combine(earlier, SafetensorsCheckpoint.SingleFileName), weights);
        Directory.Delete(earlier);

        // A folder with a subfolder, or with files but no weights: not a checkpoint this could have written.
        string other = Path.Combine(dir.Path, "other");
        Directory.CreateDirectory(Path.Combine(other, "sub"));
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = other }));
        Assert.That(ex!.Message, Does.Contain("holds the folder 'sub'"));
        Directory.Delete(Path.Combine(other, "sub"));
        File.WriteAllText(Path.Combine(other, "notes.txt"), "mine");
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = other }));
        Assert.That(ex!.Message, Does.Contain("holds no safetensors weights"));

        // Old weights beside a file a merge does not write, such as the merge's own YAML config: the user's folder.
        string project = Path.Combine(dir.Path, "project");
        Directory.CreateDirectory(project);
        File.WriteAllText(Path.Combine(project, "old.safetensors"), "weights");
        File.WriteAllText(Path.Combine(project, "config.json"), "{}");
        File.WriteAllText(Path.Combine(project, "merge.yml"), "merge_method: ties");
        File.WriteAllText(Path.Combine(project, ".DS_Store"), "a file browser's, not the user's");
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = project }));
        Assert.That(ex!.Message, Does.Contain("holds 'merge.yml', which a merge does not write"));
        Assert.That(Directory.GetFiles(project).Select(Path.GetFileName), Is.EquivalentTo(new[] { "old.safetensors", "config.json", "merge.yml", ".DS_Store" }));
        Directory.Delete(project, recursive: true);

        // An integer output dtype is refused before any pass.
        var integer = Assert.Throws<ArgumentException>(() => CheckpointMerger.Merge(request with { OutputDirectory = Path.Combine(dir.Path, "new"), OutputDType = ScalarType.Int32 }));
        Assert.That(integer!.Message, Does.Contain("floating-point"));

        // A file where the output should go is refused before any merging.
        ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(request with { OutputDirectory = Path.Combine(other, "notes.txt") }));
        Assert.That(ex!.Message, Does.Contain("is a file"));

        Assert.That(File.ReadAllText(Path.Combine(other, "notes.txt")), Is.EqualTo("mine"));
        Assert.That(File.Exists(Path.Combine(dir.Path, "models", "base", SafetensorsCheckpoint.SingleFileName)), Is.True);
        Assert.That(Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName), Is.EquivalentTo(new[] { "models", "link", "other" }), "no temporary folder left");
    }

    [Test]
    public void A_tokenizer_source_gives_the_tokenizer_files_and_the_base_gives_the_config_with_the_output_dtype()
    {
        using var dir = new TempDirectory();
        var request = OneExpertRequest(dir, 106);
        string basePath = request.BaseModel!, expertPath = request.Experts[0];
        File.WriteAllText(Path.Combine(basePath, "config.json"), "{\n  \"model_type\": \"llama\",\n  \"torch_dtype\": \"bfloat16\"\n}\n");
        File.WriteAllText(Path.Combine(basePath, "generation_config.json"), "{\"from\": \"base\"}");
        File.WriteAllText(Path.Combine(basePath, "tokenizer.json"), "{\"from\": \"base\"}");
        File.WriteAllText(Path.Combine(basePath, "tokenizer.model"), "base");
        File.WriteAllText(Path.Combine(expertPath, "config.json"), "{\"model_type\": \"donor\"}");
        File.WriteAllText(Path.Combine(expertPath, "tokenizer.json"), "{\"from\": \"donor\"}");
        string output = request.OutputDirectory;

        // Each refusal comes before anything is written: no output, no temporary folder beside it.
        void Refused(CheckpointMergeRequest refused, string message)
        {
            var ex = Assert.Throws<MergeException>(() => CheckpointMerger.Merge(refused), message);
            Assert.That(ex!.Message, Does.Contain(message));
            Assert.That(Directory.Exists(output), Is.False, $"{message}: no output");
            Assert.That(Directory.GetDirectories(Path.GetDirectoryName(output)!, ".*"), Is.Empty, $"{message}: no temporary folder left");
        }

        // A source without a tokenizer would leave the output with none.
        Refused(request with { TokenizerFilesFrom = dir.Path }, "holds no tokenizer files");

        // So would a mistyped folder to copy the other files from.
        Refused(request with { CopyFilesFrom = Path.Combine(dir.Path, "no-such-model") }, "no-such-model' does not exist");

        // And a mistyped tokenizer source: its parent is the base's folder, which was taken silently instead.
        string missingTokenizer = Path.Combine(basePath, "no-such-tokenizer");
        Refused(request with { TokenizerFilesFrom = missingTokenizer }, $"The tokenizer source '{missingTokenizer}' does not exist");

        // A tokenizer from a model of more token rows (its config.json says so) could give ids past the merged
        // embeddings; one of fewer fits, and a config.json this check cannot read (a duplicate key) is not its to refuse.
        File.WriteAllText(Path.Combine(basePath, "config.json"), "{\n  \"model_type\": \"llama\",\n  \"torch_dtype\": \"bfloat16\",\n  \"vocab_size\": 32000\n}\n");
        File.WriteAllText(Path.Combine(expertPath, "config.json"), "{\"model_type\": \"donor\", \"vocab_size\": 32064}");
        Refused(request with { TokenizerFilesFrom = expertPath }, "declares vocab_size 32064 in its config.json, but the model");
        File.WriteAllText(Path.Combine(expertPath, "config.json"), "{\"model_type\": \"donor\", \"vocab_size\": 32064, \"vocab_size\": 1}");
        CheckpointMerger.Merge(request with { TokenizerFilesFrom = expertPath });
        Directory.Delete(output, recursive: true);
        File.WriteAllText(Path.Combine(expertPath, "config.json"), "{\"model_type\": \"donor\", \"vocab_size\": 31999}");

        CheckpointMerger.Merge(request with { TokenizerFilesFrom = expertPath, OutputDType = ScalarType.Float16 });

        Assert.That(File.ReadAllText(Path.Combine(output, "tokenizer.json")), Does.Contain("donor"));
        Assert.That(File.Exists(Path.Combine(output, "tokenizer.model")), Is.False, "the tokenizer is the donor's alone, not mixed with the base's");
        Assert.That(File.ReadAllText(Path.Combine(output, "generation_config.json")), Does.Contain("base"));
        string config = File.ReadAllText(Path.Combine(output, "config.json"));
        Assert.That(config, Does.Contain("\"model_type\": \"llama\"").And.Contain("\"torch_dtype\": \"float16\""));
    }

    [Test]
    public void Leftovers_of_a_root_folder_are_none_and_an_output_name_is_not_a_search_pattern()
    {
        Assert.That(CheckpointMerger.FindLeftovers(Path.GetPathRoot(Path.GetTempPath())!), Is.Empty, "a root folder has no parent to look in");

        using var dir = new TempDirectory();
        Directory.CreateDirectory(dir.File($".merged.mergelab-{T.MergeId}"));
        var own = Directory.CreateDirectory(dir.File($".m*.mergelab-{T.OtherMergeId}")).FullName;
        Assert.That(CheckpointMerger.FindLeftovers(dir.File("m*")), Is.EqualTo(new[] { new LeftoverFolder(own, false) }),
            "'m*' is a name: the folder left for 'merged' is not its");
    }

    [Test]
    public void Leftovers_are_the_output_name_and_a_whole_id_not_another_output_that_starts_with_it()
    {
        using var dir = new TempDirectory();
        var own = Directory.CreateDirectory(dir.File($".a.mergelab-{T.MergeId}")).FullName;
        var movedAside = Directory.CreateDirectory(dir.File($".a.mergelab-{T.OtherMergeId}.old")).FullName;
        Directory.CreateDirectory(dir.File($".a.mergelab-x.mergelab-{T.MergeId}")); // the output 'a.mergelab-x''s
        Directory.CreateDirectory(dir.File($".a.mergelab-x.mergelab-{T.OtherMergeId}.old"));
        Directory.CreateDirectory(dir.File($".a.mergelab-{T.MergeId[1..]}")); // an id a digit short
        Directory.CreateDirectory(dir.File($".a.mergelab-{T.MergeId}0"));
        Directory.CreateDirectory(dir.File($".a.mergelab-{T.MergeId.ToUpperInvariant()}")); // not Guid's "N" form (case-sensitive file systems)
        Directory.CreateDirectory(dir.File($".a.mergelab-{T.MergeId}.older"));

        Assert.That(CheckpointMerger.FindLeftovers(dir.File("a")), Is.EqualTo(new[] { new LeftoverFolder(own, false), new LeftoverFolder(movedAside, true) }));
        Assert.That(CheckpointMerger.FindLeftovers(dir.File("a.mergelab-x")), Has.Count.EqualTo(2).And.All.Property("Path").Contains(".a.mergelab-x.mergelab-"));
    }

    private sealed class FailingMethod : MergeMethod
    {
        public override string Name => "failing";

        protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic) => throw new InvalidOperationException("boom");
    }
}
