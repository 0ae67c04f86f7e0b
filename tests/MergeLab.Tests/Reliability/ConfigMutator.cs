using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Makes hostile merge configs from valid ones: character edits, hostile YAML tokens at random places
/// (anchors, aliases, tags such as <c>!!python/object</c>, flow brackets, block scalars, directives,
/// document markers, odd numbers), line edits, and generated attacks: deep nesting in flow and block
/// style, alias bombs ("billion laughs"), self-referencing aliases, enormous key counts, huge scalars,
/// lone surrogates and control characters.
/// </summary>
internal static class ConfigMutator
{
    /// <summary>Valid configs over the models <c>base</c>, <c>math</c> and <c>code</c>, one per method and syntax.</summary>
    public static IReadOnlyList<string> Seeds { get; } =
    [
        """
        models:
          - model: math
            parameters: {weight: 1.0, density: [0.2, 0.8]}
          - model: code
            parameters: {weight: 0.5, density: 0.5}
        base_model: base
        merge_method: ties
        parameters: {normalize: true, lambda: 1.0, int8_mask: true}
        dtype: bfloat16
        """,
        """
        models:
          - model: math
            parameters:
              weight: 1
          - model: code
            parameters:
              weight:
                - filter: mlp
                  value: 0.5
                - value: 1.5
        merge_method: linear
        out_dtype: float32
        tokenizer_source: math
        """,
        """
        merge_method: dare_ties
        base_model: base
        models:
          - model: {model: math}
            parameters: {weight: 0.7, density: 0.9}
          - model: {model: {path: code}}
            parameters: {weight: 0.3, density: [0.5, 0.7, 0.9]}
        parameters: {rescale: true, lambda: 1.2}
        """,
        """
        merge_method: breadcrumbs_ties
        base_model: ./base
        models:
          - model: ./math
            parameters: {weight: 1, density: 0.8, gamma: 0.02}
          - model: ./code
            parameters: {weight: 1, density: 0.9, gamma: 0.01}
        """,
        """
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: math
          - model: code
        parameters:
          weight: [1, 0.5]
          lambda: 0.8
          normalize: no
        """,
        """
        merge_method: pcb
        base_model: base
        models: [{model: math}, {model: code}]
        parameters: {ratio: 0.2, clamp_low: 0.001, clamp_high: 0.001, lambda: 1}
        """,
        """
        merge_method: ties_paper
        base_model: base
        models:
          - model: math
            parameters: {density: 0.3}
          - model: code
        parameters: {lambda: 1}
        tokenizer_source: base
        """,
        """
        # anchors and aliases used the way people do
        merge_method: ties
        base_model: base
        models:
          - model: math
            parameters: &w {weight: 1.0, density: 0.5}
          - model: code
            parameters: *w
        """,
    ];

    private static readonly string[] Tokens =
    [
        "&a ", "*a", "*undefined", "!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!str ",
        "!!int ", "!!float ", "!!map ", "!!seq ", "!custom ", "!<tag:yaml.org,2002:str> ", "? ", ": ", "- ", "[", "]", "{", "}",
        ",", "\"", "'", "|", ">", "|-", ">+", "#", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:evil.com:\n", "\t", "\r", "\r\n",
        "\u0000", "\uFEFF", "\ud800", "\udc00", "\u2028", "é", "😀", ".nan", ".inf", "-.inf", "1e400", "-0", "0x10", "0o17",
        "1_000", "123456789012345678901234567890", "~", "null", "yes", "On", "<<: *a", "<<: {weight: 1}", "\\", "%", "@", "`",
    ];

    /// <summary>A mutated config made from one of the seeds, or a generated attack.</summary>
    public static FuzzCase Next(Random r)
    {
        int seed = r.Next(Seeds.Count);
        string yaml = Seeds[seed];
        var recipe = new StringBuilder($"seed {seed}");
        if (r.Next(8) == 0)
        {
            yaml = Attack(r, yaml, recipe);
        }
        else
        {
            int count = 1 + r.Next(3);
            for (int m = 0; m < count; m++)
            {
                yaml = Mutate(r, yaml, recipe);
            }
        }

        return FuzzCase.Single("input.yaml", Encode(yaml), recipe.ToString());
    }

    /// <summary>UTF-8, or, when the text holds a lone surrogate that UTF-8 cannot carry, UTF-16LE
    /// with a byte order mark (so a saved regression file keeps the exact text).</summary>
    public static byte[] Encode(string yaml)
    {
        try
        {
            return new UTF8Encoding(false, throwOnInvalidBytes: true).GetBytes(yaml);
        }
        catch (EncoderFallbackException)
        {
            return [0xFF, 0xFE, .. MemoryMarshal.AsBytes(yaml.AsSpan())];
        }
    }

    /// <summary>The text of a file written by <see cref="Encode"/>.</summary>
    public static string Decode(byte[] bytes) =>
        bytes is [0xFF, 0xFE, ..] ? new string(MemoryMarshal.Cast<byte, char>(bytes.AsSpan(2))) : Encoding.UTF8.GetString(bytes);

    /// <summary>Whether the text is plain UTF-8 (so it can also be loaded from a file).</summary>
    public static bool IsUtf8(byte[] bytes) => bytes is not [0xFF, 0xFE, ..];

    private static string Mutate(Random r, string yaml, StringBuilder recipe)
    {
        if (yaml.Length == 0)
        {
            return "a: b";
        }

        int at = r.Next(yaml.Length);
        switch (r.Next(7))
        {
            case 0:
            case 1:
            {
                string token = Tokens[r.Next(Tokens.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", insert {Show(token)} at {at}");
                return yaml.Insert(at, token);
            }

            case 2:
            {
                int length = Math.Min(yaml.Length - at, 1 + r.Next(10));
                recipe.Append(CultureInfo.InvariantCulture, $", delete [{at}, {at + length})");
                return yaml.Remove(at, length);
            }

            case 3:
            {
                char c = (char)r.Next(0x20, 0x7F);
                recipe.Append(CultureInfo.InvariantCulture, $", set {at} to {Show(c.ToString())}");
                return yaml[..at] + c + yaml[(at + 1)..];
            }

            case 4:
            {
                var lines = yaml.Split('\n').ToList();
                int line = r.Next(lines.Count);
                switch (r.Next(4))
                {
                    case 0:
                        lines.Insert(line, lines[line]);
                        recipe.Append(CultureInfo.InvariantCulture, $", repeat line {line}");
                        break;
                    case 1:
                        lines.RemoveAt(line);
                        recipe.Append(CultureInfo.InvariantCulture, $", remove line {line}");
                        break;
                    case 2:
                        lines[line] = new string(' ', 1 + r.Next(4)) + lines[line];
                        recipe.Append(CultureInfo.InvariantCulture, $", indent line {line}");
                        break;
                    default:
                        lines[line] = lines[line].TrimStart();
                        recipe.Append(CultureInfo.InvariantCulture, $", dedent line {line}");
                        break;
                }

                return string.Join('\n', lines);
            }

            case 5:
            {
                // Replace a value (after ": ") with an interesting one.
                int colon = yaml.IndexOf(": ", at, StringComparison.Ordinal);
                if (colon < 0)
                {
                    goto case 0;
                }

                int end = yaml.IndexOfAny([',', '}', '\n'], colon + 2);
                end = end < 0 ? yaml.Length : end;
                string[] values =
                [
                    "-1", "0", "1e-300", "1e300", "2", "100", ".nan", ".inf", "NaN", "[]", "{}", "[0.1]", "[1, .nan]", "''", "\"\"",
                    "[[1]]", "{filter: x}", "{value: 1}", "[{filter: mlp, value: [1, 2]}]", "[{value: {filter: a, value: 1}}]",
                    "true", "null", "~", "/", "/etc/passwd", "../../..", "base", "math", "'base'", "!!binary aGVsbG8=",
                    "\"\\u0000\"", "\"\\ud800\"", "fp8", "torch.bfloat16", "union",
                ];
                string value = values[r.Next(values.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", value at {colon} -> {Show(value)}");
                return yaml[..(colon + 2)] + value + yaml[end..];
            }

            default:
            {
                // Rename a key to another known (or unknown) one.
                string[] keys = ["models", "model", "parameters", "base_model", "merge_method", "dtype", "out_dtype", "tokenizer_source",
                    "weight", "density", "gamma", "lambda", "normalize", "rescale", "ratio", "filter", "value", "slices", "tokenizer", "path", "lora"];
                string from = keys[r.Next(keys.Length)];
                string to = keys[r.Next(keys.Length)];
                int i = yaml.IndexOf(from + ":", StringComparison.Ordinal);
                if (i < 0)
                {
                    goto case 0;
                }

                recipe.Append(CultureInfo.InvariantCulture, $", key {from} -> {to}");
                return yaml[..i] + to + yaml[(i + from.Length)..];
            }
        }
    }

    private static string Attack(Random r, string yaml, StringBuilder recipe)
    {
        switch (r.Next(9))
        {
            case 0:
            {
                int depth = new[] { 50, 64, 65, 1000, 100_000 }[r.Next(5)];
                recipe.Append(CultureInfo.InvariantCulture, $", flow nesting {depth} deep");
                return yaml + "\nparameters: {weight: " + new string('[', depth) + "1" + new string(']', depth) + "}\n";
            }

            case 1:
            {
                int depth = new[] { 50, 64, 65, 1000, 100_000 }[r.Next(5)];
                var sb = new StringBuilder(yaml).Append("\nextra:\n");
                if (depth <= 1000)
                {
                    // Indented block mappings and sequences, one level per line.
                    for (int i = 0; i < depth; i++)
                    {
                        sb.Append(' ', i + 1).Append(i % 2 == 0 ? "- " : "k: ").Append('\n');
                    }
                }
                else
                {
                    // Compact block sequences nest on one line: "- - - x".
                    sb.Append("  ").Insert(sb.Length, "- ", depth).Append("x\n");
                }

                recipe.Append(CultureInfo.InvariantCulture, $", block nesting {depth} deep");
                return sb.ToString();
            }

            case 2:
            {
                // Billion laughs: each level is ten aliases of the one before.
                int levels = new[] { 3, 9, 30 }[r.Next(3)];
                var sb = new StringBuilder("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
                for (int i = 1; i < levels; i++)
                {
                    sb.Append(CultureInfo.InvariantCulture, $"l{i}: &l{i} [")
                        .AppendJoin(", ", Enumerable.Repeat($"*l{i - 1}", 10)).Append("]\n");
                }

                string last = $"*l{levels - 1}";
                string target = r.Next(3) switch
                {
                    0 => yaml.Replace("weight: 1.0", "weight: " + last, StringComparison.Ordinal).Replace("weight: 1,", "weight: " + last + ",", StringComparison.Ordinal),
                    1 => yaml.Replace("models:", "models: " + last + "\nunused:", StringComparison.Ordinal),
                    _ => yaml + "\nparameters: " + last + "\n",
                };
                recipe.Append(CultureInfo.InvariantCulture, $", billion laughs with {levels} levels");
                return sb + target;
            }

            case 3:
            {
                string[] recursive = ["&r [*r]", "&r {a: *r}", "&r [1, [2, *r]]", "&r {model: *r}", "&r [{filter: x, value: *r}]"];
                string value = recursive[r.Next(recursive.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", self-referencing alias {value}");
                return r.Next(2) == 0
                    ? yaml.Replace("weight: 0.5", "weight: " + value, StringComparison.Ordinal).Replace("base_model: base", "base_model: " + value, StringComparison.Ordinal)
                    : yaml.Replace("models:", "models: " + value + "\nunused:", StringComparison.Ordinal);
            }

            case 4:
            {
                int n = new[] { 1000, 50_000 }[r.Next(2)];
                var sb = new StringBuilder(yaml).Append("\nparameters:\n");
                for (int i = 0; i < n; i++)
                {
                    sb.Append(CultureInfo.InvariantCulture, $"  p{i}: {i}\n");
                }

                recipe.Append(CultureInfo.InvariantCulture, $", {n} parameter keys");
                return sb.ToString();
            }

            case 5:
            {
                int n = new[] { 10_000, 2_000_000 }[r.Next(2)];
                recipe.Append(CultureInfo.InvariantCulture, $", a {n}-character scalar");
                return yaml.Replace("base_model: base", "base_model: " + new string('b', n), StringComparison.Ordinal)
                    .Replace("merge_method: ties", "merge_method: " + new string('t', n), StringComparison.Ordinal);
            }

            case 6:
            {
                int n = new[] { 1000, 100_000 }[r.Next(2)];
                recipe.Append(CultureInfo.InvariantCulture, $", a {n}-point gradient");
                string points = string.Join(", ", Enumerable.Range(0, n).Select(i => (i % 10 / 10.0).ToString(CultureInfo.InvariantCulture)));
                return yaml.Replace("weight: 0.5", "weight: [" + points + "]", StringComparison.Ordinal)
                    .Replace("density: 0.5", "density: [" + points + "]", StringComparison.Ordinal);
            }

            case 7:
            {
                int n = new[] { 100, 5000 }[r.Next(2)];
                recipe.Append(CultureInfo.InvariantCulture, $", {n} models");
                var sb = new StringBuilder(yaml.Replace("models:", "models:\n" +
                    string.Concat(Enumerable.Range(0, n).Select(i => $"  - model: m{i}\n    parameters: {{weight: 1}}\n")), StringComparison.Ordinal));
                return sb.ToString();
            }

            default:
            {
                string[] whole = ["", "---", "...", "~", "[]", "- a", "'x'", "!!python/object:os.system {}", "--- a\n--- b", "%YAML 1.2\n---\n{}",
                    "a: b\r\nb: c", "\uFEFFmerge_method: ties", "merge_method: ties\u0000", "{merge_method: ties, models: [{model: math}], base_model: base}",
                    "? [a, b]\n: c", "models: &m [{model: math, parameters: {weight: 1}}]\nmerge_method: linear\nbase_model: *m"];
                string value = whole[r.Next(whole.Length)];
                recipe.Append(CultureInfo.InvariantCulture, $", whole config {Show(value)}");
                return value;
            }
        }
    }

    private static string Show(string s)
    {
        var sb = new StringBuilder();
        foreach (char c in s.Length > 40 ? s[..40] : s)
        {
            sb.Append(c < 0x20 || char.IsSurrogate(c) || c == '\uFEFF' ? $"\\u{(int)c:x4}" : c.ToString());
        }

        return "«" + sb + "»";
    }
}
