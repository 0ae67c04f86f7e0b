using System.Text;
using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

/// <summary>Files built by hand, byte by byte, against the reader; the writer's bytes against hand-built expectations.</summary>
public class SafetensorsByteExactTests
{
    [Test]
    public void Reads_a_hand_built_file()
    {
        using var dir = new TempDirectory();
        // Header order differs from offset order on purpose: names come back in offset order.
        string header = SafetensorsBytes.Pad(
            "{\"b\":{\"dtype\":\"I16\",\"shape\":[3],\"data_offsets\":[16,22]}," +
            "\"__metadata__\":{\"format\":\"pt\"}," +
            "\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}");
        byte[] data = [.. SafetensorsBytes.LittleEndian(1f, 2f, -3.5f, 4f), .. SafetensorsBytes.LittleEndian(1, -2, 300)];
        File.WriteAllBytes(dir.File("h.safetensors"), SafetensorsBytes.Build(header, data));

        using var file = SafetensorsFile.Open(dir.File("h.safetensors"));
        Assert.That(file.TensorNames, Is.EqualTo(new[] { "w", "b" }));
        Assert.That(file.Metadata, Is.EquivalentTo(new Dictionary<string, string> { ["format"] = "pt" }));
        Assert.That(file.HeaderLength, Is.EqualTo(Encoding.UTF8.GetByteCount(header)));
        long dataStart = 8 + header.Length;
        Assert.That(file.GetInfo("w"), Is.EqualTo(new SafetensorsTensorInfo("w", ScalarType.Float32, [2, 2], dataStart, 16)));
        Assert.That(file.GetInfo("w").Shape, Is.EqualTo(new long[] { 2, 2 }));
        Assert.That(file.GetInfo("b").DataOffset, Is.EqualTo(dataStart + 16));
        Assert.That(file.GetInfo("b").ByteLength, Is.EqualTo(6));

        using var w = file.ReadTensor("w");
        using var b = file.ReadTensor("b");
        Assert.That(w.shape, Is.EqualTo(new long[] { 2, 2 }));
        Assert.That(w.data<float>().ToArray(), Is.EqualTo(new[] { 1f, 2f, -3.5f, 4f }));
        Assert.That(b.dtype, Is.EqualTo(ScalarType.Int16));
        Assert.That(b.data<short>().ToArray(), Is.EqualTo(new short[] { 1, -2, 300 }));
    }

    [Test]
    public void Reads_the_reference_crates_own_test_file()
    {
        // safetensors/src/tensor.rs test_deserialization: "test" I32 [2,2] of zeros, unpadded 60-byte header.
        using var dir = new TempDirectory();
        byte[] bytes = [(byte)'<', 0, 0, 0, 0, 0, 0, 0,
            .. "{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}"u8, .. new byte[16]];
        File.WriteAllBytes(dir.File("ref.safetensors"), bytes);
        using var file = SafetensorsFile.Open(dir.File("ref.safetensors"));
        using var t = file.ReadTensor("test");
        Assert.That(t.dtype, Is.EqualTo(ScalarType.Int32));
        Assert.That(t.data<int>().ToArray(), Is.EqualTo(new int[4]));
    }

    [Test]
    public void Writer_reproduces_the_reference_crates_serialization_test_vector()
    {
        // safetensors/src/tensor.rs test_serialization: "attn.0", F32, shape [1,2,3], values 0..5.
        byte[] expected =
        [
            64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
            116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
            58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
            101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
            0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64,
        ];
        using var dir = new TempDirectory();
        using var t = torch.tensor(new[] { 0f, 1, 2, 3, 4, 5 }, [1, 2, 3]);
        SafetensorsWriter.Write(dir.File("attn.safetensors"), [new("attn.0", t)]);
        Assert.That(File.ReadAllBytes(dir.File("attn.safetensors")), Is.EqualTo(expected));
    }

    [Test]
    public void Writer_reproduces_the_reference_empty_file_with_metadata()
    {
        // safetensors/src/tensor.rs test_empty: no tensors, metadata {"framework": "pt"}, padded with 5 spaces.
        byte[] expected =
        [
            40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
            95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
            116, 34, 125, 125, 32, 32, 32, 32, 32,
        ];
        using var dir = new TempDirectory();
        SafetensorsWriter.Write(dir.File("e.safetensors"), [], new Dictionary<string, string> { ["framework"] = "pt" });
        Assert.That(File.ReadAllBytes(dir.File("e.safetensors")), Is.EqualTo(expected));
    }

    [Test]
    public void Writer_sorts_by_dtype_rank_then_name_pads_the_header_and_puts_metadata_first()
    {
        using var dir = new TempDirectory();
        using var b = torch.tensor(new[] { 1f, 2f }, [2]);
        using var a = torch.tensor(new[] { 7L }, [1]);
        using var c = torch.tensor(new byte[] { 1, 2, 3 }, [3]);
        using var one = torch.ones([1], ScalarType.Float32);
        using var d = one.to(ScalarType.BFloat16);
        using var e = torch.tensor(new sbyte[] { -1 }, [1]);
        using var z = torch.tensor(new[] { 5L }, [1]);
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["a"] = "x" };
        SafetensorsWriter.Write(dir.File("s.safetensors"),
            [new("b", b), new("c", c), new("z", z), new("d", d), new("a", a), new("e", e)], metadata);

        // I64 (a, z), F32 (b), BF16 (d), I8 (e), U8 (c): the reference's Dtype enum order, descending.
        string header = SafetensorsBytes.Pad(
            "{\"__metadata__\":{\"a\":\"x\",\"format\":\"pt\"}," +
            "\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}," +
            "\"z\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[8,16]}," +
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}," +
            "\"d\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[24,26]}," +
            "\"e\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[26,27]}," +
            "\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[27,30]}}");
        byte[] data =
        [
            .. SafetensorsBytes.LittleEndian(7L, 5L), .. SafetensorsBytes.LittleEndian(1f, 2f),
            0x80, 0x3F, // bf16 1.0 = 0x3F80
            0xFF, // i8 -1
            1, 2, 3,
        ];
        byte[] expected = SafetensorsBytes.Build(header, data);
        Assert.That((header.Length + 8) % 8, Is.Zero, "precondition: padded header");
        Assert.That(Encoding.UTF8.GetString(File.ReadAllBytes(dir.File("s.safetensors")), 8, header.Length), Is.EqualTo(header));
        Assert.That(File.ReadAllBytes(dir.File("s.safetensors")), Is.EqualTo(expected));
    }

    [Test]
    public void Writer_compares_names_by_code_point_and_writes_non_ascii_unescaped()
    {
        // UTF-16 ordinal order puts the emoji (surrogates D83D DE00) before U+FF61; Rust's byte order does not.
        using var dir = new TempDirectory();
        using var x = torch.ones([1], ScalarType.Float32);
        using var y = torch.ones([1], ScalarType.Float32);
        const string emoji = "\U0001F600";
        const string halfwidth = "\uFF61";
        SafetensorsWriter.Write(dir.File("u.safetensors"), [new(emoji, x), new(halfwidth, y), new("q\"\\\n\u0001", x)]);

        string header = SafetensorsBytes.Pad(
            "{\"q\\\"\\\\\\n\\u0001\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}," +
            $"\"{halfwidth}\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}," +
            $"\"{emoji}\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}}}");
        byte[] expected = SafetensorsBytes.Build(header, SafetensorsBytes.LittleEndian(1f, 1f, 1f));
        Assert.That(File.ReadAllBytes(dir.File("u.safetensors")), Is.EqualTo(expected));

        using var file = SafetensorsFile.Open(dir.File("u.safetensors"));
        Assert.That(file.TensorNames, Is.EqualTo(new[] { "q\"\\\n\u0001", halfwidth, emoji }));
    }
}
