using System.Buffers.Binary;
using System.Globalization;
using System.Numerics;
using System.Text;
using System.Text.RegularExpressions;
using MergeLab.IO;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Makes hostile safetensors files from valid ones: bit flips, byte stores, truncations, appended
/// bytes, forged header sizes, and edits to the JSON header (numbers in shapes and offsets, dtype
/// strings, shapes with huge, negative, fractional or many dimensions, duplicated and removed entries,
/// metadata of the wrong type, deep nesting, enormous headers, escapes, lone surrogates, a byte order
/// mark). Several mutations may stack on one input.
/// </summary>
internal static partial class SafetensorsMutator
{
    /// <summary>Valid files, written by <see cref="SafetensorsWriter"/>, plus hand-made valid headers that
    /// the writer would not produce (unknown fields, no padding, whitespace, escaped names).</summary>
    public static IReadOnlyList<byte[]> Seeds { get; } = BuildSeeds();

    private static readonly string[] DTypeNames =
    [
        "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
        "f32", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64", "F4", "", "F32 ", "FLOAT32",
        "\\u0046\\u0033\\u0032", "\\u0000", "F\\ud800", new string('F', 5000),
    ];

    private static readonly string[] InterestingNumbers =
    [
        "0", "1", "2", "3", "4", "7", "8", "15", "16", "255", "256", "65535", "65536",
        "2147483647", "2147483648", "4294967295", "4294967296", "9007199254740993",
        "4611686018427387904", "9223372036854775807", "9223372036854775808", "18446744073709551615",
        "18446744073709551616", "99999999999999999999999999999", "-1", "-0", "-9223372036854775808",
        "1.0", "0.5", "1e2", "1E+2", "4e0", "0x10", "01", "\"4\"", "null", "true", "[]", "{}", "NaN", "Infinity",
    ];

    private static readonly string[] InterestingShapes =
    [
        "[]", "[0]", "[1]", "[0,0]", "[2,2]", "[-1]", "[1,-1]", "[1.0]", "[\"2\"]", "[null]", "[[1]]", "null", "{}", "3",
        "[4611686018427387904,4611686018427387904]", "[0,9223372036854775807,9223372036854775807]",
        "[0,4611686018427387904,4611686018427387904,4611686018427387904]", "[9223372036854775807]",
        "[18446744073709551615]", "[4294967296,4294967296]", "[0,18446744073709551615]",
        "[" + string.Join(",", Enumerable.Repeat("1", 64)) + "]",
        "[" + string.Join(",", Enumerable.Repeat("1", 1000)) + "]",
        "[0," + string.Join(",", Enumerable.Repeat("2", 200)) + "]",
    ];

    private static readonly byte[] InterestingBytes =
        [0, 1, 0x7F, 0x80, 0xFF, (byte)'"', (byte)'\\', (byte)'{', (byte)'}', (byte)'[', (byte)']', (byte)',', (byte)':', (byte)'-', (byte)'9', (byte)' ', 0xC0, 0xED];

    private static readonly ulong[] InterestingSizes =
    [
        0, 1, 2, 7, 8, 16, 100_000_000, 100_000_001, int.MaxValue, (ulong)int.MaxValue + 1, uint.MaxValue,
        (ulong)uint.MaxValue + 1, long.MaxValue, (ulong)long.MaxValue + 1, ulong.MaxValue,
    ];

    /// <summary>A mutated file made from one of the seeds by 1–3 mutations.</summary>
    public static FuzzCase Next(Random r)
    {
        int seed = r.Next(Seeds.Count);
        byte[] bytes = Seeds[seed];
        var recipe = new StringBuilder($"seed {seed}");
        int count = 1 + (r.Next(4) == 0 ? r.Next(3) : 0);
        for (int m = 0; m < count; m++)
        {
            bytes = Mutate(r, bytes, recipe);
        }

        return FuzzCase.Single("input.safetensors", bytes, recipe.ToString());
    }

    /// <summary>Applies one random mutation and appends its name to <paramref name="recipe"/>.</summary>
    public static byte[] Mutate(Random r, byte[] bytes, StringBuilder recipe)
    {
        var (header, data) = Split(bytes);
        int choice = r.Next(100);
        if (header is null || choice < 30)
        {
            return MutateBytes(r, bytes, header?.Length ?? 0, recipe);
        }

        string json;
        try
        {
            json = JsonText.StrictUtf8.GetString(header);
        }
        catch (DecoderFallbackException)
        {
            return MutateBytes(r, bytes, header.Length, recipe);
        }

        string edited = json.Length < 2 ? json + "{}" : MutateJson(r, json, recipe);
        byte[] newHeader = Encoding.UTF8.GetBytes(edited);
        if (r.Next(3) == 0 || edited.StartsWith("{\"t\":", StringComparison.Ordinal))
        {
            // Regrow the data to what the header's offsets ask for, so consistent edits load.
            data = Regrow(r, edited, data);
            recipe.Append("+regrow");
        }

        if (r.Next(2) == 0)
        {
            newHeader = Encoding.UTF8.GetBytes(edited.PadRight(edited.Length + (8 - newHeader.Length % 8) % 8));
        }

        ulong declared = r.Next(10) == 0 ? (ulong)header.Length : (ulong)newHeader.Length;
        return Build(declared, newHeader, data);
    }

    private static byte[] MutateBytes(Random r, byte[] bytes, int headerLength, StringBuilder recipe)
    {
        var b = (byte[])bytes.Clone();
        int prefixAndHeader = Math.Min(b.Length, 8 + headerLength);
        int Position() => b.Length == 0 ? 0 : r.Next(3) > 0 && prefixAndHeader > 0 ? r.Next(prefixAndHeader) : r.Next(b.Length);
        switch (r.Next(7))
        {
            case 0 when b.Length > 0:
                int flips = 1 + r.Next(8);
                recipe.Append(CultureInfo.InvariantCulture, $", flip {flips} bit(s)");
                for (int i = 0; i < flips; i++)
                {
                    b[Position()] ^= (byte)(1 << r.Next(8));
                }

                return b;
            case 1 when b.Length > 0:
                int at = Position();
                b[at] = InterestingBytes[r.Next(InterestingBytes.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", byte {at} = 0x{b[at]:X2}");
                return b;
            case 2:
                int length = r.Next(3) switch
                {
                    0 => r.Next(Math.Min(b.Length, 16) + 1),
                    1 => Math.Max(0, b.Length - 1 - r.Next(16)),
                    _ => r.Next(b.Length + 1),
                };
                recipe.Append(CultureInfo.InvariantCulture, $", truncate to {length}");
                return b[..length];
            case 3:
                var extra = new byte[1 + r.Next(64)];
                if (r.Next(2) == 0)
                {
                    r.NextBytes(extra);
                }

                recipe.Append(CultureInfo.InvariantCulture, $", append {extra.Length}");
                return [.. b, .. extra];
            case 4 when b.Length >= 8:
                ulong size = r.Next(3) switch
                {
                    0 => InterestingSizes[r.Next(InterestingSizes.Length)],
                    1 => (ulong)Math.Max(0, headerLength + r.Next(-9, 10)),
                    _ => (ulong)r.NextInt64(),
                };
                BinaryPrimitives.WriteUInt64LittleEndian(b, size);
                recipe.Append(CultureInfo.InvariantCulture, $", header size = {size}");
                return b;
            case 5 when b.Length > 8 + headerLength:
                // Garble tensor data: the file stays valid and must read back exactly.
                int start = 8 + headerLength + r.Next(b.Length - 8 - headerLength);
                var garbage = b.AsSpan(start, Math.Min(b.Length - start, 1 + r.Next(32)));
                r.NextBytes(garbage);
                recipe.Append(CultureInfo.InvariantCulture, $", garble data at {start}");
                return b;
            default:
                int cut = Position();
                int remove = Math.Min(b.Length - cut, 1 + r.Next(8));
                recipe.Append(CultureInfo.InvariantCulture, $", delete {remove} at {cut}");
                return [.. b.AsSpan(0, cut), .. b.AsSpan(cut + remove)];
        }
    }

    private static string MutateJson(Random r, string json, StringBuilder recipe)
    {
        switch (r.Next(13))
        {
            case 12:
            {
                // One entry whose offsets agree with its dtype and shape (the data is regrown to fit), so
                // odd shapes get past the size checks: zero-size tensors with huge dimensions, many
                // dimensions, scalars.
                var dtypes = new[] { "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL" };
                string dtype = dtypes[r.Next(dtypes.Length)];
                string shape = r.Next(2) == 0 ? RandomShape(r) : InterestingShapes[r.Next(InterestingShapes.Length)];
                var dims = ShapeDims(shape);
                if (dims is null)
                {
                    goto case 2;
                }

                BigInteger bytes = dims.Aggregate(BigInteger.One, (a, d) => a * d) * ElementSize(dtype);
                string end = bytes < BigInteger.Pow(2, 64) ? bytes.ToString(CultureInfo.InvariantCulture) : "18446744073709551615";
                recipe.Append(CultureInfo.InvariantCulture, $", only {dtype} {Short(shape)}");
                return $"{{\"t\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[0,{end}]}}}}";
            }

            case 0:
            {
                var numbers = NumberToken().Matches(json);
                if (numbers.Count == 0)
                {
                    goto default;
                }

                var m = numbers[r.Next(numbers.Count)];
                string value = InterestingNumbers[r.Next(InterestingNumbers.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", number {m.Value} -> {value}");
                return json[..m.Index] + value + json[(m.Index + m.Length)..];
            }

            case 1:
            {
                var dtypes = DTypeField().Matches(json);
                if (dtypes.Count == 0)
                {
                    goto default;
                }

                var m = dtypes[r.Next(dtypes.Count)];
                string value = DTypeNames[r.Next(DTypeNames.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", dtype -> \"{Short(value)}\"");
                return json[..m.Groups[1].Index] + value + json[(m.Groups[1].Index + m.Groups[1].Length)..];
            }

            case 2:
            {
                var shapes = ShapeField().Matches(json);
                if (shapes.Count == 0)
                {
                    goto default;
                }

                var m = shapes[r.Next(shapes.Count)];
                string value = r.Next(4) == 0 ? RandomShape(r) : InterestingShapes[r.Next(InterestingShapes.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", shape -> {Short(value)}");
                return json[..m.Groups[1].Index] + value + json[(m.Groups[1].Index + m.Groups[1].Length)..];
            }

            case 3:
            {
                var offsets = OffsetsField().Matches(json);
                if (offsets.Count == 0)
                {
                    goto default;
                }

                var m = offsets[r.Next(offsets.Count)];
                string[] variants =
                [
                    "[0]", "[0,0,0]", "[]", "null", "[0,0]", "[4,0]", "[18446744073709551615,18446744073709551615]",
                    "[9223372036854775807,9223372036854775807]", "[0,18446744073709551615]", "[-0,4]", "[0,4.0]",
                    offsets[r.Next(offsets.Count)].Groups[1].Value,
                ];
                string value = variants[r.Next(variants.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", data_offsets -> {value}");
                return json[..m.Groups[1].Index] + value + json[(m.Groups[1].Index + m.Groups[1].Length)..];
            }

            case 4:
            {
                // Duplicate an entry, under its own name or a new one.
                var entries = Entry().Matches(json);
                if (entries.Count == 0)
                {
                    goto default;
                }

                var m = entries[r.Next(entries.Count)];
                string copy = r.Next(2) == 0 ? m.Value : "\"copy" + r.Next(100) + m.Value[m.Value.IndexOf('"', 1)..];
                recipe.Append(", duplicate entry");
                return json.Insert(m.Index, copy + ",");
            }

            case 5:
            {
                var entries = Entry().Matches(json);
                if (entries.Count == 0)
                {
                    goto default;
                }

                var m = entries[r.Next(entries.Count)];
                recipe.Append(", remove entry");
                string rest = json[(m.Index + m.Length)..];
                return json[..m.Index] + (rest.StartsWith(',') ? rest[1..] : rest);
            }

            case 6:
            {
                string[] metadata =
                [
                    "null", "{}", "[]", "\"x\"", "1", "{\"a\":1}", "{\"a\":\"b\",\"a\":\"c\"}", "{\"a\":null}",
                    "{\"a\":{\"b\":\"c\"}}", "{\"\\ud800\":\"x\"}", "{\"format\":\"pt\"}",
                ];
                string value = metadata[r.Next(metadata.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", __metadata__ = {value}");
                return InsertMember(json, $"\"__metadata__\":{value}");
            }

            case 7:
            {
                int depth = new[] { 10, 127, 128, 129, 1000, 100_000 }[r.Next(6)];
                string nested = r.Next(2) == 0
                    ? new string('[', depth) + new string(']', depth)
                    : string.Concat(Enumerable.Repeat("{\"a\":", depth)) + "0" + new string('}', depth);
                recipe.Append(CultureInfo.InvariantCulture, $", nested {depth} deep");
                var entries = Entry().Matches(json);
                if (entries.Count > 0 && r.Next(2) == 0)
                {
                    // An unknown field inside an entry, which the reader skips.
                    var m = entries[r.Next(entries.Count)];
                    int brace = json.IndexOf('{', m.Index + 1);
                    return json.Insert(brace + 1, $"\"extra\":{nested},");
                }

                return InsertMember(json, $"\"deep\":{nested}");
            }

            case 8:
            {
                // An enormous header: many zero-size tensors (valid) or long names.
                int n = new[] { 100, 1000, 20_000 }[r.Next(3)];
                var sb = new StringBuilder();
                string name = r.Next(2) == 0 ? "t" : new string('n', 200);
                for (int i = 0; i < n; i++)
                {
                    sb.Append(CultureInfo.InvariantCulture, $"\"{name}{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}},");
                }

                recipe.Append(CultureInfo.InvariantCulture, $", {n} extra zero-size entries");
                return json.Insert(1, sb.ToString());
            }

            case 9:
            {
                string[] names =
                [
                    "\"\"", "\"__metadata__\"", "\"\\ud800\"", "\"\\udc00\\ud800\"", "\"\\u0000\"", "\"a\\\"b\"", "\"\\/\"",
                    "\"" + new string('x', 100_000) + "\"", "\"é\"", "\"\\u00e9\"", "\"😀\"", "\"\\ud83d\\ude00\"",
                ];
                var entries = Entry().Matches(json);
                if (entries.Count == 0)
                {
                    goto default;
                }

                var m = entries[r.Next(entries.Count)];
                int nameEnd = m.Value.IndexOf("\":", StringComparison.Ordinal) + 1;
                string value = names[r.Next(names.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", rename to {Short(value)}");
                return json[..m.Index] + value + json[(m.Index + nameEnd)..];
            }

            case 10:
            {
                string[] wrappers = ["\uFEFF{0}", "{0} x", "{0}}}", "[{0}]", " \t\r\n{0}", "{0}\u0000", "\"{0}\"", "{0},"];
                string format = wrappers[r.Next(wrappers.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", wrap as {Short(format)}");
                return format.Replace("{0}", json, StringComparison.Ordinal);
            }

            default:
            {
                // Delete or duplicate a random span of the JSON text.
                if (json.Length < 2)
                {
                    return json + "}";
                }

                int start = r.Next(json.Length);
                int length = Math.Min(json.Length - start, 1 + r.Next(12));
                bool delete = r.Next(2) == 0;
                recipe.Append(CultureInfo.InvariantCulture, $", {(delete ? "delete" : "repeat")} text [{start}, {start + length})");
                return delete ? json.Remove(start, length) : json.Insert(start, json.Substring(start, length));
            }
        }
    }

    private static string RandomShape(Random r)
    {
        int rank = r.Next(6);
        var dims = Enumerable.Range(0, rank).Select(_ => r.Next(4) switch
        {
            0 => "0",
            1 => r.Next(1, 5).ToString(CultureInfo.InvariantCulture),
            2 => r.NextInt64().ToString(CultureInfo.InvariantCulture),
            _ => InterestingNumbers[r.Next(InterestingNumbers.Length)],
        });
        return "[" + string.Join(",", dims) + "]";
    }

    /// <summary>The dimensions of a shape that is a JSON array of non-negative integers, else null.</summary>
    private static BigInteger[]? ShapeDims(string shape)
    {
        string inner = shape.Trim();
        if (!inner.StartsWith('[') || !inner.EndsWith(']'))
        {
            return null;
        }

        inner = inner[1..^1];
        if (inner.Length == 0)
        {
            return [];
        }

        var dims = new List<BigInteger>();
        foreach (var part in inner.Split(','))
        {
            if (!BigInteger.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out var d))
            {
                return null;
            }

            dims.Add(d);
        }

        return [.. dims];
    }

    private static int ElementSize(string dtype) => dtype switch
    {
        "F64" or "I64" => 8,
        "F32" or "I32" => 4,
        "F16" or "BF16" or "I16" => 2,
        _ => 1,
    };

    private static string InsertMember(string json, string member)
    {
        int brace = json.IndexOf('{', StringComparison.Ordinal);
        if (brace < 0)
        {
            return "{" + member + "}";
        }

        bool empty = json.AsSpan(brace + 1).TrimStart().StartsWith("}");
        return json.Insert(brace + 1, empty ? member : member + ",");
    }

    /// <summary>Resizes <paramref name="data"/> to the largest end offset the header names (up to 1 MiB).</summary>
    private static byte[] Regrow(Random r, string json, byte[] data)
    {
        long end = 0;
        foreach (Match m in OffsetsField().Matches(json))
        {
            var parts = m.Groups[1].Value.Trim('[', ']').Split(',');
            if (parts.Length == 2 && long.TryParse(parts[1], NumberStyles.None, CultureInfo.InvariantCulture, out long e))
            {
                end = Math.Max(end, e);
            }
        }

        if (end > 1 << 20)
        {
            return data;
        }

        var grown = new byte[end];
        data.AsSpan(0, (int)Math.Min(end, data.Length)).CopyTo(grown);
        r.NextBytes(grown.AsSpan(Math.Min((int)end, data.Length)));
        return grown;
    }

    /// <summary>The header and data of a file whose size prefix is consistent; (null, whole file) otherwise.</summary>
    internal static (byte[]? Header, byte[] Data) Split(byte[] bytes)
    {
        if (bytes.Length < 8)
        {
            return (null, bytes);
        }

        ulong size = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        if (size > (ulong)(bytes.Length - 8))
        {
            return (null, bytes);
        }

        return (bytes[8..(8 + (int)size)], bytes[(8 + (int)size)..]);
    }

    internal static byte[] Build(ulong declaredSize, byte[] header, byte[] data)
    {
        var bytes = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, declaredSize);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        return bytes;
    }

    private static string Short(string s) => s.Length > 40 ? s[..20] + $"…({s.Length} chars)" : s;

    private static List<byte[]> BuildSeeds()
    {
        var seeds = new List<byte[]>();
        string dir = Path.Combine(Path.GetTempPath(), "mergelab-fuzz-seeds-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            byte[] Write(IReadOnlyDictionary<string, string>? metadata, params (string Name, Tensor Tensor)[] tensors)
            {
                string path = Path.Combine(dir, "seed.safetensors");
                try
                {
                    SafetensorsWriter.Write(path, tensors.Select(t => new KeyValuePair<string, Tensor>(t.Name, t.Tensor)), metadata);
                    return File.ReadAllBytes(path);
                }
                finally
                {
                    foreach (var (_, t) in tensors)
                    {
                        t.Dispose();
                    }
                }
            }

            var pt = new Dictionary<string, string> { ["format"] = "pt" };
            seeds.Add(Write(pt, ("weight", arange(6, ScalarType.Float32).reshape(2, 3))));
            seeds.Add(Write(pt,
                ("layers.0.bf16", randn([4, 4]).to(ScalarType.BFloat16)),
                ("layers.0.f16", randn([3]).to(ScalarType.Float16)),
                ("ids", arange(2, ScalarType.Int64)),
                ("mask", tensor(new[] { true, false, true, true, false })),
                ("empty", empty([0], ScalarType.Byte)),
                ("scalar", tensor(3.5)),
                ("cube", ones([2, 2, 2], ScalarType.Int8)),
                ("i16", arange(3, ScalarType.Int16)),
                ("i32", arange(5, ScalarType.Int32))));
            seeds.Add(Write(new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcödé \"quoted\"" },
                ("layers.0.ß", ones([2])), ("emoji😀", zeros([1, 1])), ("a\"b\\c", ones([1], ScalarType.Float64))));
            seeds.Add(Write(null, Enumerable.Range(0, 40).Select(i => ($"model.layers.{i}.weight", full([2, 2], i, ScalarType.Float32))).ToArray()));
            seeds.Add(Write(null, ("zero_dims", empty([3, 0, 2], ScalarType.Float32)), ("one", ones([1], ScalarType.BFloat16))));

            // Valid files the writer would not produce.
            seeds.Add(Valid("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":{\"x\":[1,2,{}]}}}", new byte[4]));
            seeds.Add(Valid(" { \"a\" : { \"data_offsets\" : [ 0 , 8 ] , \"shape\" : [ 2 ] , \"dtype\" : \"I32\" } , \"__metadata__\" : null } ", new byte[8]));
            seeds.Add(Valid("{\"\\u0061\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},\"b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[3,4]}}", [1, 2, 3, 4]));
            seeds.Add(Valid("{}", []));
            return seeds;
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>A file with <paramref name="header"/> as given (no padding) and a consistent size prefix.</summary>
    private static byte[] Valid(string header, byte[] data)
    {
        byte[] h = Encoding.UTF8.GetBytes(header);
        return Build((ulong)h.Length, h, data);
    }

    [GeneratedRegex(@"(?<=[\[,]\s*)-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")]
    private static partial Regex NumberToken();

    [GeneratedRegex("\"dtype\"\\s*:\\s*\"([^\"]*)\"")]
    private static partial Regex DTypeField();

    [GeneratedRegex("\"shape\"\\s*:\\s*(\\[[^\\]]*\\])")]
    private static partial Regex ShapeField();

    [GeneratedRegex("\"data_offsets\"\\s*:\\s*(\\[[^\\]]*\\])")]
    private static partial Regex OffsetsField();

    [GeneratedRegex("\"(?:[^\"\\\\]|\\\\.)*\"\\s*:\\s*\\{[^{}]*\\}")]
    private static partial Regex Entry();
}
