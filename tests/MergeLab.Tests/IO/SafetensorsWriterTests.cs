using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

public class SafetensorsWriterTests
{
    [Test]
    public void Writing_into_a_missing_directory_fails_clearly_and_leaves_nothing()
    {
        using var dir = new TempDirectory();
        using var t = torch.ones(2);
        string path = Path.Combine(dir.Path, "no-such-dir", "model.safetensors");
        var ex = Assert.Throws<DirectoryNotFoundException>(() => SafetensorsWriter.Write(path, [new("t", t)]));
        Assert.That(ex!.Message, Does.Contain("no-such-dir").And.Contain("does not exist"));
        Assert.That(Directory.EnumerateFileSystemEntries(dir.Path), Is.Empty);
    }

    [Test]
    public void A_failure_while_writing_leaves_the_old_file_and_no_temporary()
    {
        using var dir = new TempDirectory();
        string path = dir.File("model.safetensors");
        File.WriteAllText(path, "old");
        Assert.Throws<IOException>(() => SafetensorsWriter.WriteAtomically(path, 10, stream =>
        {
            stream.Write(new byte[5]);
            throw new IOException("disk full");
        }));
        Assert.That(dir.FileNames(), Is.EqualTo(new[] { "model.safetensors" }));
        Assert.That(File.ReadAllText(path), Is.EqualTo("old"));
    }

    [Test]
    public void Writing_replaces_an_existing_file_and_leaves_no_temporary()
    {
        using var dir = new TempDirectory();
        string path = dir.File("model.safetensors");
        File.WriteAllText(path, "old");
        using var t = torch.ones(3);
        SafetensorsWriter.Write(path, [new("t", t)]);
        Assert.That(dir.FileNames(), Is.EqualTo(new[] { "model.safetensors" }));
        using var file = SafetensorsFile.Open(path);
        Assert.That(file.TensorNames, Is.EqualTo(new[] { "t" }));
    }

    [Test]
    public void A_file_open_for_reading_can_be_replaced_and_keeps_serving_its_old_bytes()
    {
        using var dir = new TempDirectory();
        string path = dir.File("model.safetensors");
        using var before = torch.zeros(4);
        using var after = torch.ones(4);
        SafetensorsWriter.Write(path, [new("t", before)]);
        using var open = SafetensorsFile.Open(path);

        SafetensorsWriter.Write(path, [new("t", after)]);

        using var old = open.ReadTensor("t");
        T.BitEqual(old, before);
        using var reopened = SafetensorsFile.Open(path);
        using var fresh = reopened.ReadTensor("t");
        T.BitEqual(fresh, after);
    }

    [Test]
    public void Invalid_tensor_sets_are_refused_before_a_file_is_created()
    {
        using var dir = new TempDirectory();
        using var f = torch.ones(2);
        using var complex = torch.zeros(2, ScalarType.ComplexFloat32);
        string path = dir.File("x.safetensors");
        Assert.That(() => SafetensorsWriter.Write(path, [new("a", f), new("a", f)]),
            Throws.ArgumentException.With.Message.Contains("'a' occurs twice"));
        Assert.That(() => SafetensorsWriter.Write(path, [new("__metadata__", f)]),
            Throws.ArgumentException.With.Message.Contains("reserved"));
        Assert.That(() => SafetensorsWriter.Write(path, [new("c", complex)]),
            Throws.ArgumentException.With.Message.Contains("ComplexFloat32"));
        Assert.That(() => SafetensorsWriter.Write(path, [new("bad\uD800", f)]),
            Throws.ArgumentException.With.Message.Contains("lone UTF-16 surrogate"));
        Assert.That(Directory.EnumerateFileSystemEntries(dir.Path), Is.Empty);
    }

    [Test]
    public void A_header_beyond_the_reference_limit_is_refused()
    {
        using var dir = new TempDirectory();
        var metadata = new Dictionary<string, string> { ["huge"] = new string('a', 100_000_000) };
        Assert.Throws<SafetensorsFormatException>(() => SafetensorsWriter.Write(dir.File("x.safetensors"), [], metadata));
        Assert.That(Directory.EnumerateFileSystemEntries(dir.Path), Is.Empty);
    }

    [Test]
    public void Written_tensors_stay_owned_and_usable_by_the_caller()
    {
        using var dir = new TempDirectory();
        using var t = torch.arange(6, ScalarType.Float32);
        using var grid = t.reshape(2, 3);
        using var view = grid.t();
        SafetensorsWriter.Write(dir.File("x.safetensors"), [new("t", t), new("v", view)]);
        Assert.That(t.IsInvalid, Is.False);
        Assert.That(view.IsInvalid, Is.False);
        Assert.That(t.data<float>().ToArray(), Is.EqualTo(new[] { 0f, 1, 2, 3, 4, 5 }));
    }
}
