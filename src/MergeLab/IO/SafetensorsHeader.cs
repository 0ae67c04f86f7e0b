using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Unicode;
using static TorchSharp.torch;

namespace MergeLab.IO;

/// <summary>
/// The JSON header of a safetensors file: parsing with the reference reader's checks, and writing in
/// the reference writer's exact bytes (huggingface/safetensors <c>safetensors/src/tensor.rs</c>).
/// </summary>
internal sealed class SafetensorsHeader
{
    /// <summary>The key of the free-form string map in the header.</summary>
    public const string MetadataKey = "__metadata__";

    /// <summary>Bytes before the header: its length as a little-endian unsigned 64-bit integer.</summary>
    public const int SizePrefixBytes = 8;

    private SafetensorsHeader(IReadOnlyDictionary<string, string>? metadata, IReadOnlyList<Entry> entries)
    {
        Metadata = metadata;
        Entries = entries;
    }

    /// <summary>The <c>__metadata__</c> map; null when the header has none (or has <c>null</c>).</summary>
    public IReadOnlyDictionary<string, string>? Metadata { get; }

    /// <summary>The tensors, ordered by their offsets in the data buffer.</summary>
    public IReadOnlyList<Entry> Entries { get; }

    /// <summary>One tensor of the header. <paramref name="Begin"/> and <paramref name="End"/> are the
    /// <c>data_offsets</c>: relative to the start of the data buffer, end exclusive.</summary>
    internal readonly record struct Entry(string Name, ScalarType DType, long[] Shape, long Begin, long End)
    {
        public long ByteLength => End - Begin;
    }

    /// <summary>
    /// Parses and validates a header as the reference's <c>SafeTensors::read_metadata</c> does, with
    /// duplicate names refused as well (serde would keep the last one silently).
    /// </summary>
    /// <param name="json">The header bytes, padding included.</param>
    /// <param name="dataLength">The size of the data buffer: file size − 8 − header size.</param>
    /// <param name="path">The file, for messages.</param>
    public static SafetensorsHeader Parse(ReadOnlySpan<byte> json, long dataLength, string path)
    {
        if (!Utf8.IsValid(json))
        {
            throw new SafetensorsFormatException(path, "the header is not valid UTF-8.");
        }

        if (json.StartsWith("\uFEFF"u8))
        {
            // Utf8JsonReader skips a byte order mark; serde_json, like the JSON grammar, does not.
            throw new SafetensorsFormatException(path, "the header is not valid JSON: it starts with a UTF-8 byte order mark.");
        }

        List<Entry> entries;
        Dictionary<string, string>? metadata;
        try
        {
            // serde_json's recursion limit is 128; an unknown field may nest that deep.
            var reader = new Utf8JsonReader(json, new JsonReaderOptions { MaxDepth = 128 });
            (metadata, entries) = ReadHeaderObject(ref reader, path);
        }
        catch (JsonException ex)
        {
            throw new SafetensorsFormatException(path, $"the header is not valid JSON: {ex.Message}", ex);
        }
        catch (InvalidOperationException ex)
        {
            // GetString refuses an escaped lone surrogate ("\ud800"), which serde_json refuses too.
            throw new SafetensorsFormatException(path, $"the header is not valid JSON: {ex.Message}", ex);
        }

        foreach (var e in entries)
        {
            if (e.End > dataLength)
            {
                throw new SafetensorsFormatException(path,
                    $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] run past the end of the data buffer, which holds {dataLength} bytes.");
            }
        }

        // The reference sorts by (begin, end) and then requires each tensor to start where the previous
        // one ended, the first at 0 and the last ending at the end of the file: no overlaps, no holes, no
        // trailing bytes (its InvalidOffset and MetadataIncompleteBuffer errors).
        var ordered = entries
            .Select((e, i) => (Entry: e, Index: i))
            .OrderBy(x => x.Entry.Begin).ThenBy(x => x.Entry.End).ThenBy(x => x.Index)
            .Select(x => x.Entry)
            .ToList();
        long covered = 0;
        for (int i = 0; i < ordered.Count; i++)
        {
            var e = ordered[i];
            if (e.Begin < covered)
            {
                var previous = ordered[i - 1];
                throw new SafetensorsFormatException(path,
                    $"tensor '{e.Name}' (data_offsets [{e.Begin}, {e.End}]) overlaps tensor '{previous.Name}' (data_offsets [{previous.Begin}, {previous.End}]).");
            }

            if (e.Begin > covered)
            {
                throw new SafetensorsFormatException(path,
                    $"bytes [{covered}, {e.Begin}) of the data buffer belong to no tensor (the gap ends at tensor '{e.Name}'); the format requires the tensors to cover the data buffer without holes.");
            }

            covered = e.End;
        }

        if (covered != dataLength)
        {
            throw new SafetensorsFormatException(path,
                $"the tensors cover {covered} bytes but the data buffer holds {dataLength}; the format forbids bytes after the last tensor.");
        }

        return new SafetensorsHeader(metadata, ordered);
    }

    /// <summary>
    /// Writes the header as the reference's <c>prepare</c> does: compact JSON, <c>__metadata__</c>
    /// first when given, then the entries in the order given, each as
    /// <c>{"dtype":…,"shape":[…],"data_offsets":[b,e]}</c>, padded with spaces to a multiple of 8 bytes.
    /// Metadata keys are written in code-point order (the reference iterates a hash map, so its order
    /// is arbitrary; a fixed order makes output reproducible).
    /// </summary>
    public static byte[] Serialize(IReadOnlyDictionary<string, string>? metadata, IReadOnlyList<Entry> entries)
    {
        var sb = new StringBuilder();
        sb.Append('{');
        bool first = true;
        if (metadata is not null)
        {
            JsonText.AppendSerdeString(sb, MetadataKey);
            sb.Append(":{");
            bool firstKey = true;
            foreach (var key in metadata.Keys.OrderBy(k => k, CodePointComparer.Instance))
            {
                if (!firstKey)
                {
                    sb.Append(',');
                }

                firstKey = false;
                JsonText.AppendSerdeString(sb, key);
                sb.Append(':');
                JsonText.AppendSerdeString(sb, metadata[key]);
            }

            sb.Append('}');
            first = false;
        }

        foreach (var e in entries)
        {
            if (!first)
            {
                sb.Append(',');
            }

            first = false;
            JsonText.AppendSerdeString(sb, e.Name);
            sb.Append(":{\"dtype\":");
            JsonText.AppendSerdeString(sb, SafetensorsDType.ToName(e.DType));
            sb.Append(",\"shape\":[");
            sb.AppendJoin(',', e.Shape.Select(d => d.ToString(CultureInfo.InvariantCulture)));
            sb.Append("],\"data_offsets\":[");
            sb.Append(e.Begin.ToString(CultureInfo.InvariantCulture)).Append(',');
            sb.Append(e.End.ToString(CultureInfo.InvariantCulture)).Append("]}");
        }

        sb.Append('}');
        string json = sb.ToString();
        int length = JsonText.StrictUtf8.GetByteCount(json);
        int padded = checked((length + SizePrefixBytes - 1) / SizePrefixBytes * SizePrefixBytes);
        var bytes = new byte[padded];
        JsonText.StrictUtf8.GetBytes(json, bytes);
        bytes.AsSpan(length).Fill((byte)' ');
        return bytes;
    }

    private static (Dictionary<string, string>? Metadata, List<Entry> Entries) ReadHeaderObject(ref Utf8JsonReader reader, string path)
    {
        if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
        {
            throw new SafetensorsFormatException(path,
                $"the header is a JSON {Describe(reader.TokenType)}, but must be an object mapping tensor names to their dtype, shape and data_offsets.");
        }

        Dictionary<string, string>? metadata = null;
        bool sawMetadata = false;
        var entries = new List<Entry>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            string key = reader.GetString()!;
            reader.Read();
            if (key == MetadataKey)
            {
                if (sawMetadata)
                {
                    throw new SafetensorsFormatException(path, $"the header has '{MetadataKey}' twice.");
                }

                sawMetadata = true;
                metadata = ReadMetadata(ref reader, path);
            }
            else
            {
                if (!names.Add(key))
                {
                    throw new SafetensorsFormatException(path, $"the header names tensor '{key}' twice.");
                }

                entries.Add(ReadEntry(ref reader, key, path));
            }
        }

        // Anything but whitespace after the object makes the next Read throw a JsonException.
        while (reader.Read())
        {
        }

        return (metadata, entries);
    }

    private static Dictionary<string, string>? ReadMetadata(ref Utf8JsonReader reader, string path)
    {
        if (reader.TokenType == JsonTokenType.Null)
        {
            // The reference reads `__metadata__` as an Option, so null means "no metadata".
            return null;
        }

        if (reader.TokenType != JsonTokenType.StartObject)
        {
            throw new SafetensorsFormatException(path,
                $"'{MetadataKey}' is a JSON {Describe(reader.TokenType)}, but must be an object mapping strings to strings.");
        }

        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            string key = reader.GetString()!;
            reader.Read();
            if (reader.TokenType != JsonTokenType.String)
            {
                throw new SafetensorsFormatException(path,
                    $"'{MetadataKey}' entry '{key}' is a JSON {Describe(reader.TokenType)}, but metadata values must be strings.");
            }

            if (!metadata.TryAdd(key, reader.GetString()!))
            {
                throw new SafetensorsFormatException(path, $"'{MetadataKey}' has the key '{key}' twice.");
            }
        }

        return metadata;
    }

    private static Entry ReadEntry(ref Utf8JsonReader reader, string name, string path)
    {
        if (reader.TokenType != JsonTokenType.StartObject)
        {
            throw new SafetensorsFormatException(path,
                $"tensor '{name}': the entry is a JSON {Describe(reader.TokenType)}, but must be an object with dtype, shape and data_offsets.");
        }

        string? dtypeName = null;
        List<ulong>? shape = null;
        List<ulong>? offsets = null;
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            string field = reader.GetString()!;
            reader.Read();
            switch (field)
            {
                case "dtype":
                    RequireFirst(dtypeName is null, name, field, path);
                    if (reader.TokenType != JsonTokenType.String)
                    {
                        throw new SafetensorsFormatException(path,
                            $"tensor '{name}': dtype is a JSON {Describe(reader.TokenType)}, but must be a string such as \"F32\".");
                    }

                    dtypeName = reader.GetString()!;
                    break;
                case "shape":
                    RequireFirst(shape is null, name, field, path);
                    shape = ReadIntegerArray(ref reader, name, field, path);
                    break;
                case "data_offsets":
                    RequireFirst(offsets is null, name, field, path);
                    offsets = ReadIntegerArray(ref reader, name, field, path);
                    if (offsets.Count != 2)
                    {
                        throw new SafetensorsFormatException(path,
                            $"tensor '{name}': data_offsets is [{string.Join(", ", offsets)}], but must be [begin, end].");
                    }

                    break;
                default:
                    // The reference's TensorInfo does not deny unknown fields: serde skips them.
                    reader.Skip();
                    break;
            }
        }

        if (dtypeName is null || shape is null || offsets is null)
        {
            string missing = dtypeName is null ? "dtype" : shape is null ? "shape" : "data_offsets";
            throw new SafetensorsFormatException(path, $"tensor '{name}': the entry has no {missing}.");
        }

        return Validate(name, dtypeName, shape, offsets[0], offsets[1], path);
    }

    private static Entry Validate(string name, string dtypeName, List<ulong> shape, ulong begin, ulong end, string path)
    {
        if (!SafetensorsDType.TryParse(dtypeName, out var dtype))
        {
            throw new SafetensorsFormatException(path, SafetensorsDType.IsKnownUnsupported(dtypeName)
                ? $"tensor '{name}': dtype '{dtypeName}' is valid safetensors but not supported by MergeLab (TorchSharp has no matching element type)."
                : $"tensor '{name}': unknown dtype '{dtypeName}'.");
        }

        string shapeText = $"[{string.Join(", ", shape)}]";
        if (begin > end)
        {
            throw new SafetensorsFormatException(path, $"tensor '{name}': data_offsets [{begin}, {end}] end before they begin.");
        }

        // Same arithmetic as the reference's validate: fold the product left to right with overflow checks.
        long elements = 1;
        long bytes;
        try
        {
            foreach (ulong d in shape)
            {
                elements = checked(elements * checked((long)d));
            }

            bytes = checked(elements * SafetensorsDType.ElementSize(dtype));
        }
        catch (OverflowException)
        {
            throw new SafetensorsFormatException(path,
                $"tensor '{name}': shape {shapeText} of {dtypeName} has more bytes than a 64-bit size can count.");
        }

        // Beyond the reference: a tensor with a zero dimension holds no elements, but torch still lays
        // out its strides from the other dimensions (each at least 1), and refuses (with an error that is
        // not ours) when their product overflows. Such a shape describes no real tensor. (With no zero
        // dimension that product is the element count, already checked above.)
        if (elements == 0)
        {
            try
            {
                long layout = 1;
                foreach (ulong d in shape)
                {
                    layout = checked(layout * Math.Max(1, (long)d));
                }
            }
            catch (OverflowException)
            {
                throw new SafetensorsFormatException(path,
                    $"tensor '{name}': shape {shapeText} has no elements, but its non-zero dimensions multiply to more than a 64-bit size can count, so no tensor can have it.");
            }
        }

        if (end - begin != (ulong)bytes)
        {
            throw new SafetensorsFormatException(path,
                $"tensor '{name}': data_offsets [{begin}, {end}] span {end - begin} bytes, but shape {shapeText} of {dtypeName} needs {bytes}.");
        }

        if (end > long.MaxValue)
        {
            throw new SafetensorsFormatException(path,
                $"tensor '{name}': data_offsets [{begin}, {end}] run past the end of the data buffer.");
        }

        return new Entry(name, dtype, shape.Select(d => (long)d).ToArray(), (long)begin, (long)end);
    }

    private static void RequireFirst(bool first, string name, string field, string path)
    {
        if (!first)
        {
            throw new SafetensorsFormatException(path, $"tensor '{name}': the entry has {field} twice.");
        }
    }

    private static List<ulong> ReadIntegerArray(ref Utf8JsonReader reader, string name, string field, string path)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
        {
            throw new SafetensorsFormatException(path,
                $"tensor '{name}': {field} is a JSON {Describe(reader.TokenType)}, but must be an array of non-negative integers.");
        }

        var values = new List<ulong>();
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            var raw = reader.TokenType == JsonTokenType.Number ? reader.ValueSpan : default;
            if (reader.TokenType != JsonTokenType.Number)
            {
                throw new SafetensorsFormatException(path,
                    $"tensor '{name}': {field} holds a JSON {Describe(reader.TokenType)}, but must hold only non-negative integers.");
            }

            string text = Encoding.UTF8.GetString(raw);
            if (raw[0] == (byte)'-')
            {
                throw new SafetensorsFormatException(path, $"tensor '{name}': {field} holds the negative number {text}.");
            }

            // Plain digits only: serde reads these fields as usize, which refuses fractions and exponents.
            bool digits = true;
            foreach (byte b in raw)
            {
                digits &= b is >= (byte)'0' and <= (byte)'9';
            }

            if (!digits || !ulong.TryParse(raw, NumberStyles.None, CultureInfo.InvariantCulture, out ulong value))
            {
                throw new SafetensorsFormatException(path,
                    $"tensor '{name}': {field} holds {text}, which is not an integer in [0, 2^64).");
            }

            if (field == "shape" && value > long.MaxValue)
            {
                throw new SafetensorsFormatException(path, $"tensor '{name}': shape holds {text}, which is beyond 2^63-1.");
            }

            values.Add(value);
        }

        return values;
    }

    private static string Describe(JsonTokenType token) => token switch
    {
        JsonTokenType.StartObject => "object",
        JsonTokenType.StartArray => "array",
        JsonTokenType.String => "string",
        JsonTokenType.Number => "number",
        JsonTokenType.True or JsonTokenType.False => "boolean",
        JsonTokenType.Null => "null",
        _ => token.ToString(),
    };
}
