using MergeLab.IO;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.IO;

public class SafetensorsRoundTripTests
{
    /// <summary>One tensor per supported dtype, with values at the edges of each type's range.</summary>
    private static IEnumerable<(string Name, Func<Tensor> Make)> EveryDType()
    {
        yield return ("f64", () => torch.tensor(new[] { 1.5, -0.0, double.MaxValue, double.Epsilon, double.NaN, double.NegativeInfinity }, [2, 3]));
        yield return ("f32", () => torch.tensor(new[] { 1.5f, -0.0f, float.MaxValue, float.Epsilon, float.NaN, 1e-3f }, [3, 2]));
        yield return ("f16", () => Cast(new[] { 1.5f, -2f, 65504f, 6e-8f, float.PositiveInfinity, 0.1f }, ScalarType.Float16));
        yield return ("bf16", () => Cast(new[] { 1.5f, -2f, 3.3895e38f, 1e-38f, float.NegativeInfinity, 0.1f }, ScalarType.BFloat16));
        yield return ("i64", () => torch.tensor(new[] { long.MinValue, -1L, 0L, long.MaxValue }, [4]));
        yield return ("i32", () => torch.tensor(new[] { int.MinValue, -1, 0, int.MaxValue }, [2, 2]));
        yield return ("i16", () => torch.tensor(new short[] { short.MinValue, -1, 0, short.MaxValue }, [1, 4]));
        yield return ("i8", () => torch.tensor(new sbyte[] { sbyte.MinValue, -1, 0, sbyte.MaxValue }, [4, 1]));
        yield return ("u8", () => torch.tensor(new byte[] { 0, 1, 128, 255 }, [2, 2]));
        yield return ("bool", () => torch.tensor(new[] { true, false, false, true, true }, [5]));
    }

    private static Tensor Cast(float[] values, ScalarType type)
    {
        using var f = torch.tensor(values, [2, 3]);
        return f.to(type);
    }

    [Test]
    public void Every_dtype_round_trips_exactly()
    {
        using var dir = new TempDirectory();
        var made = EveryDType().Select(d => (d.Name, Tensor: d.Make())).ToList();
        try
        {
            SafetensorsWriter.Write(dir.File("all.safetensors"), made.Select(m => new KeyValuePair<string, Tensor>(m.Name, m.Tensor)));
            using var file = SafetensorsFile.Open(dir.File("all.safetensors"));
            Assert.That(file.TensorNames, Is.EquivalentTo(made.Select(m => m.Name)));
            foreach (var (name, expected) in made)
            {
                using var actual = file.ReadTensor(name);
                T.BitEqual(actual, expected, name);
                Assert.That(file.GetInfo(name).DType, Is.EqualTo(expected.dtype));
            }
        }
        finally
        {
            made.ForEach(m => m.Tensor.Dispose());
        }
    }

    [Test]
    public void Dtype_names_map_to_scalar_types_with_element_sizes()
    {
        var expected = new (string Name, ScalarType Type, int Size)[]
        {
            ("F64", ScalarType.Float64, 8), ("F32", ScalarType.Float32, 4), ("F16", ScalarType.Float16, 2),
            ("BF16", ScalarType.BFloat16, 2), ("I64", ScalarType.Int64, 8), ("I32", ScalarType.Int32, 4),
            ("I16", ScalarType.Int16, 2), ("I8", ScalarType.Int8, 1), ("U8", ScalarType.Byte, 1), ("BOOL", ScalarType.Bool, 1),
        };
        foreach (var (name, type, size) in expected)
        {
            Assert.That(SafetensorsDType.TryParse(name, out var parsed), Is.True, name);
            Assert.That(parsed, Is.EqualTo(type));
            Assert.That(SafetensorsDType.ToName(type), Is.EqualTo(name));
            Assert.That(SafetensorsDType.ElementSize(type), Is.EqualTo(size));
        }

        Assert.That(SafetensorsDType.TryParse("f32", out _), Is.False, "names are case-sensitive");
        Assert.That(SafetensorsDType.IsSupported(ScalarType.ComplexFloat32), Is.False);
        Assert.Throws<ArgumentException>(() => SafetensorsDType.ToName(ScalarType.ComplexFloat64));
    }

    [Test]
    public void Metadata_round_trips_and_absence_is_distinguished_from_empty()
    {
        using var dir = new TempDirectory();
        using var t = torch.ones(2);
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "merged \"with\" ties\n", ["ünï"] = "☃" };
        SafetensorsWriter.Write(dir.File("m.safetensors"), [new("t", t)], metadata);
        SafetensorsWriter.Write(dir.File("none.safetensors"), [new("t", t)]);
        SafetensorsWriter.Write(dir.File("empty.safetensors"), [new("t", t)], new Dictionary<string, string>());

        using var m = SafetensorsFile.Open(dir.File("m.safetensors"));
        using var none = SafetensorsFile.Open(dir.File("none.safetensors"));
        using var empty = SafetensorsFile.Open(dir.File("empty.safetensors"));
        Assert.That(m.Metadata, Is.EquivalentTo(metadata));
        Assert.That(m.HasMetadata, Is.True);
        Assert.That(none.HasMetadata, Is.False);
        Assert.That(none.Metadata, Is.Empty);
        Assert.That(empty.HasMetadata, Is.True);
        Assert.That(empty.Metadata, Is.Empty);
    }

    [Test]
    public void Scalars_empty_tensors_and_non_contiguous_views_round_trip()
    {
        using var dir = new TempDirectory();
        using var scalar = torch.tensor(3.25f);
        using var empty = torch.zeros([2, 0, 3], ScalarType.Int32);
        using var matrix = torch.arange(12, ScalarType.Float32).reshape(3, 4);
        using var transposed = matrix.t();
        Assert.That(transposed.is_contiguous(), Is.False, "precondition");
        SafetensorsWriter.Write(dir.File("x.safetensors"), [new("scalar", scalar), new("empty", empty), new("transposed", transposed)]);

        using var file = SafetensorsFile.Open(dir.File("x.safetensors"));
        using var s = file.ReadTensor("scalar");
        using var e = file.ReadTensor("empty");
        using var t = file.ReadTensor("transposed");
        T.BitEqual(s, scalar, "scalar");
        T.BitEqual(e, empty, "empty");
        T.BitEqual(t, transposed, "transposed");
        Assert.That(file.GetInfo("scalar").Shape, Is.Empty);
        Assert.That(file.GetInfo("empty").ByteLength, Is.Zero);
    }

    [Test]
    public void Reads_and_writes_split_into_chunks_keep_every_byte()
    {
        // The chunk sizes are not multiples of the element sizes, and smaller than some elements.
        using var dir = new TempDirectory();
        using var line = torch.linspace(-1, 1, 91, ScalarType.Float64);
        using var a = line.reshape(7, 13);
        using var b = torch.arange(1001, ScalarType.Int16);
        SafetensorsWriter.Write(dir.File("c.safetensors"), [new("a", a), new("b", b)], null, chunkBytes: 37);
        using var file = SafetensorsFile.Open(dir.File("c.safetensors"));
        foreach (int chunk in new[] { 1, 5, 64, 1 << 20 })
        {
            using var ra = file.ReadTensor("a", null, chunk);
            using var rb = file.ReadTensor("b", null, chunk);
            T.BitEqual(ra, a, $"a in {chunk}-byte chunks");
            T.BitEqual(rb, b, $"b in {chunk}-byte chunks");
        }
    }

    [Test]
    public void Reads_can_check_for_nan_and_infinity_chunk_by_chunk_as_they_go()
    {
        // The merge engine's NaN/±∞ check runs on each chunk right after it is read: a value in the last
        // chunk, in a middle one, or none; float16 is not checked there (null: checked afterwards).
        using var dir = new TempDirectory();
        using var clean = torch.linspace(-3, 3, 3000, ScalarType.Float32).reshape(3, 1000);
        using var lastNaN = clean.clone();
        lastNaN[2, 999] = float.NaN;
        using var middleInf = clean.to(ScalarType.BFloat16);
        middleInf[1, 500] = float.PositiveInfinity;
        using var half = clean.to(ScalarType.Float16);
        SafetensorsWriter.Write(dir.File("f.safetensors"), [new("clean", clean), new("last", lastNaN), new("middle", middleInf), new("half", half)]);
        using var file = SafetensorsFile.Open(dir.File("f.safetensors"));
        foreach (int chunk in new[] { 8, 1 << 20 })
        {
            foreach (var (name, expected, source) in new (string, bool?, Tensor)[] { ("clean", true, clean), ("last", false, lastNaN), ("middle", false, middleInf), ("half", null, half) })
            {
                using var read = file.ReadTensor(name, null, chunk, checkFinite: true, out var finite);
                Assert.That(finite, Is.EqualTo(expected), $"{name} in {chunk}-byte chunks");
                T.BitEqual(read, source, $"{name} in {chunk}-byte chunks");
            }

            using var plain = file.ReadTensor("last", null, chunk, checkFinite: false, out var notChecked);
            Assert.That(notChecked, Is.Null);
        }
    }

    [Test]
    public void ReadAll_returns_every_tensor_in_file_order_on_the_requested_device()
    {
        using var dir = new TempDirectory();
        using var a = torch.ones([2], ScalarType.Float32);
        using var b = torch.ones([2], ScalarType.Int64);
        SafetensorsWriter.Write(dir.File("x.safetensors"), [new("a", a), new("b", b)]);
        using var file = SafetensorsFile.Open(dir.File("x.safetensors"));
        using var all = file.ReadAll(torch.CPU);
        Assert.That(all.Names, Is.EqualTo(new[] { "b", "a" }), "I64 is written before F32");
        T.BitEqual(all["a"], a);
        T.BitEqual(all["b"], b);
    }

    [Test]
    public void Missing_tensor_names_the_tensor_and_the_file()
    {
        using var dir = new TempDirectory();
        using var a = torch.ones(1);
        SafetensorsWriter.Write(dir.File("x.safetensors"), [new("a", a)]);
        using var file = SafetensorsFile.Open(dir.File("x.safetensors"));
        Assert.That(file.Contains("nope"), Is.False);
        Assert.That(file.TryGetInfo("nope", out _), Is.False);
        var ex = Assert.Throws<KeyNotFoundException>(() => file.ReadTensor("nope"));
        Assert.That(ex!.Message, Does.Contain("'nope'").And.Contain("x.safetensors"));
    }
}
