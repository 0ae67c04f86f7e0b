using System.Text;
using System.Text.Json;
using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

public class ShardedCheckpointTests
{
    /// <summary>Five F32 tensors of 10 elements (40 bytes each), with distinct values.</summary>
    private static List<(string Name, Tensor Tensor)> FiveTensors() =>
        Enumerable.Range(0, 5).Select(i => ($"layer.{i}.weight", torch.full([10], i + 0.5, ScalarType.Float32))).ToList();

    [Test]
    public void A_small_shard_size_gives_three_shards_an_index_and_everything_reads_back()
    {
        using var dir = new TempDirectory();
        var expected = FiveTensors();
        try
        {
            IReadOnlyList<string> written;
            using (var writer = new ShardedCheckpointWriter(dir.Path, maxShardBytes: 100))
            {
                foreach (var (name, tensor) in expected)
                {
                    // The writer takes ownership, so it gets its own copy.
                    writer.Add(name, tensor.clone());
                }

                Assert.That(writer.TotalSize, Is.EqualTo(200));
                written = writer.Complete();
            }

            string[] shards = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"];
            Assert.That(written, Is.EqualTo(shards.Append("model.safetensors.index.json")));
            Assert.That(dir.FileNames(), Is.EqualTo(shards.Append("model.safetensors.index.json").Order(StringComparer.Ordinal)), "no temporary files remain");

            using var index = JsonDocument.Parse(File.ReadAllBytes(dir.File("model.safetensors.index.json")));
            Assert.That(index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64(), Is.EqualTo(200));
            var weightMap = index.RootElement.GetProperty("weight_map").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString());
            Assert.That(weightMap, Is.EquivalentTo(new Dictionary<string, string?>
            {
                // 40 + 40 fits in 100; a third tensor would make 120, so it starts the next shard.
                ["layer.0.weight"] = shards[0], ["layer.1.weight"] = shards[0],
                ["layer.2.weight"] = shards[1], ["layer.3.weight"] = shards[1],
                ["layer.4.weight"] = shards[2],
            }));

            using var checkpoint = SafetensorsCheckpoint.Open(dir.Path);
            Assert.That(checkpoint.IndexPath, Is.EqualTo(dir.File("model.safetensors.index.json")));
            Assert.That(checkpoint.TensorNames, Is.EqualTo(expected.Select(e => e.Name)));
            Assert.That(checkpoint.TotalSize, Is.EqualTo(200));
            Assert.That(checkpoint.Shards.Select(s => Path.GetFileName(s.Path)), Is.EqualTo(shards));
            Assert.That(Path.GetFileName(checkpoint.GetShard("layer.3.weight").Path), Is.EqualTo(shards[1]));
            Assert.That(checkpoint.GetInfo("layer.4.weight").ByteLength, Is.EqualTo(40));
            foreach (var (name, tensor) in expected)
            {
                using var read = checkpoint.ReadTensor(name);
                T.BitEqual(read, tensor, name);
            }

            using var all = checkpoint.ReadAll();
            Assert.That(all.Names, Is.EqualTo(expected.Select(e => e.Name)));
            Assert.That(checkpoint.Shards[0].Metadata, Is.EquivalentTo(new Dictionary<string, string> { ["format"] = "pt" }));
        }
        finally
        {
            expected.ForEach(e => e.Tensor.Dispose());
        }
    }

    [Test]
    public void The_index_is_written_as_transformers_writes_it()
    {
        using var dir = new TempDirectory();
        using (var writer = new ShardedCheckpointWriter(dir.Path, maxShardBytes: 4))
        {
            using var one = torch.ones([1], ScalarType.Float32);
            writer.Add("b", one.clone());
            writer.Add("a", one.clone());
            writer.Add("é", one.clone());
            writer.Complete();
        }

        // json.dumps(index, indent=2, sort_keys=True) + "\n"
        const string expected = """
            {
              "metadata": {
                "total_size": 12
              },
              "weight_map": {
                "a": "model-00002-of-00003.safetensors",
                "b": "model-00001-of-00003.safetensors",
                "\u00e9": "model-00003-of-00003.safetensors"
              }
            }

            """;
        Assert.That(File.ReadAllText(dir.File("model.safetensors.index.json"), Encoding.ASCII), Is.EqualTo(expected.ReplaceLineEndings("\n")));
    }

    [Test]
    public void One_shard_is_written_as_model_safetensors_without_an_index()
    {
        using var dir = new TempDirectory();
        var expected = FiveTensors();
        try
        {
            using (var writer = new ShardedCheckpointWriter(dir.Path))
            {
                foreach (var (name, tensor) in expected)
                {
                    writer.Add(name, tensor.clone());
                }

                Assert.That(writer.Complete(), Is.EqualTo(new[] { "model.safetensors" }));
            }

            Assert.That(dir.FileNames(), Is.EqualTo(new[] { "model.safetensors" }));
            using var checkpoint = SafetensorsCheckpoint.Open(dir.Path);
            Assert.That(checkpoint.IndexPath, Is.Null);
            Assert.That(checkpoint.TotalSize, Is.EqualTo(200));
            Assert.That(checkpoint.TensorNames, Is.EqualTo(expected.Select(e => e.Name)));
            using var read = checkpoint.ReadTensor("layer.2.weight");
            T.BitEqual(read, expected[2].Tensor);
        }
        finally
        {
            expected.ForEach(e => e.Tensor.Dispose());
        }
    }

    [Test]
    public void A_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own_where_it_occurs()
    {
        // huggingface_hub appends the oversized tensor's shard at once and keeps filling the current one.
        using var dir = new TempDirectory();
        using (var writer = new ShardedCheckpointWriter(dir.Path, maxShardBytes: 100))
        {
            writer.Add("a", torch.zeros([10], ScalarType.Float32));
            writer.Add("big", torch.zeros([100], ScalarType.Float32));
            writer.Add("b", torch.zeros([10], ScalarType.Float32));
            writer.Complete();
        }

        using var checkpoint = SafetensorsCheckpoint.Open(dir.Path);
        Assert.That(Path.GetFileName(checkpoint.GetShard("big").Path), Is.EqualTo("model-00001-of-00002.safetensors"));
        Assert.That(Path.GetFileName(checkpoint.GetShard("a").Path), Is.EqualTo("model-00002-of-00002.safetensors"));
        Assert.That(Path.GetFileName(checkpoint.GetShard("b").Path), Is.EqualTo("model-00002-of-00002.safetensors"));
        Assert.That(checkpoint.TensorNames, Is.EqualTo(new[] { "big", "a", "b" }));
    }

    [Test]
    public void Disposing_without_Complete_leaves_nothing_behind()
    {
        using var dir = new TempDirectory();
        using (var writer = new ShardedCheckpointWriter(dir.Path, maxShardBytes: 40))
        {
            writer.Add("a", torch.zeros([10], ScalarType.Float32));
            writer.Add("b", torch.zeros([10], ScalarType.Float32));
            writer.Add("c", torch.zeros([10], ScalarType.Float32));
            Assert.That(dir.FileNames(), Has.Length.EqualTo(2), "full shards are written as they fill");
        }

        Assert.That(dir.FileNames(), Is.Empty);
    }

    [Test]
    public void The_writer_refuses_repeated_names_and_use_after_Complete()
    {
        using var dir = new TempDirectory();
        using var writer = new ShardedCheckpointWriter(dir.Path);
        writer.Add("a", torch.zeros(1));
        using var again = torch.zeros(1);
        Assert.That(() => writer.Add("a", again), Throws.ArgumentException.With.Message.Contains("'a' was already added"));
        Assert.That(again.IsInvalid, Is.False, "a refused tensor stays the caller's");
        writer.Complete();
        Assert.Throws<InvalidOperationException>(() => writer.Add("b", again));
        Assert.Throws<DirectoryNotFoundException>(() => new ShardedCheckpointWriter(Path.Combine(dir.Path, "missing")).Dispose());
    }

    [Test]
    public void Non_contiguous_tensors_are_written_by_value()
    {
        using var dir = new TempDirectory();
        using var line = torch.arange(6, ScalarType.Int64);
        using var grid = line.reshape(2, 3);
        using var transposed = grid.t();
        using var expected = transposed.contiguous();
        using (var writer = new ShardedCheckpointWriter(dir.Path))
        {
            writer.Add("t", grid.t());
            writer.Complete();
        }

        using var checkpoint = SafetensorsCheckpoint.Open(dir.File("model.safetensors"));
        using var read = checkpoint.ReadTensor("t");
        T.BitEqual(read, expected);
    }

    private static void WriteShards(TempDirectory dir)
    {
        using var writer = new ShardedCheckpointWriter(dir.Path, maxShardBytes: 40);
        writer.Add("a", torch.zeros([10], ScalarType.Float32));
        writer.Add("b", torch.ones([10], ScalarType.Float32));
        writer.Complete();
    }

    [Test]
    public void An_index_naming_a_missing_shard_is_refused()
    {
        using var dir = new TempDirectory();
        WriteShards(dir);
        File.Delete(dir.File("model-00002-of-00002.safetensors"));
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(dir.Path));
        Assert.That(ex!.Path, Is.EqualTo(dir.File("model.safetensors.index.json")));
        Assert.That(ex.Message, Does.Contain("shard 'model-00002-of-00002.safetensors', which does not exist"));
    }

    [Test]
    public void An_index_naming_a_tensor_its_shard_lacks_is_refused()
    {
        using var dir = new TempDirectory();
        WriteShards(dir);
        string indexPath = dir.File("model.safetensors.index.json");
        File.WriteAllText(indexPath, File.ReadAllText(indexPath).Replace("\"b\": \"model-00002", "\"c\": \"model-00002", StringComparison.Ordinal));
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(dir.Path));
        Assert.That(ex!.Message, Does.Contain("assigns tensor 'c' to shard 'model-00002-of-00002.safetensors', but that shard has no such tensor"));
    }

    [TestCase("{", "not valid JSON")]
    [TestCase("[]", "must be an object with a weight_map")]
    [TestCase("{\"metadata\":{}}", "no weight_map")]
    [TestCase("{\"weight_map\":{\"a\":5}}", "weight_map entry 'a' is a JSON Number")]
    [TestCase("{\"weight_map\":{\"a\":\"../model.safetensors\"}}", "not a file name in the index's directory")]
    [TestCase("{\"weight_map\":{\"a\":\"x.safetensors\",\"a\":\"y.safetensors\"}}", "lists tensor 'a' twice")]
    public void A_malformed_index_is_refused(string json, string fragment)
    {
        using var dir = new TempDirectory();
        File.WriteAllText(dir.File("model.safetensors.index.json"), json);
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(dir.Path));
        Assert.That(ex!.Message, Does.Contain(fragment));
    }

    [Test]
    public void A_shard_with_a_malformed_header_is_reported_with_the_shards_path()
    {
        using var dir = new TempDirectory();
        WriteShards(dir);
        File.WriteAllBytes(dir.File("model-00001-of-00002.safetensors"), [1, 2, 3]);
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(dir.Path));
        Assert.That(ex!.Path, Is.EqualTo(dir.File("model-00001-of-00002.safetensors")));
    }

    [Test]
    public void Opens_a_single_file_an_index_path_or_a_directory_and_refuses_an_empty_directory()
    {
        using var dir = new TempDirectory();
        WriteShards(dir);
        using (var viaIndex = SafetensorsCheckpoint.Open(dir.File("model.safetensors.index.json")))
        {
            Assert.That(viaIndex.TensorNames, Is.EqualTo(new[] { "a", "b" }));
        }

        using (var oneShard = SafetensorsCheckpoint.Open(dir.File("model-00002-of-00002.safetensors")))
        {
            Assert.That(oneShard.TensorNames, Is.EqualTo(new[] { "b" }));
            Assert.That(oneShard.Contains("a"), Is.False);
            Assert.Throws<KeyNotFoundException>(() => oneShard.GetInfo("a"));
        }

        using var empty = new TempDirectory();
        var ex = Assert.Throws<FileNotFoundException>(() => SafetensorsCheckpoint.Open(empty.Path));
        Assert.That(ex!.Message, Does.Contain("model.safetensors.index.json"));
        Assert.Throws<FileNotFoundException>(() => SafetensorsCheckpoint.Open(empty.File("nothing-here")));
    }
}
