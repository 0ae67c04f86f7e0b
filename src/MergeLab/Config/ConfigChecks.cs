namespace MergeLab.Config;

/// <summary>The checks that need no tensor names and no file system: method, parameter names and
/// types, dtype names, tokenizer source. Run by <see cref="MergeConfig.Parse(string, string?)"/> and again by
/// <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/> (for configs built in code).</summary>
internal static class ConfigChecks
{
    public static MethodSpec CheckStatic(MergeConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (string.IsNullOrEmpty(config.MergeMethod))
        {
            throw config.Error("merge_method", "'merge_method' is required.");
        }

        var spec = MethodCatalog.Find(config.MergeMethod) ?? throw config.Error("merge_method", MethodCatalog.UnknownMethodProblem(config.MergeMethod));
        if (config.Models is null || config.Models.Count == 0)
        {
            throw config.Error("models", "'models' is empty; list at least one model.");
        }

        for (int i = 0; i < config.Models.Count; i++)
        {
            var model = config.Models[i];
            if (model is null || string.IsNullOrEmpty(model.Path))
            {
                throw config.Error($"models[{i}]", "the entry has no 'model' path.");
            }

            CheckParameters(config, spec, model.Parameters, $"models[{i}].parameters", perModel: true);
        }

        CheckParameters(config, spec, config.Parameters, "parameters", perModel: false);
        CheckDType(config, config.DType, "dtype");
        CheckDType(config, config.OutDType, "out_dtype");
        if (config.TokenizerSource == "union")
        {
            throw config.Error("tokenizer_source",
                "'union' is not supported: it builds a merged vocabulary and permutes the embeddings, and MergeLab copies one model's tokenizer; use 'base' or a model path.");
        }

        return spec;
    }

    private static void CheckParameters(MergeConfig config, MethodSpec spec, IReadOnlyDictionary<string, ParameterValue>? parameters,
        string path, bool perModel)
    {
        if (parameters is null)
        {
            return;
        }

        foreach (var (name, value) in parameters)
        {
            string key = $"{path}.{name}";
            if (value is null)
            {
                throw config.Error(key, $"parameter '{name}' has no value.");
            }

            var p = spec.Find(name);
            if (p is null)
            {
                string problem = spec.Rejected?.TryGetValue(name, out var why) == true
                    ? $"{why}."
                    : $"unknown parameter '{name}' for merge method '{spec.Name}'; accepted: {spec.Accepted()}.";
                throw config.Error(key, problem);
            }

            if (perModel && p.Scope == ParameterScope.Global)
            {
                throw config.Error(key,
                    $"'{name}' is a global parameter of '{spec.Name}' (mergekit reads it only from the top-level 'parameters' and ignores it here); move it there. Per-model parameters: {string.Join(", ", spec.Parameters.Where(q => q.Scope == ParameterScope.PerModel).Select(q => q.Name).DefaultIfEmpty("none"))}.");
            }

            CheckType(config, key, name, p, value);
        }
    }

    private static void CheckType(MergeConfig config, string key, string name, ParameterSpec p, ParameterValue value)
    {
        switch (value)
        {
            case BooleanParameter when !p.IsBoolean:
                throw config.Error(key, $"'{name}' is a number, not true/false.");
            case NumberParameter or GradientParameter when p.IsBoolean:
                throw config.Error(key, $"'{name}' is true or false, not a number or a gradient.");
            case ConditionalParameter c:
                for (int i = 0; i < c.Conditions.Count; i++)
                {
                    CheckType(config, $"{key}[{i}].value", name, p, c.Conditions[i].Value);
                }

                break;
        }
    }

    private static void CheckDType(MergeConfig config, string? name, string key)
    {
        if (name is not null && DTypeNames.Parse(name) is null)
        {
            throw config.Error(key, $"unknown dtype '{name}'; accepted: {DTypeNames.Accepted}.");
        }
    }
}
