using System.Globalization;
using System.Text.RegularExpressions;

namespace MergeLab.Config;

/// <summary>
/// The layer position t ∈ [0, 1] of each tensor, at which gradients are evaluated, as mergekit's
/// planner assigns it (<c>mergekit/plan.py</c>, <c>plan_slice</c> and <c>plan_module</c>):
/// <list type="bullet">
/// <item>layer i of n: t = i/(n − 1); a model with a single layer gets t = 1 (mergekit's special case);</item>
/// <item>every other tensor — embeddings and whatever comes before the first layer, and equally the
/// final norm and <c>lm_head</c> after the last — gets t = 0: mergekit plans its "pre" and "post"
/// weights with a config reader created at t = 0, so a gradient's first point applies to both.</item>
/// </list>
/// A tensor's layer index is the first match of <c>(^|.)(layers|h|blocks|layer).N.</c> in its name
/// (<c>model.layers.12.mlp.up_proj.weight</c>, <c>transformer.h.3.attn.c_attn.weight</c>). Layers are
/// counted per stack, the part of the name up to that match, so a vision tower and a language model in
/// one checkpoint each run from t = 0 to 1, as mergekit's per-module layer counts do; in a model with
/// one stack n is the largest index + 1.
/// <para>Immutable and thread-safe.</para>
/// </summary>
public sealed partial class LayerPositions
{
    private readonly Dictionary<string, int> _layerCounts;

    private LayerPositions(Dictionary<string, int> layerCounts) => _layerCounts = layerCounts;

    /// <summary>Counts the layers of each stack in <paramref name="tensorNames"/>.</summary>
    public static LayerPositions FromTensorNames(IEnumerable<string> tensorNames)
    {
        ArgumentNullException.ThrowIfNull(tensorNames);
        var counts = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var name in tensorNames)
        {
            if (Layer(name) is var (stack, index))
            {
                counts[stack] = Math.Max(counts.GetValueOrDefault(stack), index + 1);
            }
        }

        return new LayerPositions(counts);
    }

    /// <summary>The number of layers in the stack <paramref name="tensorName"/> belongs to, or 0 for a
    /// tensor outside the layers.</summary>
    public int LayerCount(string tensorName) =>
        Layer(tensorName) is var (stack, _) ? _layerCounts.GetValueOrDefault(stack) : 0;

    /// <summary>The layer index parsed from <paramref name="tensorName"/>, or null for a tensor outside
    /// the layers.</summary>
    public static int? LayerIndex(string tensorName) => Layer(tensorName)?.Index;

    /// <summary>The position t ∈ [0, 1] of <paramref name="tensorName"/>: i/(n − 1) for layer i of n
    /// (1 when n = 1), 0 outside the layers. A name not among those counted, with an index past the
    /// last layer, gets 1.</summary>
    public double PositionOf(string tensorName)
    {
        ArgumentNullException.ThrowIfNull(tensorName);
        if (Layer(tensorName) is not var (stack, index))
        {
            return 0;
        }

        int n = Math.Max(_layerCounts.GetValueOrDefault(stack), index + 1);
        return n > 1 ? Math.Min(1.0, (double)index / (n - 1)) : 1.0;
    }

    private static (string Stack, int Index)? Layer(string name)
    {
        var m = LayerPattern().Match(name);
        if (!m.Success || !int.TryParse(m.Groups["index"].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture, out int index))
        {
            return null;
        }

        return (name[..m.Groups["index"].Index], index);
    }

    [GeneratedRegex(@"(?:^|\.)(?:layers|h|blocks|layer)\.(?<index>\d+)\.", RegexOptions.CultureInvariant)]
    private static partial Regex LayerPattern();
}
