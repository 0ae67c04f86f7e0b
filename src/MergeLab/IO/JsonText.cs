using System.Globalization;
using System.Text;

namespace MergeLab.IO;

/// <summary>
/// The two JSON spellings checkpoint files are written in, reproduced byte for byte: serde_json's
/// compact form (safetensors headers) and Python's <c>json.dumps</c> defaults (transformers' index files).
/// </summary>
internal static class JsonText
{
    /// <summary>UTF-8 that refuses lone surrogates instead of writing U+FFFD, which would silently rename a tensor.</summary>
    public static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>
    /// Appends <paramref name="value"/> as serde_json writes a string: only <c>"</c>, <c>\</c> and
    /// control characters are escaped (short forms for \b \t \n \f \r, otherwise <c>\u00xx</c> in lower
    /// case); everything else, non-ASCII included, is written as is (serde_json <c>ser.rs</c> <c>ESCAPE</c>).
    /// </summary>
    public static void AppendSerdeString(StringBuilder sb, string value)
    {
        sb.Append('"');
        foreach (char c in value)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\b': sb.Append("\\b"); break;
                case '\t': sb.Append("\\t"); break;
                case '\n': sb.Append("\\n"); break;
                case '\f': sb.Append("\\f"); break;
                case '\r': sb.Append("\\r"); break;
                default:
                    if (c < 0x20)
                    {
                        sb.Append("\\u00").Append(((int)c).ToString("x2", CultureInfo.InvariantCulture));
                    }
                    else
                    {
                        sb.Append(c);
                    }

                    break;
            }
        }

        sb.Append('"');
    }

    /// <summary>
    /// Appends <paramref name="value"/> as Python's <c>json.dumps</c> writes a string with its default
    /// <c>ensure_ascii=True</c>: printable ASCII as is, short escapes for \b \t \n \f \r, and every other
    /// UTF-16 code unit as <c>\uxxxx</c> in lower case.
    /// </summary>
    public static void AppendPythonString(StringBuilder sb, string value)
    {
        sb.Append('"');
        foreach (char c in value)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\b': sb.Append("\\b"); break;
                case '\t': sb.Append("\\t"); break;
                case '\n': sb.Append("\\n"); break;
                case '\f': sb.Append("\\f"); break;
                case '\r': sb.Append("\\r"); break;
                default:
                    if (c < 0x20 || c > 0x7E)
                    {
                        sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    }
                    else
                    {
                        sb.Append(c);
                    }

                    break;
            }
        }

        sb.Append('"');
    }

    /// <summary>Whether <paramref name="value"/> is well-formed UTF-16 (no lone surrogates), i.e. can be written as UTF-8.</summary>
    public static bool IsWellFormed(string value)
    {
        for (int i = 0; i < value.Length; i++)
        {
            if (char.IsHighSurrogate(value[i]) && i + 1 < value.Length && char.IsLowSurrogate(value[i + 1]))
            {
                i++;
            }
            else if (char.IsSurrogate(value[i]))
            {
                return false;
            }
        }

        return true;
    }
}

/// <summary>
/// Orders strings by Unicode code point, which is the byte order of their UTF-8 encodings: the order
/// of Rust's <c>str</c> (the safetensors writer) and of Python's <c>str</c> (<c>sort_keys=True</c>).
/// <see cref="StringComparer.Ordinal"/> differs from it only for characters above U+FFFF, which UTF-16
/// stores as surrogates that sort below U+E000..U+FFFF.
/// </summary>
internal sealed class CodePointComparer : IComparer<string>
{
    public static readonly CodePointComparer Instance = new();

    public int Compare(string? x, string? y)
    {
        if (ReferenceEquals(x, y))
        {
            return 0;
        }

        if (x is null)
        {
            return -1;
        }

        if (y is null)
        {
            return 1;
        }

        var a = x.EnumerateRunes();
        var b = y.EnumerateRunes();
        while (true)
        {
            bool hasA = a.MoveNext();
            bool hasB = b.MoveNext();
            if (!hasA || !hasB)
            {
                return hasA.CompareTo(hasB);
            }

            int c = a.Current.Value.CompareTo(b.Current.Value);
            if (c != 0)
            {
                return c;
            }
        }
    }
}
