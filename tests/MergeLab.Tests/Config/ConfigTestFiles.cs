using System.Buffers.Binary;
using System.Text;

namespace MergeLab.Tests.Config;

/// <summary>A temporary folder holding empty "model" directories and config files, deleted afterwards.
/// The plan only checks that model paths exist, so empty directories stand in for checkpoints.</summary>
internal sealed class ConfigFolder : IDisposable
{
    public ConfigFolder(params string[] models)
    {
        Root = Path.Combine(Path.GetTempPath(), "mergelab-config-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Root);
        foreach (var m in models)
        {
            Model(m);
        }
    }

    public string Root { get; }

    /// <summary>Creates the model directory <paramref name="relative"/> under the root and returns its full path.</summary>
    public string Model(string relative)
    {
        var path = Path.Combine(Root, relative);
        Directory.CreateDirectory(path);
        return path;
    }

    /// <summary>Creates the model directory <paramref name="relative"/> with a <c>model.safetensors</c>
    /// holding one float32 scalar-vector per name (written byte by byte), and returns its full path.</summary>
    public string Checkpoint(string relative, IReadOnlyList<string> names)
    {
        var path = Model(relative);
        var entries = names.Select((n, i) => $"\"{n}\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{i * 4},{i * 4 + 4}]}}");
        var header = "{" + string.Join(",", entries) + "}";
        header = header.PadRight((header.Length + 7) / 8 * 8);
        var headerBytes = Encoding.UTF8.GetBytes(header);
        using var file = File.Create(Path.Combine(path, "model.safetensors"));
        Span<byte> size = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(size, (ulong)headerBytes.Length);
        file.Write(size);
        file.Write(headerBytes);
        file.Write(new byte[names.Count * 4]);
        return path;
    }

    /// <summary>Writes <paramref name="yaml"/> to <paramref name="relative"/> under the root and returns its full path.</summary>
    public string Write(string yaml, string relative = "merge.yml")
    {
        var path = Path.Combine(Root, relative);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllText(path, yaml);
        return path;
    }

    public void Dispose()
    {
        if (Directory.Exists(Root))
        {
            Directory.Delete(Root, recursive: true);
        }
    }
}

internal static class ConfigNames
{
    public const string Embed = "model.embed_tokens.weight";
    public const string Norm = "model.norm.weight";
    public const string Head = "lm_head.weight";

    public static string Mlp(int layer) => $"model.layers.{layer}.mlp.up_proj.weight";

    public static string Attn(int layer) => $"model.layers.{layer}.self_attn.q_proj.weight";

    /// <summary>The tensor names of a three-layer Llama-style checkpoint.</summary>
    public static IReadOnlyList<string> ThreeLayers { get; } =
        [Embed, Mlp(0), Attn(0), Mlp(1), Attn(1), Mlp(2), Attn(2), Norm, Head];
}
