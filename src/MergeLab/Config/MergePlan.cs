using System.Collections.Concurrent;
using System.Globalization;
using MergeLab.IO;
using MergeLab.Methods;
using static TorchSharp.torch;

namespace MergeLab.Config;

/// <summary>
/// A checked merge config bound to a checkpoint's tensor names: which models go in, and the
/// <see cref="MergeMethod"/> for each tensor, its parameters resolved mergekit's way. Everything that
/// can be wrong with the config is found by
/// <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/>, before any tensor is read.
/// </summary>
/// <remarks>
/// <para><b>Methods.</b> <c>linear</c> → <see cref="WeightAverageMerge"/>; <c>task_arithmetic</c> →
/// <see cref="TaskArithmeticMerge"/>; <c>ties</c> → <see cref="TiesMerge"/> with the mergekit preset;
/// <c>dare_linear</c>, <c>dare_ties</c> → <see cref="DareMerge"/> (drop rate 1 − density, mergekit's
/// consensus, the plan's <see cref="Seed"/>); <c>breadcrumbs</c>, <c>breadcrumbs_ties</c> →
/// <see cref="BreadcrumbsMerge"/> with the mergekit variant. MergeLab's own: <c>pcb</c> →
/// <see cref="PcbMerge"/> (global <c>ratio</c> 0.1, <c>clamp_low</c>, <c>clamp_high</c> 1e-4,
/// <c>lambda</c> 1; whole-model scope) and <c>ties_paper</c> → <see cref="TiesMerge"/> with the Paper
/// preset (per-model <c>density</c> 0.2 and <c>weight</c> 1, global <c>lambda</c> 1; whole-model trim).</para>
/// <para><b>Parameters and defaults</b> are mergekit's (<c>merge_methods/registry.py</c>):
/// <c>normalize</c> true for linear and ties, false otherwise; <c>rescale</c> (L1) true for DARE, false
/// otherwise (true gives ties and Breadcrumbs mergekit's L1 rescale too); <c>lambda</c> 1; per model
/// <c>weight</c> (required, as in mergekit), <c>density</c> 1, <c>gamma</c> 0.01 (Breadcrumbs).
/// <c>int8_mask</c> is accepted and ignored: in mergekit it only sets the dtype of the sign mask, which
/// is compared as a boolean either way. A model's parameter overrides the global one, which overrides
/// the default; a condition list whose filters all miss a tensor falls through to the next level.
/// Global-only parameters (<c>lambda</c>, <c>normalize</c>, …) under a model are an error (mergekit
/// silently ignores them there), as are parameters that have no effect on the method.</para>
/// <para><b>Models.</b> For task-vector methods the experts are the listed models other than
/// <c>base_model</c> (mergekit skips the base when it is listed), in config order, and
/// <c>base_model</c> is required. <c>linear</c>, like mergekit, averages every listed model and also
/// <c>base_model</c> when one is given (appended last when it is not listed), so the base then needs a
/// weight too. The engine passes <see cref="BaseModelPath"/>'s tensor as <see cref="TensorGroup.Base"/>
/// (when not null) and <see cref="ExpertPaths"/>' tensors as the experts, in order.</para>
/// <para><b>Layer gradients</b> are evaluated at <see cref="LayerPositions.PositionOf"/>: layer i of n at
/// i/(n − 1), all other tensors (embeddings, final norm, lm_head) at 0, as mergekit does.</para>
/// <para><b>Dtypes.</b> MergeLab computes in float32 whatever <c>dtype</c> says (mergekit computes in
/// <c>dtype</c>) and casts the result to <see cref="OutputDType"/>.</para>
/// <para><b>Threads.</b> Thread-safe once created: <see cref="MethodFor"/> may be called from several
/// threads at once (as the engine's per-tensor methods are), and the methods it returns are thread-safe.</para>
/// </remarks>
public sealed class MergePlan
{
    private readonly MethodSpec _spec;
    private readonly Input[] _inputs;
    private readonly Dictionary<string, MergeMethod> _byName = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, MergeMethod> _byKey = new(StringComparer.Ordinal);
    private readonly List<MergeMethod> _methods = [];

    private MergePlan(MergeConfig config, MethodSpec spec, Input[] inputs, string? basePath, string tokenizerSource, long seed)
    {
        Config = config;
        _spec = spec;
        _inputs = inputs;
        BaseModelPath = basePath;
        ExpertPaths = inputs.Select(i => i.Path).ToArray();
        TokenizerSource = tokenizerSource;
        Seed = seed;
        var name = config.OutDType ?? config.DType;
        OutputDType = name is null ? null : DTypeNames.Parse(name);
    }

    /// <summary>The config the plan was made from.</summary>
    public MergeConfig Config { get; }

    /// <summary>The config's merge method name, e.g. <c>dare_ties</c>.</summary>
    public string MethodName => _spec.Name;

    /// <summary>The absolute path of the base model, or null when the config has none (only
    /// <c>linear</c> allows that).</summary>
    public string? BaseModelPath { get; }

    /// <summary>The absolute paths of the models whose tensors are the experts of each
    /// <see cref="TensorGroup"/>, in order; per-model parameters follow this order.</summary>
    public IReadOnlyList<string> ExpertPaths { get; }

    /// <summary>The dtype of the merged tensors: <c>out_dtype</c>, else <c>dtype</c>, else null (each
    /// tensor keeps its base tensor's dtype).</summary>
    public ScalarType? OutputDType { get; }

    /// <summary>The absolute path of the model whose tokenizer files go with the output:
    /// <c>tokenizer_source</c>'s model, the base for <c>base</c>, and when it is not given mergekit's
    /// donor, the base model or else the first model. Files are copied as they are: MergeLab does not
    /// permute embeddings, so the models must share one vocabulary.</summary>
    public string TokenizerSource { get; }

    /// <summary>The random seed given to DARE (the CLI's <c>--seed</c>). Default 0.</summary>
    public long Seed { get; }

    /// <summary>The layer positions used to evaluate gradients.</summary>
    public LayerPositions Layers { get; private set; } = LayerPositions.FromTensorNames([]);

    /// <summary>The method of the first tensor: every tensor's method has its class and
    /// <see cref="MergeMethod.RequiresBase"/>, and for whole-model methods (<c>pcb</c>,
    /// <c>ties_paper</c>) it is the one method of every tensor, whose
    /// <see cref="MergeMethod.CreateStatistic"/> the engine runs before merging.</summary>
    public MergeMethod Method { get; private set; } = null!;

    /// <summary>The distinct methods of the tensors named at creation, in first-use order. Whole-model
    /// methods (<c>pcb</c>, <c>ties_paper</c>) always have exactly one, whose
    /// <see cref="MergeMethod.CreateStatistic"/> the engine runs before merging.</summary>
    public IReadOnlyList<MergeMethod> Methods => _methods;

    /// <summary>
    /// Checks <paramref name="config"/> against the files and the checkpoint's tensor names and builds
    /// the plan: the method and every model are known and exist, and every parameter resolves to a
    /// valid value for every tensor.
    /// </summary>
    /// <param name="config">The parsed config.</param>
    /// <param name="tensorNames">The base checkpoint's tensor names (the first model's for a base-free
    /// <c>linear</c> merge); they fix the layer count and are all validated.</param>
    /// <param name="seed">The random seed for DARE.</param>
    /// <exception cref="MergeConfigException">Anything wrong with the config.</exception>
    public static MergePlan Create(MergeConfig config, IReadOnlyList<string> tensorNames, long seed = 0)
    {
        ArgumentNullException.ThrowIfNull(tensorNames);
        return Prepare(config, seed).Bind(tensorNames);
    }

    /// <summary>
    /// As <see cref="Create(MergeConfig, IReadOnlyList{string}, long)"/>, reading the tensor names from
    /// the safetensors header(s) of the base model (of the first input for a base-free <c>linear</c>
    /// merge) once the config and the model paths have been checked.
    /// </summary>
    /// <param name="config">The parsed config.</param>
    /// <param name="seed">The random seed for DARE.</param>
    /// <exception cref="MergeConfigException">Anything wrong with the config, or the reference model
    /// has no safetensors checkpoint.</exception>
    /// <exception cref="SafetensorsFormatException">The reference checkpoint is malformed.</exception>
    public static MergePlan Create(MergeConfig config, long seed = 0)
    {
        var plan = Prepare(config, seed);
        string reference = plan.BaseModelPath ?? plan.ExpertPaths[0];
        IReadOnlyList<string> names;
        try
        {
            using var checkpoint = SafetensorsCheckpoint.Open(reference);
            names = checkpoint.TensorNames.ToArray();
        }
        catch (FileNotFoundException e)
        {
            throw config.Error(plan.BaseModelPath is null ? "models[0].model" : "base_model",
                $"cannot read the tensor names of '{reference}': {e.Message}");
        }

        // Every other model must hold weights too; the engine would find out only when the merge starts,
        // without the config's line.
        foreach (var input in plan._inputs)
        {
            if (SafetensorsCheckpoint.MissingWeights(input.Path) is { } missing)
            {
                throw config.Error(input.PathKey, missing);
            }
        }

        return plan.Bind(names);
    }

    /// <summary>Everything that needs no tensor names: method, parameter names, which models go in,
    /// and that they exist.</summary>
    private static MergePlan Prepare(MergeConfig config, long seed)
    {
        ArgumentNullException.ThrowIfNull(config);
        var spec = ConfigChecks.CheckStatic(config);

        string? basePath = config.BaseModel is null ? null : Resolve(config, "base_model", config.BaseModel);
        var models = config.Models.Select((m, i) => new Input(Resolve(config, $"models[{i}].model", m.Path), m, $"models[{i}]")).ToList();
        for (int i = 0; i < models.Count; i++)
        {
            int first = models.FindIndex(m => PathCase.Comparer.Equals(m.Path, models[i].Path));
            if (first < i)
            {
                throw config.Error($"models[{i}].model",
                    $"'{config.Models[i].Path}' is listed twice (also as models[{first}]); list each model once.", config.Models[i].Line);
            }
        }

        Input[] inputs;
        if (spec.Base == BaseUse.Required)
        {
            if (basePath is null)
            {
                throw config.Error(null, $"merge method '{spec.Name}' works on task vectors and needs 'base_model'.");
            }

            inputs = models.Where(m => !PathCase.Comparer.Equals(m.Path, basePath)).ToArray();
            if (inputs.Length == 0)
            {
                throw config.Error("models", "every listed model is the base model; list at least one model to merge into it.");
            }
        }
        else
        {
            inputs = basePath is null || models.Any(m => PathCase.Comparer.Equals(m.Path, basePath))
                ? models.ToArray()
                : [.. models, new Input(basePath, null, "base_model")];
        }

        string tokenizer = config.TokenizerSource switch
        {
            null or "base" => basePath ?? models[0].Path,
            var path => Resolve(config, "tokenizer_source", path),
        };

        RequireExists(config, "base_model", basePath);
        foreach (var m in models)
        {
            RequireExists(config, m.PathKey, m.Path);
        }

        RequireExists(config, "tokenizer_source", config.TokenizerSource is null or "base" ? null : tokenizer);
        return new MergePlan(config, spec, inputs, basePath, tokenizer, seed);
    }

    /// <summary>Resolves and checks every tensor's parameters and builds the methods.</summary>
    private MergePlan Bind(IReadOnlyList<string> tensorNames)
    {
        Layers = LayerPositions.FromTensorNames(tensorNames);
        foreach (var name in tensorNames)
        {
            ArgumentNullException.ThrowIfNull(name, nameof(tensorNames));
            if (_byName.ContainsKey(name))
            {
                continue;
            }

            var method = Resolve(name);
            _byName[name] = method;
            if (!_methods.Contains(method))
            {
                _methods.Add(method);
            }
        }

        if (_spec.WholeModel && _methods.Count > 1)
        {
            var varying = VaryingParameters();
            throw Config.Error(varying.FirstOrDefault(),
                $"'{_spec.Name}' computes its thresholds over the whole model, so its parameters must be the same for every tensor; " +
                $"remove the gradients and filters{(varying.Count > 0 ? $" ({string.Join(", ", varying)})" : "")}.");
        }

        Method = _methods.Count > 0 ? _methods[0] : Resolve(string.Empty);
        return this;
    }

    /// <summary>The method that merges the tensor named <paramref name="tensorName"/>. Methods are shared
    /// between tensors whose resolved parameters are equal and are thread-safe. A name that was not
    /// given to <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/> is resolved (and checked) now.</summary>
    /// <exception cref="MergeConfigException">A parameter is invalid for a name not given to <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/>.</exception>
    public MergeMethod MethodFor(string tensorName)
    {
        ArgumentNullException.ThrowIfNull(tensorName);
        if (_byName.TryGetValue(tensorName, out var method))
        {
            return method;
        }

        method = Resolve(tensorName);
        if (_spec.WholeModel && _methods.Count > 0 && !ReferenceEquals(method, _methods[0]))
        {
            throw Config.Error(null,
                $"'{_spec.Name}' computes its thresholds over the whole model, but tensor '{tensorName}' resolves to other parameters than the rest.");
        }

        return method;
    }

    /// <inheritdoc />
    public override string ToString() =>
        $"{MethodName}: base {BaseModelPath ?? "(none)"}, {ExpertPaths.Count} expert(s), {_methods.Count} distinct parameter set(s)";

    private MergeMethod Resolve(string tensorName)
    {
        double t = Layers.PositionOf(tensorName);
        var global = new Dictionary<string, double>(StringComparer.Ordinal);
        var perModel = new Dictionary<string, double[]>(StringComparer.Ordinal);
        foreach (var p in _spec.Parameters)
        {
            if (p.Scope == ParameterScope.Global)
            {
                global[p.Name] = Value(p, tensorName, t, null);
            }
            else
            {
                perModel[p.Name] = _inputs.Select(input => Value(p, tensorName, t, input)).ToArray();
            }
        }

        var resolved = new ResolvedParameters { Global = global, PerModel = perModel };
        return _byKey.GetOrAdd(resolved.Key(), _ =>
        {
            try
            {
                return _spec.Build(resolved, Seed);
            }
            catch (ArgumentException e)
            {
                // The values may come from several places (each model's parameters, the top-level ones, a
                // default), so the message states them instead of naming one key; the tensor only where a
                // value depends on it (otherwise it would be whichever tensor came first, an integer buffer
                // that is never merged included).
                string which = VaryingParameters().Count > 0 ? $"the parameters of tensor '{tensorName}'" : "the parameters";
                throw new MergeConfigException(Config.SourcePath, null, null,
                    $"{which} ({resolved.Describe(_spec.Parameters)}) do not make a valid '{_spec.Name}' merge: " +
                    $"{e.Message.Replace($" (Parameter '{e.ParamName}')", "", StringComparison.Ordinal)}", e);
            }
        });
    }

    /// <summary>A parameter's value for one tensor: the model's setting, else the global one, else the
    /// default (mergekit's <c>ConfigReader.parameter</c>); checked.</summary>
    private double Value(ParameterSpec p, string tensorName, double t, Input? input)
    {
        double? value = null;
        string? source = null;
        var own = input?.Model?.Parameters.GetValueOrDefault(p.Name);
        var shared = Config.Parameters.GetValueOrDefault(p.Name);
        ParameterValue? from = null; // the setting that answered
        if (own?.Resolve(tensorName, t) is double v1)
        {
            (value, source, from) = (v1, $"{input!.KeyPath}.parameters.{p.Name}", own);
        }
        else if (shared?.Resolve(tensorName, t) is double v2)
        {
            (value, source, from) = (v2, $"parameters.{p.Name}", shared);
        }

        value ??= p.Default;
        if (value is not double result)
        {
            // Missing here, but not everywhere when a list of conditions missed this tensor: then it is named.
            string tensor = own is not null || shared is not null ? $" (tensor '{tensorName}')" : "";
            if (input?.Model is null)
            {
                throw Config.Error("base_model",
                    $"'{_spec.Name}' averages base_model with the listed models (mergekit adds it to the inputs when it is not listed), " +
                    $"so it needs a '{p.Name}' too, and none is set{tensor}: list it under models with a {p.Name}, " +
                    $"set a global {p.Name}, or remove base_model.");
            }

            throw Config.Error(input.KeyPath,
                $"no '{p.Name}' for '{input.Model.Path}'{tensor}; '{_spec.Name}' needs one for every model, as in mergekit: " +
                "set it in the model's parameters or in the global parameters.", input.Model.Line);
        }

        if (p.Check(result) is { } problem)
        {
            // Named only where the value found depends on the tensor (a gradient, or a list of conditions).
            string where = from?.VariesByTensor == true ? $" (tensor '{tensorName}', layer position t = {t.ToString("0.###", CultureInfo.InvariantCulture)})" : "";
            throw Config.Error(source ?? "parameters", $"'{p.Name}' {problem}{where}.");
        }

        return result;
    }

    /// <summary>The key paths of settings that can differ between tensors.</summary>
    private List<string> VaryingParameters()
    {
        var result = Config.Parameters.Where(kv => kv.Value.VariesByTensor).Select(kv => $"parameters.{kv.Key}").ToList();
        for (int i = 0; i < Config.Models.Count; i++)
        {
            result.AddRange(Config.Models[i].Parameters.Where(kv => kv.Value.VariesByTensor).Select(kv => $"models[{i}].parameters.{kv.Key}"));
        }

        return result;
    }

    /// <summary><see cref="MergeConfig.ResolvePath"/>, with a path the system cannot represent (a NUL
    /// character, say) reported as a config error.</summary>
    private static string Resolve(MergeConfig config, string keyPath, string path)
    {
        try
        {
            return config.ResolvePath(path);
        }
        catch (Exception e) when (e is ArgumentException or NotSupportedException or PathTooLongException)
        {
            throw config.Error(keyPath, $"'{path}' is not a valid path: {e.Message}");
        }
    }

    private static void RequireExists(MergeConfig config, string keyPath, string? path)
    {
        if (path is null || Directory.Exists(path) || File.Exists(path))
        {
            return;
        }

        string hint = path.Contains('+', StringComparison.Ordinal) || path.Contains('@', StringComparison.Ordinal)
            ? " (mergekit reads 'model+lora' as a LoRA and 'model@revision' as a hub revision; MergeLab reads local checkpoints only)"
            : " (MergeLab reads local checkpoints; Hugging Face hub names are not downloaded)";
        throw config.Error(keyPath, $"the model '{path}' does not exist{hint}.");
    }

    /// <summary>One input model: its absolute path, its config entry (null for linear's appended base)
    /// and its key path for messages.</summary>
    private sealed record Input(string Path, ModelReference? Model, string KeyPath)
    {
        /// <summary>The key of the input's path in the config: <c>models[i].model</c>, or <c>base_model</c>.</summary>
        public string PathKey => Model is null ? KeyPath : $"{KeyPath}.model";
    }
}
