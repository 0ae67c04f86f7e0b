using System.Text;
using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;

namespace MergeLab.Tests.IO;

/// <summary>Every malformed file is refused with a <see cref="SafetensorsFormatException"/> naming the file and the problem.</summary>
public class SafetensorsMalformedTests
{
    private static byte[] Header(string json, int dataBytes) => SafetensorsBytes.Build(json, new byte[dataBytes]);

    private static string Entry(string name, string dtype, string shape, string offsets) =>
        $"\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":{offsets}}}";

    private static IEnumerable<TestCaseData> MalformedFiles()
    {
        TestCaseData Case(string label, byte[] bytes, string fragment) => new TestCaseData(bytes, fragment).SetName($"Refuses {label}");

        yield return Case("an empty file", [], "shorter than the 8-byte header size");
        yield return Case("a truncated size prefix", [1, 0, 0, 0, 0], "the file is 5 bytes, shorter");
        yield return Case("a header size beyond the file", SafetensorsBytes.Build("{}", [], declaredSize: 1000), "header size 1000 is beyond the file size 10");
        yield return Case("an absurd header size", SafetensorsBytes.Build("{}", [], declaredSize: 9_000_000_000_000_000_000), "header size 9000000000000000000 is beyond the file size");
        yield return Case("a header size of 0", SafetensorsBytes.Build("", []), "header size is 0");
        yield return Case("a header that is not UTF-8", SafetensorsBytes.Build(new byte[] { 0xFF }, []), "not valid UTF-8");
        yield return Case("invalid JSON", Header("{", 0), "not valid JSON");
        yield return Case("trailing JSON", Header("{} x", 0), "not valid JSON");
        yield return Case("a byte order mark", SafetensorsBytes.Build(new byte[] { 0xEF, 0xBB, 0xBF, (byte)'{', (byte)'}' }, []), "byte order mark");
        yield return Case("a header that is an array", Header("[]", 0), "the header is a JSON array, but must be an object");
        yield return Case("an entry that is not an object", Header("{\"a\":5}", 0), "tensor 'a': the entry is a JSON number");
        yield return Case("an entry without dtype", Header("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "tensor 'a': the entry has no dtype");
        yield return Case("an entry without shape", Header("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), "has no shape");
        yield return Case("an entry without data_offsets", Header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), "has no data_offsets");
        yield return Case("a dtype that is not a string", Header("{\"a\":{\"dtype\":5,\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "dtype is a JSON number");
        yield return Case("a shape that is not an array", Header("{\"a\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}", 4), "shape is a JSON string");
        yield return Case("a field given twice", Header("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "has dtype twice");
        yield return Case("one data offset", Header($"{{{Entry("a", "F32", "[1]", "[4]")}}}", 4), "data_offsets is [4], but must be [begin, end]");
        yield return Case("three data offsets", Header($"{{{Entry("a", "F32", "[1]", "[0,4,8]")}}}", 8), "data_offsets is [0, 4, 8]");
        yield return Case("a string data offset", Header($"{{{Entry("a", "F32", "[1]", "[\"0\",4]")}}}", 4), "data_offsets holds a JSON string");
        yield return Case("an unknown dtype", Header($"{{{Entry("a", "F33", "[1]", "[0,4]")}}}", 4), "tensor 'a': unknown dtype 'F33'");
        yield return Case("an unsupported dtype", Header($"{{{Entry("a", "F8_E4M3", "[4]", "[0,4]")}}}", 4), "dtype 'F8_E4M3' is valid safetensors but not supported");
        yield return Case("a negative dimension", Header($"{{{Entry("a", "F32", "[2,-1]", "[0,0]")}}}", 0), "shape holds the negative number -1");
        yield return Case("a fractional dimension", Header($"{{{Entry("a", "F32", "[1.5]", "[0,4]")}}}", 4), "shape holds 1.5, which is not an integer");
        yield return Case("an exponent dimension", Header($"{{{Entry("a", "F32", "[1e0]", "[0,4]")}}}", 4), "not an integer");
        // The reference's test_validation_overflow vectors.
        yield return Case("a dimension beyond 2^63", Header($"{{{Entry("test", "I32", "[2,18446744073709551614]", "[0,16]")}}}", 16), "beyond 2^63-1");
        yield return Case("a shape whose size overflows", Header($"{{{Entry("test", "I32", "[2,9223372036854775807]", "[0,16]")}}}", 16), "more bytes than a 64-bit size can count");
        yield return Case("offsets that end before they begin", Header($"{{{Entry("a", "F32", "[0]", "[4,0]")}}}", 4), "data_offsets [4, 0] end before they begin");
        // The reference's test_invalid_info.
        yield return Case("offsets inconsistent with shape and dtype", Header($"{{{Entry("test", "I32", "[2,2]", "[0,4]")}}}", 4), "span 4 bytes, but shape [2, 2] of I32 needs 16");
        yield return Case("offsets spanning more than shape and dtype need", Header($"{{{Entry("a", "F32", "[1]", "[0,8]")}}}", 8), "span 8 bytes, but shape [1] of F32 needs 4");
        yield return Case("offsets beyond the data", Header($"{{{Entry("a", "F32", "[4]", "[0,16]")}}}", 8), "data_offsets [0, 16] run past the end of the data buffer, which holds 8 bytes");
        // The reference's test_metadata_incomplete_buffer, second case: two bytes missing.
        yield return Case("missing data bytes", Header($"{{{Entry("test", "I32", "[2,2]", "[0,16]")}}}", 14), "run past the end");
        yield return Case("overlapping tensors", Header($"{{{Entry("a", "F32", "[4]", "[0,16]")},{Entry("b", "F32", "[4]", "[8,24]")}}}", 24), "tensor 'b' (data_offsets [8, 24]) overlaps tensor 'a'");
        // The reference's test_json_attack: ten tensors sharing one range.
        yield return Case("tensors sharing one range", Header("{" + string.Join(",", Enumerable.Range(0, 10).Select(i => Entry($"weight_{i}", "F32", "[2,2]", "[0,16]"))) + "}", 16), "overlaps");
        yield return Case("a hole between tensors", Header($"{{{Entry("a", "F32", "[2]", "[0,8]")},{Entry("b", "F32", "[2]", "[12,20]")}}}", 20), "bytes [8, 12) of the data buffer belong to no tensor");
        yield return Case("a hole before the first tensor", Header($"{{{Entry("a", "F32", "[2]", "[4,12]")}}}", 12), "bytes [0, 4) of the data buffer belong to no tensor");
        // The reference's test_metadata_incomplete_buffer, first case: a polyglot file with trailing bytes.
        yield return Case("bytes after the last tensor", SafetensorsBytes.Build($"{{{Entry("test", "I32", "[2,2]", "[0,16]")}}}", [.. new byte[16], .. "extra_bogus_data_for_polyglot_file"u8]), "the tensors cover 16 bytes but the data buffer holds 50");
        yield return Case("duplicate names", Header($"{{{Entry("a", "F32", "[1]", "[0,4]")},{Entry("a", "F32", "[1]", "[4,8]")}}}", 8), "names tensor 'a' twice");
        yield return Case("duplicate names spelled differently", Header($"{{{Entry("a", "F32", "[1]", "[0,4]")},{Entry("\\u0061", "F32", "[1]", "[4,8]")}}}", 8), "names tensor 'a' twice");
        yield return Case("metadata twice", Header("{\"__metadata__\":{},\"__metadata__\":{}}", 0), "'__metadata__' twice");
        yield return Case("metadata that is not a map", Header("{\"__metadata__\":[\"a\"]}", 0), "'__metadata__' is a JSON array, but must be an object mapping strings to strings");
        yield return Case("metadata with a number value", Header("{\"__metadata__\":{\"total\":5}}", 0), "'__metadata__' entry 'total' is a JSON number, but metadata values must be strings");
        yield return Case("metadata with a key twice", Header("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0), "has the key 'k' twice");
        yield return Case("an escaped lone surrogate", Header($"{{{Entry("\\ud800", "F32", "[1]", "[0,4]")}}}", 4), "not valid JSON");
    }

    [TestCaseSource(nameof(MalformedFiles))]
    public void Malformed_file_is_refused(byte[] bytes, string expectedFragment)
    {
        using var dir = new TempDirectory();
        string path = dir.File("bad.safetensors");
        File.WriteAllBytes(path, bytes);
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path).Dispose());
        Assert.That(ex!.Path, Is.EqualTo(path));
        Assert.That(ex.Message, Does.StartWith(path + ": "));
        Assert.That(ex.Message, Does.Contain(expectedFragment));
    }

    [Test]
    public void Header_above_the_configured_limit_is_refused_before_it_is_read()
    {
        using var dir = new TempDirectory();
        string path = dir.File("big-header.safetensors");
        string header = SafetensorsBytes.Pad("{\"__metadata__\":{\"padding\":\"" + new string('x', 100) + "\"}}");
        File.WriteAllBytes(path, SafetensorsBytes.Build(header, []));
        var ex = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path, new SafetensorsReadOptions { MaxHeaderBytes = 64 }));
        Assert.That(ex!.Message, Does.Contain($"header size {header.Length} is above the limit of 64 bytes"));
        using var ok = SafetensorsFile.Open(path);
        Assert.That(ok.Metadata["padding"], Has.Length.EqualTo(100));
    }

    [Test]
    public void Reference_default_header_limit_is_100_million_bytes()
    {
        Assert.That(SafetensorsReadOptions.Default.MaxHeaderBytes, Is.EqualTo(100_000_000));
        Assert.Throws<ArgumentOutOfRangeException>(() => SafetensorsFile.Open("x", new SafetensorsReadOptions { MaxHeaderBytes = 0 }));
    }

    private static IEnumerable<TestCaseData> AcceptedFiles()
    {
        TestCaseData Case(string label, byte[] bytes, int tensors) => new TestCaseData(bytes, tensors).SetName($"Accepts {label}");

        // The reference's test_whitespace_padded_header and test_whitespace_leading_padded_header.
        yield return Case("trailing JSON whitespace", SafetensorsBytes.Build(new byte[] { (byte)'{', (byte)'}', 0x0D, 0x20, 0x09, 0x0A }, []), 0);
        yield return Case("leading JSON whitespace", SafetensorsBytes.Build(new byte[] { 0x09, 0x0A, (byte)'{', (byte)'}', 0x0D, 0x20 }, []), 0);
        // The reference's test_zero_sized_tensor (unpadded, a space inside data_offsets).
        yield return Case("a zero-sized tensor", SafetensorsBytes.Build("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,0],\"data_offsets\":[0, 0]}}", []), 1);
        // serde skips fields the reference's TensorInfo does not declare.
        yield return Case("unknown fields in an entry", Header("{\"a\":{\"dtype\":\"F32\",\"extra\":{\"x\":[1,2]},\"shape\":[1],\"data_offsets\":[0,4]}}", 4), 1);
        yield return Case("null metadata", Header("{\"__metadata__\":null}", 0), 0);
    }

    [TestCaseSource(nameof(AcceptedFiles))]
    public void Valid_edge_case_is_accepted(byte[] bytes, int tensorCount)
    {
        using var dir = new TempDirectory();
        string path = dir.File("ok.safetensors");
        File.WriteAllBytes(path, bytes);
        using var file = SafetensorsFile.Open(path);
        Assert.That(file.Count, Is.EqualTo(tensorCount));
        foreach (var name in file.TensorNames)
        {
            using var t = file.ReadTensor(name);
            Assert.That(t.shape, Is.EqualTo(file.GetInfo(name).Shape));
        }
    }

    [Test]
    public void Missing_file_is_a_FileNotFoundException()
    {
        using var dir = new TempDirectory();
        Assert.Throws<FileNotFoundException>(() => SafetensorsFile.Open(dir.File("absent.safetensors")));
    }

    [Test]
    public void Header_text_of_a_written_file_is_plain_UTF8()
    {
        using var dir = new TempDirectory();
        using var t = torch.zeros(1);
        SafetensorsWriter.Write(dir.File("x.safetensors"), [new("é", t)]);
        var bytes = File.ReadAllBytes(dir.File("x.safetensors"));
        Assert.That(Encoding.UTF8.GetString(bytes, 8, 6), Is.EqualTo("{\"é\":"));
    }
}
