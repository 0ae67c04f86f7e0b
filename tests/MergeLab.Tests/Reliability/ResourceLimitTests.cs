using System.Diagnostics;
using System.Text;
using MergeLab.Config;
using MergeLab.IO;
using MergeLab.Tests.Config;
using MergeLab.Tests.IO;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// The resource limits: a safetensors header or index larger than the bound is refused before it is
/// read; tensor sizes are checked against the file before anything is allocated; configs have size,
/// depth and node-count limits (an alias bomb is refused); special files that never end are not read.
/// </summary>
[FixtureLifeCycle(LifeCycle.InstancePerTestCase)] // a fresh folder per test
public sealed class ResourceLimitTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>A sparse file of <paramref name="length"/> bytes starting with <paramref name="head"/>.</summary>
    private string Sparse(string name, byte[] head, long length)
    {
        string path = _dir.File(name);
        using var f = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
        f.Write(head);
        f.SetLength(length);
        return path;
    }

    private static long Allocated(Action action)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        action();
        return GC.GetAllocatedBytesForCurrentThread() - before;
    }

    [Test]
    public void The_default_header_limit_is_the_references_and_far_above_real_checkpoints()
    {
        // A 70B Llama shard's header is about 30 KB; a whole 405B model's tensor list is under 200 KB.
        Assert.That(SafetensorsReadOptions.Default.MaxHeaderBytes, Is.EqualTo(100_000_000));
        Assert.Throws<ArgumentOutOfRangeException>(() => SafetensorsFile.Open(_dir.File("x"), new SafetensorsReadOptions { MaxHeaderBytes = 0 }));
    }

    [Test]
    public void A_header_above_the_limit_is_refused_before_it_is_read()
    {
        // The file really is large enough to hold the declared 50 MB header.
        const ulong declared = 50_000_000;
        string path = Sparse("big-header.safetensors", SafetensorsBytes.Build("{", [], declaredSize: declared), 8 + (long)declared);
        var options = new SafetensorsReadOptions { MaxHeaderBytes = 1_000_000 };

        SafetensorsFormatException? ex = null;
        long allocated = Allocated(() => ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path, options)));

        Assert.That(ex!.Message, Does.Contain("header size 50000000 is above the limit of 1000000 bytes"));
        Assert.That(allocated, Is.LessThan(100_000), "nothing of the size of the header was allocated");
    }

    [Test]
    public void A_tensor_larger_than_the_file_is_refused_before_anything_is_allocated()
    {
        // 2^40 bytes of U8 claimed in a 200-byte file.
        string header = "{\"huge\":{\"dtype\":\"U8\",\"shape\":[1099511627776],\"data_offsets\":[0,1099511627776]}}";
        string path = _dir.File("huge.safetensors");
        File.WriteAllBytes(path, SafetensorsBytes.Build(header, new byte[100]));

        SafetensorsFormatException? ex = null;
        long allocated = Allocated(() => ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path)));
        Assert.That(ex!.Message, Does.Contain("run past the end of the data buffer, which holds 100 bytes"));
        Assert.That(allocated, Is.LessThan(100_000));
    }

    [Test]
    public void An_index_above_the_limit_is_refused_before_it_is_read()
    {
        string dir = Directory.CreateDirectory(_dir.File("ckpt")).FullName;
        Sparse(Path.Combine("ckpt", SafetensorsCheckpoint.IndexFileName), "{"u8.ToArray(), 20_000_000);
        SafetensorsFormatException? ex = null;
        long allocated = Allocated(() => ex = Assert.Throws<SafetensorsFormatException>(
            () => SafetensorsCheckpoint.Open(dir, new SafetensorsReadOptions { MaxHeaderBytes = 1_000_000 })));
        Assert.That(ex!.Message, Does.Contain("the index is 20000000 bytes, above the limit"));
        Assert.That(allocated, Is.LessThan(100_000));
    }

    [Test]
    public void Index_shard_names_cannot_leave_the_checkpoint_directory()
    {
        string dir = Directory.CreateDirectory(_dir.File("ckpt")).FullName;
        foreach (string shard in new[] { "../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "x\\\\y", "a\\u0000b" })
        {
            File.WriteAllText(Path.Combine(dir, SafetensorsCheckpoint.IndexFileName),
                $"{{\"metadata\": {{}}, \"weight_map\": {{\"w\": \"{shard}\"}}}}");
            var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(dir), shard)!;
            Assert.That(ex.Message, Does.Contain("which is not a file name in the index's directory"), shard);
        }
    }

    [Test]
    [Platform(Exclude = "Win")]
    public void A_fifo_in_place_of_a_file_is_refused_instead_of_blocking()
    {
        string fifo = _dir.File("model.safetensors");
        using (var mkfifo = Process.Start("mkfifo", fifo))
        {
            mkfifo.WaitForExit();
            Assume.That(mkfifo.ExitCode, Is.EqualTo(0), "mkfifo is available");
        }

        // Opening a FIFO for reading blocks until a writer comes; these must return at once.
        var open = Task.Run(() => Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(_dir.Path)));
        Assert.That(open.Wait(TimeSpan.FromSeconds(10)), Is.True, "did not block");
        File.Delete(fifo);

        string index = _dir.File(SafetensorsCheckpoint.IndexFileName);
        using (var mkfifo = Process.Start("mkfifo", index))
        {
            mkfifo.WaitForExit();
        }

        var openIndex = Task.Run(() => Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(_dir.Path)));
        Assert.That(openIndex.Wait(TimeSpan.FromSeconds(10)), Is.True, "did not block on the index");

        string config = _dir.File("merge.yml");
        using (var mkfifo = Process.Start("mkfifo", config))
        {
            mkfifo.WaitForExit();
        }

        var load = Task.Run(() => Assert.Throws<MergeConfigException>(() => MergeConfig.Load(config)));
        Assert.That(load.Wait(TimeSpan.FromSeconds(10)), Is.True, "did not block on the config");
    }

    // ---- configs ---------------------------------------------------------------------------------

    private const string Valid = """
        merge_method: ties
        base_model: base
        models:
          - model: math
            parameters: {weight: 1, density: 0.5}
        """;

    [Test]
    public void A_config_file_above_the_size_limit_is_not_read()
    {
        using var folder = new ConfigFolder("base", "math");
        string path = folder.Write(Valid + "\n# " + new string('x', 2_000_000) + "\n");
        MergeConfigException? ex = null;
        long allocated = Allocated(() => ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Load(path)));
        Assert.That(ex!.Message, Does.Contain("above the limit of 1048576").And.Contain(nameof(MergeConfigReadOptions.MaxLength)));
        Assert.That(allocated, Is.LessThan(100_000), "the file was not read");

        Assert.That(() => MergeConfig.Parse(Valid + new string(' ', 100), null, new MergeConfigReadOptions { MaxLength = 100 }),
            Throws.TypeOf<MergeConfigException>().With.Message.Contains("characters long, above the limit of 100"));
    }

    [TestCase(64, true)]
    [TestCase(65, false)]
    public void Nesting_is_limited_before_the_document_is_built(int depth, bool withinLimit)
    {
        // Depth counts the root mapping and the 'parameters' mapping: two levels before the lists.
        string yaml = Valid + "\nparameters: {weight: " + new string('[', depth - 2) + "1" + new string(']', depth - 2) + "}\n";
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse(yaml))!;
        Assert.That(ex.Message, withinLimit
            ? Does.Not.Contain("levels deep")
            : Does.Contain("more than 64 levels deep"));
    }

    [Test]
    public void A_million_levels_of_nesting_fail_cleanly()
    {
        string yaml = Valid + "\nparameters: {weight: " + new string('[', 1_000_000) + "}\n";
        Assert.That(() => MergeConfig.Parse(yaml, null, new MergeConfigReadOptions { MaxLength = 2_000_000 }),
            Throws.TypeOf<MergeConfigException>().With.Message.Contains("levels deep"));
    }

    [Test]
    public void An_alias_bomb_is_refused_quickly()
    {
        var sb = new StringBuilder("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for (int i = 1; i < 10; i++)
        {
            sb.Append($"l{i}: &l{i} [").AppendJoin(", ", Enumerable.Repeat($"*l{i - 1}", 10)).Append("]\n");
        }

        string yaml = Valid.Replace("weight: 1", "weight: *l9", StringComparison.Ordinal) + "\n" + sb;
        var clock = Stopwatch.StartNew();
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse(yaml))!;
        Assert.That(ex.Message, Does.Contain("more than 100000 YAML nodes, counting each alias"));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(2)));
    }

    [Test]
    public void Anchors_and_aliases_of_ordinary_size_still_work()
    {
        using var folder = new ConfigFolder("base", "math", "code");
        var config = MergeConfig.Load(folder.Write("""
            merge_method: ties
            base_model: base
            models:
              - model: math
                parameters: &p {weight: 1, density: 0.5}
              - model: code
                parameters: *p
            """));
        Assert.That(config.Models[1].Parameters["density"], Is.EqualTo(new NumberParameter(0.5)));
    }

    [TestCase("&r [*r]")]
    [TestCase("&r {model: *r}")]
    public void A_self_referencing_alias_is_refused(string value)
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse(Valid.Replace("base_model: base", "base_model: " + value, StringComparison.Ordinal)))!;
        Assert.That(ex.Message, Does.Contain("refers to the node that contains it"));
    }

    [TestCase("!!python/object/apply:os.system ['echo pwned']")]
    [TestCase("!!python/name:os.system ''")]
    [TestCase("!<tag:yaml.org,2002:binary> aGVsbG8=")]
    [TestCase("!custom 1")]
    public void Tags_that_name_types_are_refused(string value)
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse(Valid.Replace("weight: 1", "weight: " + value, StringComparison.Ordinal)))!;
        Assert.That(ex.Message, Does.Contain("is not supported: a merge config holds plain"));
        Assert.That(ex.Line, Is.EqualTo(5));
    }

    [Test]
    public void Core_schema_tags_are_plain_data()
    {
        using var folder = new ConfigFolder("base", "math");
        var config = MergeConfig.Parse(Valid.Replace("weight: 1", "weight: !!float 1", StringComparison.Ordinal), Path.Combine(folder.Root, "m.yml"));
        Assert.That(config.Models[0].Parameters["weight"], Is.EqualTo(new NumberParameter(1)));
    }

    [Test]
    public void Limits_are_validated()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => MergeConfig.Parse(Valid, null, new MergeConfigReadOptions { MaxDepth = 0 }));
        Assert.That(MergeConfigReadOptions.Default, Is.EqualTo(new MergeConfigReadOptions { MaxLength = 1 << 20, MaxDepth = 64, MaxNodes = 100_000 }));
    }
}
