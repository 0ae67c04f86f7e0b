using MergeLab.Methods;
using MergeLab.Stages;

namespace MergeLab.Config;

/// <summary>Whether a parameter applies to the whole merge or is resolved per input model.</summary>
internal enum ParameterScope
{
    /// <summary>mergekit's <c>parameters()</c>: read from the top-level <c>parameters</c> only.</summary>
    Global,

    /// <summary>mergekit's <c>tensor_parameters()</c>: read from the model's <c>parameters</c>, falling
    /// back to the top-level <c>parameters</c>, then the default.</summary>
    PerModel,
}

/// <summary>What a method does with <c>base_model</c>.</summary>
internal enum BaseUse
{
    /// <summary>Task-vector methods: the base is required and is not one of the experts.</summary>
    Required,

    /// <summary>mergekit's <c>linear</c>: the base, when given, is one more model in the average.</summary>
    AveragedIn,
}

/// <summary>One parameter a method accepts.</summary>
/// <param name="Name">The config name.</param>
/// <param name="Scope">Global or per model.</param>
/// <param name="IsBoolean">A boolean (true/false) rather than a number.</param>
/// <param name="Default">The default; null with <paramref name="Required"/> false never happens.</param>
/// <param name="Required">mergekit's <c>required=True</c>: a missing value is an error.</param>
/// <param name="Check">Returns the problem with a resolved value, or null when it is valid.</param>
internal sealed record ParameterSpec(string Name, ParameterScope Scope, bool IsBoolean, double? Default, bool Required,
    Func<double, string?> Check);

/// <summary>The parameters of one tensor's merge, resolved: global values and one value per expert.</summary>
internal sealed class ResolvedParameters
{
    public required IReadOnlyDictionary<string, double> Global { get; init; }

    public required IReadOnlyDictionary<string, double[]> PerModel { get; init; }

    public double Number(string name) => Global[name];

    public bool Flag(string name) => Global[name] != 0;

    public double[] Each(string name) => PerModel[name];

    /// <summary>A key that is equal exactly when two resolutions build the same method.</summary>
    public string Key() =>
        string.Join(";", Global.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key}={Options.Format(kv.Value)}")
            .Concat(PerModel.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key}=[{string.Join(",", kv.Value.Select(Options.Format))}]")));

    /// <summary>The values as a config states them, in <paramref name="parameters"/>' order, for messages:
    /// <c>normalize: true, weight: [1, -1]</c>.</summary>
    public string Describe(IEnumerable<ParameterSpec> parameters) =>
        string.Join(", ", parameters.Select(p => p.Scope == ParameterScope.Global
            ? $"{p.Name}: {Text(p, Global[p.Name])}"
            : $"{p.Name}: [{string.Join(", ", PerModel[p.Name].Select(v => Text(p, v)))}]"));

    private static string Text(ParameterSpec p, double v) => p.IsBoolean ? (v != 0 ? "true" : "false") : Options.Format(v);
}

/// <summary>A merge method as the config knows it: its parameters and how to build it.</summary>
internal sealed record MethodSpec(
    string Name,
    IReadOnlyList<ParameterSpec> Parameters,
    BaseUse Base,
    bool WholeModel,
    Func<ResolvedParameters, long, MergeMethod> Build,
    IReadOnlyDictionary<string, string>? Rejected = null)
{
    public ParameterSpec? Find(string name) => Parameters.FirstOrDefault(p => p.Name == name);

    /// <summary>"weight, density (per model or global); normalize, lambda (global)".</summary>
    public string Accepted()
    {
        var perModel = Parameters.Where(p => p.Scope == ParameterScope.PerModel).Select(p => p.Name).ToArray();
        var global = Parameters.Where(p => p.Scope == ParameterScope.Global).Select(p => p.Name).ToArray();
        var parts = new List<string>();
        if (perModel.Length > 0)
        {
            parts.Add($"{string.Join(", ", perModel)} (per model, or global as a fallback)");
        }

        if (global.Length > 0)
        {
            parts.Add($"{string.Join(", ", global)} (global only)");
        }

        return parts.Count == 0 ? "none" : string.Join("; ", parts);
    }
}

/// <summary>
/// The merge methods a config may name, with mergekit's parameter tables
/// (<c>mergekit/merge_methods/registry.py</c>, <c>generalized_task_arithmetic.py</c>, <c>linear.py</c>)
/// and MergeLab's own <c>pcb</c> and <c>ties_paper</c>.
/// </summary>
internal static class MethodCatalog
{
    private static readonly Dictionary<string, MethodSpec> Specs = new[]
    {
        Linear(),
        TaskArithmetic(),
        Ties(),
        Dare("dare_linear", Combination.Linear),
        Dare("dare_ties", Combination.Ties),
        Breadcrumbs("breadcrumbs", Combination.Linear),
        Breadcrumbs("breadcrumbs_ties", Combination.Ties),
        Pcb(),
        TiesPaper(),
    }.ToDictionary(s => s.Name, StringComparer.Ordinal);

    /// <summary>Every method name, in a stable order.</summary>
    public static IReadOnlyList<string> Names { get; } = Specs.Keys.ToArray();

    /// <summary>mergekit methods MergeLab does not implement, for a clearer error.</summary>
    private static readonly HashSet<string> MergekitOnly = new(StringComparer.Ordinal)
    {
        "slerp", "nuslerp", "multislerp", "karcher", "passthrough", "model_stock", "nearswap", "arcee_fusion",
        "della", "della_linear", "sce", "ram", "ramplus_tl",
    };

    public static MethodSpec? Find(string name) => Specs.GetValueOrDefault(name);

    public static string UnknownMethodProblem(string name) =>
        MergekitOnly.Contains(name)
            ? $"merge method '{name}' is a mergekit method that MergeLab does not implement; supported: {string.Join(", ", Names)}."
            : $"unknown merge method '{name}'; supported: {string.Join(", ", Names)}.";

    // ---- parameter definitions -------------------------------------------------------------------

    private static ParameterSpec Bool(string name, bool @default) =>
        new(name, ParameterScope.Global, true, @default ? 1 : 0, false, _ => null);

    private static ParameterSpec Lambda() =>
        new("lambda", ParameterScope.Global, false, 1.0, false, _ => null);

    private static ParameterSpec Weight(bool required) =>
        new("weight", ParameterScope.PerModel, false, required ? null : 1.0, required, _ => null);

    private static ParameterSpec Density(double @default, bool allowZero = true) =>
        new("density", ParameterScope.PerModel, false, @default, false,
            v => allowZero ? InRange(v, "[0, 1]", v >= 0 && v <= 1)
                : InRange(v, "(0, 1] for DARE (a density of 0 drops every entry; leave the model out instead)", v > 0 && v <= 1));

    private static ParameterSpec Fraction(string name, ParameterScope scope, double @default, string range, Func<double, bool> ok) =>
        new(name, scope, false, @default, false, v => InRange(v, range, ok(v)));

    private static string? InRange(double v, string range, bool ok) =>
        ok ? null : $"must be in {range}, but is {Options.Format(v)}";

    /// <summary>mergekit's <c>int8_mask</c>: only the dtype of its sign-agreement mask, which is compared
    /// as a boolean either way, so it never changes the numbers. Accepted and ignored.</summary>
    private static ParameterSpec Int8Mask() => Bool("int8_mask", false);

    private static Aggregation Aggregate(ResolvedParameters p) =>
        p.Flag("normalize") ? Aggregation.WeightNormalized : Aggregation.Sum;

    /// <summary>mergekit's <c>rescale</c>: true multiplies each sparsified task vector by the ratio of its L1
    /// norms before and after (<c>RescaleNorm.l1</c>, the only norm its configs reach).</summary>
    private static RescaleNorm Rescale(ResolvedParameters p) => p.Flag("rescale") ? RescaleNorm.L1 : RescaleNorm.None;

    // ---- methods ---------------------------------------------------------------------------------

    private static MethodSpec Linear() => new("linear",
        [Bool("normalize", true), Weight(required: true)],
        BaseUse.AveragedIn, WholeModel: false,
        (p, _) => new WeightAverageMerge(new WeightAverageOptions { Weights = p.Each("weight"), Normalize = p.Flag("normalize") }));

    private static MethodSpec TaskArithmetic() => new("task_arithmetic",
        [Int8Mask(), Bool("normalize", false), Lambda(), Weight(required: true)],
        BaseUse.Required, WholeModel: false,
        (p, _) => new TaskArithmeticMerge(new TaskArithmeticOptions
        {
            Weights = p.Each("weight"),
            Lambda = p.Number("lambda"),
            Normalize = p.Flag("normalize"),
        }),
        new Dictionary<string, string>
        {
            ["density"] = "'density' has no effect on task_arithmetic, which has no sparsification step (mergekit accepts and ignores it); remove it, or use ties, dare_linear or breadcrumbs",
            ["rescale"] = "'rescale' has no effect on task_arithmetic, which has no sparsification step (mergekit accepts and ignores it); remove it",
        });

    private static MethodSpec Ties() => new("ties",
        [Int8Mask(), Bool("normalize", true), Bool("rescale", false), Lambda(), Weight(required: true), Density(1.0)],
        BaseUse.Required, WholeModel: false,
        (p, _) => new TiesMerge(new TiesOptions
        {
            Preset = TiesPreset.Mergekit,
            Densities = p.Each("density"),
            Rescale = Rescale(p),
            Weights = p.Each("weight"),
            Lambda = p.Number("lambda"),
            Aggregation = Aggregate(p),
        }));

    private static MethodSpec Dare(string name, Combination combination) => new(name,
        [Int8Mask(), Bool("normalize", false), Bool("rescale", true), Lambda(), Weight(required: true), Density(1.0, allowZero: false)],
        BaseUse.Required, WholeModel: false,
        (p, seed) => new DareMerge(new DareOptions
        {
            DropRates = p.Each("density").Select(d => 1 - d).ToArray(),
            Rescale = Rescale(p),
            Combination = combination,
            ConsensusPreset = TiesPreset.Mergekit,
            Aggregation = Aggregate(p),
            Weights = p.Each("weight"),
            Lambda = p.Number("lambda"),
            Seed = seed,
        }));

    private static MethodSpec Breadcrumbs(string name, Combination combination) => new(name,
        [
            Int8Mask(), Bool("normalize", false), Bool("rescale", false), Lambda(), Weight(required: true), Density(1.0),
            Fraction("gamma", ParameterScope.PerModel, 0.01, "[0, 1]", v => v >= 0 && v <= 1),
        ],
        BaseUse.Required, WholeModel: false,
        (p, _) => new BreadcrumbsMerge(new BreadcrumbsOptions
        {
            Variant = BreadcrumbsVariant.Mergekit,
            PerExpert = p.Each("density").Zip(p.Each("gamma")).ToArray(),
            Rescale = Rescale(p),
            Combination = combination,
            ConsensusPreset = TiesPreset.Mergekit,
            Aggregation = Aggregate(p),
            Weights = p.Each("weight"),
            Lambda = p.Number("lambda"),
        }));

    private static MethodSpec Pcb() => new("pcb",
        [
            Fraction("ratio", ParameterScope.Global, 0.1, "(0, 1]", v => v > 0 && v <= 1),
            Fraction("clamp_low", ParameterScope.Global, 1e-4, "[0, 0.5)", v => v >= 0 && v < 0.5),
            Fraction("clamp_high", ParameterScope.Global, 1e-4, "[0, 0.5)", v => v >= 0 && v < 0.5),
            Lambda(),
        ],
        BaseUse.Required, WholeModel: true,
        (p, _) => new PcbMerge(new PcbOptions
        {
            Ratio = p.Number("ratio"),
            ClampLow = p.Number("clamp_low"),
            ClampHigh = p.Number("clamp_high"),
            Lambda = p.Number("lambda"),
        }));

    private static MethodSpec TiesPaper() => new("ties_paper",
        [Lambda(), Weight(required: false), Density(0.2)],
        BaseUse.Required, WholeModel: true,
        (p, _) => new TiesMerge(new TiesOptions
        {
            Preset = TiesPreset.Paper,
            Densities = p.Each("density"),
            Weights = p.Each("weight"),
            Lambda = p.Number("lambda"),
        }));
}
