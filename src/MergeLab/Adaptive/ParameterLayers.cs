using System.Globalization;

namespace MergeLab.Adaptive;

/// <summary>
/// How parameter names group into layers, for methods that learn or apply one coefficient per layer
/// (<see cref="AdaMerging"/> layer-wise, <see cref="Lines"/>).
/// </summary>
public static class ParameterLayers
{
    /// <summary>
    /// The default layer of a parameter: its name up to the last dot, i.e. the module that owns it
    /// (<c>blocks.2.weight</c> and <c>blocks.2.bias</c> → <c>blocks.2</c>); a name without a dot is its
    /// own layer.
    /// </summary>
    public static string ModulePrefix(string parameterName)
    {
        ArgumentException.ThrowIfNullOrEmpty(parameterName);
        int dot = parameterName.LastIndexOf('.');
        return dot <= 0 ? parameterName : parameterName[..dot];
    }

    /// <summary>
    /// The residual-block index of a parameter as the LiNeS reference finds it
    /// (<c>wang-kee/LiNeS</c>, <c>src/eval/eval.py::LiNeS_scaling</c>): the first i in 0, 1, …,
    /// <paramref name="blockCount"/> − 1 such that <c>.{i}.</c> occurs in the name; null when none does
    /// (embeddings, final norms, heads).
    /// </summary>
    public static int? BlockIndex(string parameterName, int blockCount)
    {
        ArgumentException.ThrowIfNullOrEmpty(parameterName);
        int? first = null;
        foreach (int n in NumberedComponents(parameterName))
        {
            if (n < blockCount && (first is null || n < first))
            {
                first = n;
            }
        }

        return first;
    }

    /// <summary>The number of blocks implied by the names: one more than the largest integer n such
    /// that <c>.n.</c> occurs in some name; 0 when no name has a numbered component.</summary>
    /// <exception cref="ArgumentException">A name numbers a block <see cref="int.MaxValue"/>, so the count
    /// would not be an <see cref="int"/>.</exception>
    public static int InferBlockCount(IEnumerable<string> parameterNames)
    {
        ArgumentNullException.ThrowIfNull(parameterNames);
        int max = -1;
        foreach (var name in parameterNames)
        {
            foreach (int n in NumberedComponents(name))
            {
                if (n == int.MaxValue)
                {
                    throw new ArgumentException($"'{name}' numbers a block {n}, so the names imply no block count; give the count (LinesOptions.BlockCount).", nameof(parameterNames));
                }

                max = Math.Max(max, n);
            }
        }

        return max + 1;
    }

    /// <summary>Each n such that <c>.n.</c> occurs in <paramref name="name"/>: its interior dot-separated
    /// components that are an <see cref="int"/> written in decimal without sign or leading zeros.</summary>
    private static IEnumerable<int> NumberedComponents(string name)
    {
        var parts = name.Split('.');
        for (int i = 1; i < parts.Length - 1; i++)
        {
            var part = parts[i];
            if (int.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out int n) && (part.Length == 1 || part[0] != '0'))
            {
                yield return n;
            }
        }
    }

    /// <summary>Groups <paramref name="names"/> by <paramref name="layerOf"/>, layers in order of first
    /// appearance, names in their given order within each layer.</summary>
    internal static (IReadOnlyList<string> Layers, int[] LayerOfName) Group(IReadOnlyList<string> names, Func<string, string> layerOf)
    {
        var layers = new List<string>();
        var index = new Dictionary<string, int>(StringComparer.Ordinal);
        var layerOfName = new int[names.Count];
        for (int i = 0; i < names.Count; i++)
        {
            var layer = layerOf(names[i]) ?? throw new ArgumentException($"The layer grouping returned null for '{names[i]}'.");
            if (!index.TryGetValue(layer, out int l))
            {
                l = layers.Count;
                index.Add(layer, l);
                layers.Add(layer);
            }

            layerOfName[i] = l;
        }

        return (layers, layerOfName);
    }
}
