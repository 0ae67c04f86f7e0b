using MergeLab.IO;
using NUnit.Framework;

namespace MergeLab.Tests.IO;

public class NonWeightFilesTests
{
    [Test]
    public void Copies_config_and_tokenizer_files_but_not_weights_indexes_or_code()
    {
        using var source = new TempDirectory();
        using var destination = new TempDirectory();
        string[] wanted =
        [
            "added_tokens.json", "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
            "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
        ];
        string[] unwanted =
        [
            "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "README.md", "modeling_custom.py", ".gitattributes",
        ];
        foreach (var name in wanted.Concat(unwanted))
        {
            File.WriteAllText(source.File(name), name);
        }

        Directory.CreateDirectory(Path.Combine(source.Path, "sub"));
        File.WriteAllText(Path.Combine(source.Path, "sub", "config.json"), "nested");

        var copied = NonWeightFiles.Copy(source.Path, destination.Path);

        Assert.That(copied, Is.EqualTo(wanted.Order(StringComparer.Ordinal)));
        Assert.That(destination.FileNames(), Is.EqualTo(wanted.Order(StringComparer.Ordinal)));
        Assert.That(File.ReadAllText(destination.File("tokenizer.model")), Is.EqualTo("tokenizer.model"));
    }

    [Test]
    public void Existing_files_in_the_destination_are_kept_unless_overwrite_is_asked()
    {
        using var source = new TempDirectory();
        using var destination = new TempDirectory();
        File.WriteAllText(source.File("config.json"), "source");
        File.WriteAllText(destination.File("config.json"), "merged");

        Assert.That(NonWeightFiles.Copy(source.Path, destination.Path), Is.Empty);
        Assert.That(File.ReadAllText(destination.File("config.json")), Is.EqualTo("merged"));

        Assert.That(NonWeightFiles.Copy(source.Path, destination.Path, overwrite: true), Is.EqualTo(new[] { "config.json" }));
        Assert.That(File.ReadAllText(destination.File("config.json")), Is.EqualTo("source"));
    }

    [Test]
    public void A_missing_directory_is_reported()
    {
        using var dir = new TempDirectory();
        Assert.Throws<DirectoryNotFoundException>(() => NonWeightFiles.Copy(Path.Combine(dir.Path, "missing"), dir.Path));
    }

    [Test]
    public void The_config_dtype_is_set_where_declared_or_added_and_the_rest_of_the_text_kept()
    {
        using var dir = new TempDirectory();
        string config = dir.File("config.json");
        File.WriteAllText(config, "{\"_name_or_path\": \"/home/José/m+<x>\", \"torch_dtype\": \"bfloat16\", \"dtype\": \"bfloat16\", \"layers\": 2}");
        NonWeightFiles.SetConfigDType(config, TorchSharp.torch.ScalarType.Float16);
        string text = File.ReadAllText(config);
        Assert.That(text, Does.Contain("\"torch_dtype\": \"float16\"").And.Contain("\"dtype\": \"float16\"").And.Contain("/home/José/m+<x>"));
        Assert.That(text, Does.Contain("\"layers\": 2"));

        // No dtype key, or only null: torch_dtype is added, as mergekit's configs always have it.
        foreach (var undeclared in new[] { "{\"layers\": 2}", "{\"layers\": 2, \"torch_dtype\": null}" })
        {
            File.WriteAllText(config, undeclared);
            NonWeightFiles.SetConfigDType(config, TorchSharp.torch.ScalarType.Float16);
            Assert.That(File.ReadAllText(config), Is.EqualTo("{\n  \"layers\": 2,\n  \"torch_dtype\": \"float16\"\n}\n"), undeclared);
        }

        // Left as they are: a dtype that is not a string, not an object, not JSON, duplicate keys, no file.
        foreach (var untouched in new[] { "{\"torch_dtype\": 16}", "[1, 2]", "not json", "{\"torch_dtype\": \"bfloat16\", \"torch_dtype\": \"float32\"}" })
        {
            File.WriteAllText(config, untouched);
            NonWeightFiles.SetConfigDType(config, TorchSharp.torch.ScalarType.Float16);
            Assert.That(File.ReadAllText(config), Is.EqualTo(untouched));
        }

        NonWeightFiles.SetConfigDType(dir.File("missing.json"), TorchSharp.torch.ScalarType.Float16);
        Assert.That(File.Exists(dir.File("missing.json")), Is.False);
    }

    [Test]
    public void Only_the_included_files_are_copied()
    {
        using var source = new TempDirectory();
        using var destination = new TempDirectory();
        foreach (var name in new[] { "config.json", "generation_config.json", "tokenizer.json" })
        {
            File.WriteAllText(source.File(name), name);
        }

        Assert.That(NonWeightFiles.Copy(source.Path, destination.Path, include: NonWeightFiles.IsModelFile),
            Is.EqualTo(new[] { "config.json", "generation_config.json" }));
        Assert.That(NonWeightFiles.Copy(source.Path, destination.Path, include: n => !NonWeightFiles.IsModelFile(n)), Is.EqualTo(new[] { "tokenizer.json" }));
    }
}
