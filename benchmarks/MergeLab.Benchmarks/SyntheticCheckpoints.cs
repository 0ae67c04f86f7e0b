using System.Globalization;
using System.Text.Json;
using MergeLab.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>The shapes of a Llama-style decoder (the tensors a Hugging Face checkpoint holds).</summary>
/// <param name="Name">The size name used on the command line.</param>
public sealed record LlamaShape(string Name, int Vocab, int Hidden, int Intermediate, int Layers, int Heads, int KeyValueHeads)
{
    /// <summary>The sizes <c>generate --params</c> knows: TinyLlama-1.1B's layout for 1B, Llama-2-7B's for 7B.</summary>
    public static IReadOnlyList<LlamaShape> Known { get; } =
    [
        new("tiny", 1024, 256, 688, 2, 8, 4),
        new("100M", 32000, 768, 2048, 8, 12, 4),
        new("1B", 32000, 2048, 5632, 22, 32, 4),
        new("7B", 32000, 4096, 11008, 32, 32, 32),
    ];

    /// <summary>Every tensor in Hugging Face's order: embeddings, the layers, the final norm, the head.</summary>
    public IEnumerable<(string Name, long[] Shape)> Tensors()
    {
        int headDim = Hidden / Heads;
        int kv = KeyValueHeads * headDim;
        yield return ("model.embed_tokens.weight", [Vocab, Hidden]);
        for (int l = 0; l < Layers; l++)
        {
            string p = $"model.layers.{l}.";
            yield return (p + "self_attn.q_proj.weight", [Hidden, Hidden]);
            yield return (p + "self_attn.k_proj.weight", [kv, Hidden]);
            yield return (p + "self_attn.v_proj.weight", [kv, Hidden]);
            yield return (p + "self_attn.o_proj.weight", [Hidden, Hidden]);
            yield return (p + "mlp.gate_proj.weight", [Intermediate, Hidden]);
            yield return (p + "mlp.up_proj.weight", [Intermediate, Hidden]);
            yield return (p + "mlp.down_proj.weight", [Hidden, Intermediate]);
            yield return (p + "input_layernorm.weight", [Hidden]);
            yield return (p + "post_attention_layernorm.weight", [Hidden]);
        }

        yield return ("model.norm.weight", [Hidden]);
        yield return ("lm_head.weight", [Vocab, Hidden]);
    }

    public long Parameters => Tensors().Sum(t => t.Shape.Aggregate(1L, (a, b) => a * b));

    /// <summary>A transformers <c>config.json</c> for this shape.</summary>
    public string ConfigJson() => JsonSerializer.Serialize(new Dictionary<string, object>
    {
        ["architectures"] = new[] { "LlamaForCausalLM" },
        ["model_type"] = "llama",
        ["hidden_size"] = Hidden,
        ["intermediate_size"] = Intermediate,
        ["num_hidden_layers"] = Layers,
        ["num_attention_heads"] = Heads,
        ["num_key_value_heads"] = KeyValueHeads,
        ["vocab_size"] = Vocab,
        ["rms_norm_eps"] = 1e-5,
        ["torch_dtype"] = "bfloat16",
        ["tie_word_embeddings"] = false,
    }, Indented);

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };
}

/// <summary>
/// <c>generate --out DIR --params 1B --models 4 --seed 1 [--shard-size 1GB]</c>: writes a synthetic base
/// model (<c>DIR/base</c>) and fine-tuned experts (<c>DIR/expert-1</c> …) in bfloat16, sharded safetensors
/// with an index and a config.json, from a seed. Base weights are N(0, 0.02²) (norm weights 1); each expert
/// adds a dense N(0, 0.001²) delta. Every tensor comes from its own generator seeded by (seed, model,
/// tensor), so the files depend on the seed alone.
/// </summary>
public static class SyntheticCheckpoints
{
    public static int Run(string[] args)
    {
        var options = Args.Parse(args, "generate", ["out", "params", "models", "seed", "shard-size"], []);
        string output = options.Get("out") ?? throw new UsageException("generate needs --out DIR.");
        var shape = options.Shape();
        int experts = options.Models();
        long seed = options.Long("seed", 1);
        long shardBytes = Args.Bytes(options.Get("shard-size") ?? "1GB");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var dirs = Generate(output, shape, experts, seed, shardBytes);
        long bytes = dirs.Sum(d => Directory.GetFiles(d).Sum(f => new FileInfo(f).Length));
        Console.WriteLine($"Wrote {dirs.Count} checkpoints of {Count(shape.Parameters)} parameters ({shape.Name}, bfloat16) to {output}: " +
            $"{bytes / 1e9:F2} GB in {sw.Elapsed.TotalSeconds:F1} s.");
        return 0;
    }

    /// <summary>A parameter count in billions, or in millions below one billion (the tiny shape has about 2M).</summary>
    private static string Count(long parameters) =>
        parameters >= 1_000_000_000 ? $"{parameters / 1e9:F2}B" : $"{parameters / 1e6:F2}M";

    /// <summary>Writes the base and <paramref name="experts"/> experts; returns their directories.</summary>
    public static IReadOnlyList<string> Generate(string output, LlamaShape shape, int experts, long seed, long shardBytes)
    {
        torch.set_num_threads(2);
        var dirs = new List<string> { Path.Combine(output, "base") };
        dirs.AddRange(Enumerable.Range(1, experts).Select(k => Path.Combine(output, $"expert-{k}")));
        var layout = shape.Tensors().Select(t => new PlannedTensor(t.Name, ScalarType.BFloat16, t.Shape)).ToArray();
        var writers = new List<PlannedCheckpointWriter>();
        try
        {
            foreach (var dir in dirs)
            {
                Directory.CreateDirectory(dir);
                File.WriteAllText(Path.Combine(dir, "config.json"), shape.ConfigJson());
                writers.Add(new PlannedCheckpointWriter(dir, layout, shardBytes));
            }

            int index = 0;
            foreach (var (name, dims) in shape.Tensors())
            {
                using var scope = NewDisposeScope();
                bool norm = dims.Length == 1;
                using var baseGenerator = new Generator(Seed(seed, 0, index));
                var baseValues = norm ? ones(dims) : randn(dims, generator: baseGenerator).mul_(0.02);
                writers[0].Write(name, baseValues.to(ScalarType.BFloat16));
                for (int k = 1; k < dirs.Count; k++)
                {
                    using var g = new Generator(Seed(seed, k, index));
                    using var expert = (baseValues + randn(dims, generator: g).mul_(0.001)).to(ScalarType.BFloat16);
                    writers[k].Write(name, expert);
                }

                index++;
            }

            foreach (var w in writers)
            {
                w.Complete();
            }
        }
        finally
        {
            foreach (var w in writers)
            {
                w.Dispose();
            }
        }

        return dirs;
    }

    private static ulong Seed(long seed, int model, int tensor) =>
        (ulong)seed * 0x9E3779B97F4A7C15UL ^ ((ulong)model << 40) ^ (ulong)tensor * 0xBF58476D1CE4E5B9UL;
}

/// <summary>A mistake in a benchmark command's arguments: reported with the usage, not as a crash.</summary>
public sealed class UsageException : Exception
{
    public UsageException()
    {
    }

    public UsageException(string message)
        : base(message)
    {
    }

    public UsageException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>Minimal <c>--name value</c> parsing for the non-BenchmarkDotNet commands: each command names
/// the options that take a value and the flags it knows; anything else is a <see cref="UsageException"/>.</summary>
internal sealed class Args
{
    private readonly Dictionary<string, string?> _values = new(StringComparer.Ordinal);

    public static Args Parse(string[] args, string command, IReadOnlyCollection<string> values, IReadOnlyCollection<string> flags)
    {
        var result = new Args();
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal))
            {
                throw new UsageException($"Unexpected argument '{args[i]}'.");
            }

            string name = args[i][2..];
            if (flags.Contains(name))
            {
                result._values[name] = null;
            }
            else if (values.Contains(name))
            {
                if (i + 1 >= args.Length || args[i + 1].StartsWith("--", StringComparison.Ordinal))
                {
                    throw new UsageException($"--{name} needs a value.");
                }

                result._values[name] = args[++i];
            }
            else
            {
                throw new UsageException($"{command} has no option '--{name}'.");
            }
        }

        return result;
    }

    public string? Get(string name) => _values.TryGetValue(name, out var v) ? v : null;

    public bool Has(string name) => _values.ContainsKey(name);

    /// <summary>The integer option <c>--name</c>, or <paramref name="fallback"/> when it is absent.</summary>
    public long Long(string name, long fallback) =>
        Get(name) is not { } text ? fallback
        : long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out long value) ? value
        : throw new UsageException($"--{name} must be an integer, not '{text}'.");

    /// <summary><c>--models</c>: how many experts (default 4, at least 1).</summary>
    public int Models()
    {
        long models = Long("models", 4);
        return models is >= 1 and <= int.MaxValue ? (int)models : throw new UsageException($"--models must be at least 1, not {models}.");
    }

    /// <summary><c>--params</c>: one of <see cref="LlamaShape.Known"/> by name (default 1B).</summary>
    public LlamaShape Shape()
    {
        string name = Get("params") ?? "1B";
        return LlamaShape.Known.FirstOrDefault(s => s.Name.Equals(name, StringComparison.OrdinalIgnoreCase))
            ?? throw new UsageException($"--params must be one of {string.Join(", ", LlamaShape.Known.Select(s => s.Name))}, not '{name}'.");
    }

    /// <summary>"1GB", "500MB", "0.5GB", "123" (bytes): at least one byte.</summary>
    public static long Bytes(string text)
    {
        string upper = text.Trim().ToUpperInvariant();
        long unit = upper.EndsWith("GB", StringComparison.Ordinal) ? 1_000_000_000 : upper.EndsWith("MB", StringComparison.Ordinal) ? 1_000_000 : 1;
        return double.TryParse(unit == 1 ? upper : upper[..^2], NumberStyles.Float | NumberStyles.AllowThousands, CultureInfo.InvariantCulture, out double value)
            && value * unit >= 1 && value * unit < long.MaxValue
            ? (long)(value * unit)
            : throw new UsageException($"A size must be a positive number of bytes, MB or GB (e.g. 1GB or 500MB), not '{text}'.");
    }
}
