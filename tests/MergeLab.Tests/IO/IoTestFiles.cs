using System.Buffers.Binary;
using System.Text;

namespace MergeLab.Tests.IO;

/// <summary>A fresh directory per test under the system temp folder, deleted with everything in it.</summary>
internal sealed class TempDirectory : IDisposable
{
    public TempDirectory()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "mergelab-io-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    /// <summary>The names of the files in the directory (hidden temporaries included), ordinal order.</summary>
    public string[] FileNames() =>
        Directory.EnumerateFiles(Path).Select(System.IO.Path.GetFileName).Order(StringComparer.Ordinal).ToArray()!;

    public void Dispose()
    {
        if (Directory.Exists(Path))
        {
            Directory.Delete(Path, recursive: true);
        }
    }
}

/// <summary>Builds safetensors files byte by byte, independently of the code under test.</summary>
internal static class SafetensorsBytes
{
    /// <summary>8-byte little-endian size of <paramref name="header"/> (or <paramref name="declaredSize"/>),
    /// the header's UTF-8 bytes as given (no padding added), then <paramref name="data"/>.</summary>
    public static byte[] Build(string header, byte[] data, ulong? declaredSize = null) =>
        Build(Encoding.UTF8.GetBytes(header), data, declaredSize);

    public static byte[] Build(byte[] header, byte[] data, ulong? declaredSize = null)
    {
        var bytes = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, declaredSize ?? (ulong)header.Length);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        return bytes;
    }

    /// <summary>The header padded with spaces as the reference writer pads it: to a multiple of 8 bytes.</summary>
    public static string Pad(string header)
    {
        int length = Encoding.UTF8.GetByteCount(header);
        return header + new string(' ', (8 - length % 8) % 8);
    }

    public static byte[] LittleEndian(params float[] values) =>
        values.SelectMany(v => { var b = new byte[4]; BinaryPrimitives.WriteSingleLittleEndian(b, v); return b; }).ToArray();

    public static byte[] LittleEndian(params short[] values) =>
        values.SelectMany(v => { var b = new byte[2]; BinaryPrimitives.WriteInt16LittleEndian(b, v); return b; }).ToArray();

    public static byte[] LittleEndian(params long[] values) =>
        values.SelectMany(v => { var b = new byte[8]; BinaryPrimitives.WriteInt64LittleEndian(b, v); return b; }).ToArray();
}
