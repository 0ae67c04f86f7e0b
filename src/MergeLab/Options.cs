using System.Globalization;

namespace MergeLab;

/// <summary>Validation helpers shared by the option records: every check names the option and the value.</summary>
internal static class Options
{
    public static void RequireFinite(double value, string name)
    {
        if (!double.IsFinite(value))
        {
            throw new ArgumentOutOfRangeException(name, value, $"{name} must be a finite number, but was {Format(value)}.");
        }
    }

    /// <summary>Requires <paramref name="value"/> in [min, max] (or (min, max] etc. per the flags); NaN fails.</summary>
    public static void RequireInRange(double value, string name, double min, double max, bool minInclusive = true, bool maxInclusive = true)
    {
        bool ok = !double.IsNaN(value)
            && (minInclusive ? value >= min : value > min)
            && (maxInclusive ? value <= max : value < max);
        if (!ok)
        {
            string range = $"{(minInclusive ? '[' : '(')}{Format(min)}, {Format(max)}{(maxInclusive ? ']' : ')')}";
            throw new ArgumentOutOfRangeException(name, value, $"{name} must be in {range}, but was {Format(value)}.");
        }
    }

    /// <summary>Validates per-expert weights and returns them as an array (all 1 when null).</summary>
    public static double[] Weights(IReadOnlyList<double>? weights, int expertCount, string name = "Weights")
    {
        if (weights is null)
        {
            return Enumerable.Repeat(1.0, expertCount).ToArray();
        }

        if (weights.Count != expertCount)
        {
            throw new ArgumentException($"{name} has {weights.Count} {(weights.Count == 1 ? "value" : "values")} but there are {expertCount} experts.", name);
        }

        for (int k = 0; k < weights.Count; k++)
        {
            RequireFinite(weights[k], $"{name}[{k}]");
        }

        return weights.ToArray();
    }

    /// <summary>A per-expert option list, or <paramref name="single"/> for every expert when it is null. An
    /// empty list is refused: it would otherwise read as "no stage" rather than as a value per expert.</summary>
    public static IReadOnlyList<T> PerExpert<T>(IReadOnlyList<T>? list, T single, string name, string singleName) =>
        list switch
        {
            null => [single],
            { Count: 0 } => throw new ArgumentException($"{name} is empty; give one value per expert, or leave it null to use {singleName} for every expert.", name),
            _ => list,
        };

    /// <summary>Returns <paramref name="value"/>, or throws when it is not one of its enum's named values (a cast
    /// integer): options are checked when set, not where a switch would meet the value.</summary>
    public static T Defined<T>(T value, string name)
        where T : struct, Enum =>
        Enum.IsDefined(value) ? value
            : throw new ArgumentOutOfRangeException(name, value, $"{name} must be one of {string.Join(", ", Enum.GetNames<T>())}, but was {value}.");

    /// <summary><see cref="Defined{T}(T, string)"/> for an optional value (null passes).</summary>
    public static T? Defined<T>(T? value, string name)
        where T : struct, Enum => value is { } v ? Defined(v, name) : null;

    /// <summary>Whether a weight sum counts as 0 for normalising (|Σ w| &lt; 1e-8): task arithmetic's divisor
    /// and the weights of a normalised average are then not divided by.</summary>
    public static bool SumsToZero(double sum) => Math.Abs(sum) < 1e-8;

    /// <summary>A number as messages show it: round-trip digits, invariant culture.</summary>
    public static string Format(double v) => v.ToString("R", CultureInfo.InvariantCulture);
}
