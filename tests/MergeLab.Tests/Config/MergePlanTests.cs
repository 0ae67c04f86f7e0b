using MergeLab.Config;
using MergeLab.Methods;
using MergeLab.Stages;
using NUnit.Framework;
using static MergeLab.Tests.Config.ConfigNames;
using static TorchSharp.torch;

namespace MergeLab.Tests.Config;

public sealed class MergePlanTests : IDisposable
{
    // One folder for the fixture: the tests only add models and overwrite merge.yml, one at a time.
    private readonly ConfigFolder _folder = new("base", "math", "code");

    public void Dispose() => _folder.Dispose();

    private MergePlan Plan(string yaml, long seed = 0) =>
        MergePlan.Create(MergeConfig.Load(_folder.Write(yaml)), ThreeLayers, seed);

    /// <summary>A config over base, math and code with the given method and parameter lines.</summary>
    private static string TwoExperts(string method, string math = "weight: 1", string code = "weight: 0.5", string global = "") => $"""
        models:
          - model: math
            parameters: {"{"}{math}{"}"}
          - model: code
            parameters: {"{"}{code}{"}"}
        base_model: base
        merge_method: {method}
        {(global.Length == 0 ? "" : "parameters: {" + global + "}")}
        """;

    // ---- one config per method ---------------------------------------------------------------

    [Test]
    public void Linear_maps_weights_and_normalize()
    {
        var plan = Plan("""
            models:
              - model: math
                parameters: {weight: 2}
              - model: code
                parameters: {weight: 1}
            merge_method: linear
            dtype: bfloat16
            """);
        var m = (WeightAverageMerge)plan.MethodFor(Mlp(0));
        Assert.That(m.Options.Weights, Is.EqualTo(new[] { 2.0, 1.0 }));
        Assert.That(m.Options.Normalize, Is.True);
        Assert.That(plan.BaseModelPath, Is.Null);
        Assert.That(plan.ExpertPaths, Is.EqualTo(new[] { Path.Combine(_folder.Root, "math"), Path.Combine(_folder.Root, "code") }));
        Assert.That(plan.OutputDType, Is.EqualTo(ScalarType.BFloat16));
        Assert.That(plan.TokenizerSource, Is.EqualTo(Path.Combine(_folder.Root, "math")));

        // Weights that sum to 0 cannot be normalized; the values come from several keys, so the message
        // states them (it named a top-level 'parameters' key the file did not have).
        var ex = Assert.Throws<MergeConfigException>(() => Plan("""
            models:
              - model: math
                parameters: {weight: 1}
              - model: code
                parameters: {weight: -1}
            merge_method: linear
            """))!;
        Assert.That(ex.Message, Does.Contain("(normalize: true, weight: [1, -1])").And.Contain("sum to 0").And.Not.Contain("parameters:"));
        Assert.That(ex.Message, Does.Contain("the parameters (normalize").And.Not.Contain("tensor '"),
            "no value depends on the tensor, so none is named (it would be the first one, " + Embed + ")");
    }

    [Test]
    public void Linear_averages_the_base_model_too_as_mergekit_does()
    {
        var plan = Plan(TwoExperts("linear", global: "weight: 0.25"));
        Assert.That(plan.ExpertPaths, Is.EqualTo(new[] { "math", "code", "base" }.Select(n => Path.Combine(_folder.Root, n))));
        Assert.That(((WeightAverageMerge)plan.MethodFor(Mlp(0))).Options.Weights, Is.EqualTo(new[] { 1, 0.5, 0.25 }));

        var ex = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("linear")))!;
        Assert.That(ex.Message, Does.Contain("base_model").And.Contain("'linear' averages base_model").And.Contain("needs a 'weight'"));
    }

    [Test]
    public void Task_arithmetic_maps_weights_lambda_and_normalize()
    {
        var m = (TaskArithmeticMerge)Plan(TwoExperts("task_arithmetic", global: "lambda: 0.7")).MethodFor(Attn(1));
        Assert.That(m.Options, Is.EqualTo(new TaskArithmeticOptions { Weights = m.Options.Weights, Lambda = 0.7, Normalize = false }));
        Assert.That(m.Options.Weights, Is.EqualTo(new[] { 1, 0.5 }));
    }

    [Test]
    public void Ties_uses_the_mergekit_preset_and_normalizes_by_default()
    {
        var m = (TiesMerge)Plan(TwoExperts("ties", "weight: 1, density: 0.5", "weight: 0.5, density: 0.3")).MethodFor(Mlp(1));
        Assert.That(m.Options.Preset, Is.EqualTo(TiesPreset.Mergekit));
        Assert.That(m.Options.Densities, Is.EqualTo(new[] { 0.5, 0.3 }));
        Assert.That(m.Options.Weights, Is.EqualTo(new[] { 1, 0.5 }));
        Assert.That(m.Options.Lambda, Is.EqualTo(1));
        Assert.That(m.Options.Aggregation, Is.EqualTo(Aggregation.WeightNormalized));

        var sum = (TiesMerge)Plan(TwoExperts("ties", global: "normalize: false")).MethodFor(Mlp(1));
        Assert.That(sum.Options.Aggregation, Is.EqualTo(Aggregation.Sum));
        Assert.That(sum.Options.Densities, Is.EqualTo(new[] { 1.0, 1.0 }), "mergekit's default density is 1");
    }

    [Test]
    public void Dare_linear_maps_density_to_drop_rate_with_l1_rescale_and_the_seed()
    {
        var m = (DareMerge)Plan(TwoExperts("dare_linear", "weight: 1, density: 0.25", "weight: 0.5, density: 1"), seed: 42).MethodFor(Mlp(0));
        Assert.That(m.Name, Is.EqualTo("dare_linear"));
        Assert.That(m.Options.DropRates, Is.EqualTo(new[] { 0.75, 0.0 }));
        Assert.That(m.Options.Rescale, Is.EqualTo(RescaleNorm.L1));
        Assert.That(m.Options.Combination, Is.EqualTo(Combination.Linear));
        Assert.That(m.Options.Aggregation, Is.EqualTo(Aggregation.Sum));
        Assert.That(m.Options.Seed, Is.EqualTo(42));
    }

    [Test]
    public void Dare_ties_uses_mergekit_consensus_and_honours_rescale_and_normalize()
    {
        var m = (DareMerge)Plan(TwoExperts("dare_ties", "weight: 1, density: 0.5", "weight: 0.5, density: 0.5",
            "rescale: false, normalize: true, int8_mask: true, lambda: 1.2")).MethodFor(Mlp(0));
        Assert.That(m.Name, Is.EqualTo("dare_ties"));
        Assert.That(m.Options.Combination, Is.EqualTo(Combination.Ties));
        Assert.That(m.Options.ConsensusPreset, Is.EqualTo(TiesPreset.Mergekit));
        Assert.That(m.Options.Rescale, Is.EqualTo(RescaleNorm.None));
        Assert.That(m.Options.Aggregation, Is.EqualTo(Aggregation.WeightNormalized));
        Assert.That(m.Options.Lambda, Is.EqualTo(1.2));
        Assert.That(m.Options.DropRates, Is.EqualTo(new[] { 0.5, 0.5 }));
    }

    [Test]
    public void Breadcrumbs_uses_the_mergekit_variant_and_its_gamma_default()
    {
        var m = (BreadcrumbsMerge)Plan(TwoExperts("breadcrumbs", "weight: 1, density: 0.9, gamma: 0.05", "weight: 0.5, density: 0.8")).MethodFor(Mlp(0));
        Assert.That(m.Options.Variant, Is.EqualTo(BreadcrumbsVariant.Mergekit));
        Assert.That(m.Options.PerExpert, Is.EqualTo(new[] { (0.9, 0.05), (0.8, 0.01) }));
        Assert.That(m.Options.Combination, Is.EqualTo(Combination.Linear));
        Assert.That(m.Options.Aggregation, Is.EqualTo(Aggregation.Sum));
        Assert.That(m.Options.Weights, Is.EqualTo(new[] { 1, 0.5 }));

        var ties = (BreadcrumbsMerge)Plan(TwoExperts("breadcrumbs_ties", global: "density: 0.9, gamma: 0.02")).MethodFor(Mlp(0));
        Assert.That(ties.Name, Is.EqualTo("breadcrumbs_ties"));
        Assert.That(ties.Options.Combination, Is.EqualTo(Combination.Ties));
        Assert.That(ties.Options.ConsensusPreset, Is.EqualTo(TiesPreset.Mergekit));
        Assert.That(ties.Options.PerExpert, Is.EqualTo(new[] { (0.9, 0.02), (0.9, 0.02) }));
    }

    [TestCase("ties")]
    [TestCase("breadcrumbs")]
    [TestCase("breadcrumbs_ties")]
    public void Rescale_maps_to_the_l1_rescale_and_defaults_to_none(string method)
    {
        RescaleNorm RescaleOf(string global)
        {
            var m = Plan(TwoExperts(method, global: global)).MethodFor(Mlp(0));
            return m is TiesMerge ties ? ties.Options.Rescale : ((BreadcrumbsMerge)m).Options.Rescale;
        }

        Assert.That(RescaleOf("rescale: true"), Is.EqualTo(RescaleNorm.L1));
        Assert.That(RescaleOf("rescale: false"), Is.EqualTo(RescaleNorm.None));
        Assert.That(RescaleOf("lambda: 1"), Is.EqualTo(RescaleNorm.None), "mergekit's default for this method is rescale: false");
    }

    [Test]
    public void Pcb_maps_its_global_parameters_to_one_whole_model_method()
    {
        var plan = Plan("""
            models: [{model: math}, {model: code}]
            base_model: base
            merge_method: pcb
            parameters: {ratio: 0.2, clamp_low: 0.01, clamp_high: 0.02, lambda: 0.8}
            """);
        var m = (PcbMerge)plan.MethodFor(Mlp(0));
        Assert.That(m.Options, Is.EqualTo(new PcbOptions { Ratio = 0.2, ClampLow = 0.01, ClampHigh = 0.02, Lambda = 0.8 }));
        Assert.That(plan.Methods, Has.Count.EqualTo(1));
        Assert.That(ThreeLayers.Select(plan.MethodFor), Is.All.SameAs(m));

        var ex = Assert.Throws<MergeConfigException>(() => Plan("""
            models: [{model: math}, {model: code}]
            base_model: base
            merge_method: pcb
            parameters: {ratio: [0.1, 0.3]}
            """))!;
        Assert.That(ex.Message, Does.Contain("whole model").And.Contain("parameters.ratio"));
        Assert.That(() => Plan(TwoExperts("pcb")), Throws.TypeOf<MergeConfigException>().With.Message.Contain("unknown parameter 'weight'"));
    }

    [Test]
    public void Ties_paper_uses_the_paper_preset()
    {
        var m = (TiesMerge)Plan(TwoExperts("ties_paper", "density: 0.3", "density: 0.1", "lambda: 1.5")).MethodFor(Mlp(0));
        Assert.That(m.Options.Preset, Is.EqualTo(TiesPreset.Paper));
        Assert.That(m.Options.Densities, Is.EqualTo(new[] { 0.3, 0.1 }));
        Assert.That(m.Options.Weights, Is.EqualTo(new[] { 1.0, 1.0 }));
        Assert.That(m.Options.Lambda, Is.EqualTo(1.5));
        Assert.That(m.CreateStatistic(2), Is.Not.Null, "whole-model trim");
    }

    // ---- numbers -----------------------------------------------------------------------------

    [Test]
    public void Ties_plan_merges_a_tensor_as_mergekit_would()
    {
        var plan = Plan(TwoExperts("ties", "weight: 1, density: 0.5", "weight: 0.5, density: 0.5"));
        using var scope = NewDisposeScope();
        var b = tensor(new float[] { 1, 1, 1, 1, 1, 1 });
        var math = b + tensor(new float[] { 4, -3, 2, 1, 0.5f, -1 });
        var code = b + tensor(new float[] { -6, 2, 3, -1, 5, 0.2f });

        // mergekit: trim to the top 3 |τ| each → τ_math = [4, −3, 2, 0, 0, 0], τ_code = [−6, 0, 3, 0, 5, 0];
        // weighted: [4, −3, 2, 0, 0, 0] and [−3, 0, 1.5, 0, 2.5, 0]; sign of the sums [1, −3, 3.5, 0, 2.5, 0]
        // is [+, −, +, +, +, +]; agreeing sums [4, −3, 3.5, 0, 2.5, 0] over agreeing weights [1, 1, 1.5, 0→1, .5, 0→1].
        var merged = plan.MethodFor(Mlp(1)).MergeTensor(new TensorGroup(Mlp(1), b, [math, code]));
        T.Near(merged, [5, -2, 1 + 3.5 / 1.5, 1, 6, 1]);

        var sumPlan = Plan(TwoExperts("ties", "weight: 1, density: 0.5", "weight: 0.5, density: 0.5", "normalize: false"));
        var summed = sumPlan.MethodFor(Mlp(1)).MergeTensor(new TensorGroup(Mlp(1), b, [math, code]));
        T.Near(summed, [5, -2, 4.5, 1, 3.5, 1]);
    }

    [Test]
    public void Dare_plan_with_density_one_is_plain_task_arithmetic()
    {
        var plan = Plan(TwoExperts("dare_linear", "weight: 1", "weight: 0.5", "lambda: 2"), seed: 7);
        using var scope = NewDisposeScope();
        var b = tensor(new float[] { 1, 2, 3 });
        var math = tensor(new float[] { 2, 2, 2 });
        var code = tensor(new float[] { 1, 4, 1 });
        var merged = plan.MethodFor(Head).MergeTensor(new TensorGroup(Head, b, [math, code]));
        // θ = b + 2·(1·[1, 0, −1] + 0.5·[0, 2, −2])
        T.Near(merged, [3, 4, -1]);
    }

    // ---- resolution --------------------------------------------------------------------------

    [Test]
    public void Gradient_over_three_layers_and_embeddings_at_the_first_point()
    {
        var plan = Plan(TwoExperts("ties", "weight: 1", "weight: 1", "density: [0.2, 0.8]"));
        double Density(string name) => ((TiesMerge)plan.MethodFor(name)).Options.Densities![0];
        Assert.That(Density(Mlp(0)), Is.EqualTo(0.2).Within(1e-12));
        Assert.That(Density(Attn(1)), Is.EqualTo(0.5).Within(1e-12));
        Assert.That(Density(Mlp(2)), Is.EqualTo(0.8).Within(1e-12));
        Assert.That(Density(Embed), Is.EqualTo(0.2).Within(1e-12));
        Assert.That(Density(Head), Is.EqualTo(0.2).Within(1e-12), "mergekit evaluates post-layer weights at t = 0");
        Assert.That(plan.Methods, Has.Count.EqualTo(3));
        Assert.That(plan.MethodFor(Attn(0)), Is.SameAs(plan.MethodFor(Mlp(0))), "one method per distinct parameter set");
    }

    [Test]
    public void Filter_list_first_match_wins_with_a_fallback()
    {
        var plan = Plan(TwoExperts("ties", "weight: 1", "weight: 1", "density: [{filter: mlp, value: 0.5}, {value: 0.9}]"));
        Assert.That(((TiesMerge)plan.MethodFor(Mlp(2))).Options.Densities, Is.EqualTo(new[] { 0.5, 0.5 }));
        Assert.That(((TiesMerge)plan.MethodFor(Attn(2))).Options.Densities, Is.EqualTo(new[] { 0.9, 0.9 }));
        Assert.That(((TiesMerge)plan.MethodFor(Embed)).Options.Densities, Is.EqualTo(new[] { 0.9, 0.9 }));
    }

    [Test]
    public void Model_parameters_override_global_ones_which_override_defaults()
    {
        var plan = Plan(TwoExperts("ties", "weight: 1, density: 0.3", "weight: 1", "density: 0.6"));
        Assert.That(((TiesMerge)plan.MethodFor(Mlp(0))).Options.Densities, Is.EqualTo(new[] { 0.3, 0.6 }));

        var defaults = Plan(TwoExperts("ties", "weight: 1, density: 0.3", "weight: 1"));
        Assert.That(((TiesMerge)defaults.MethodFor(Mlp(0))).Options.Densities, Is.EqualTo(new[] { 0.3, 1.0 }));

        // A model's filter list that misses a tensor falls through to the global value, as in mergekit.
        var fallThrough = Plan(TwoExperts("ties", "weight: 1, density: [{filter: mlp, value: 0.3}]", "weight: 1", "density: 0.7"));
        Assert.That(((TiesMerge)fallThrough.MethodFor(Mlp(0))).Options.Densities, Is.EqualTo(new[] { 0.3, 0.7 }));
        Assert.That(((TiesMerge)fallThrough.MethodFor(Attn(0))).Options.Densities, Is.EqualTo(new[] { 0.7, 0.7 }));
    }

    [Test]
    public void Values_are_checked_for_every_tensor_before_work_starts()
    {
        var ex = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("ties", "weight: 1", "weight: 1", "density: [0.5, 1.5]")))!;
        Assert.That(ex.Message, Does.Contain("parameters.density").And.Contain("line 8").And.Contain("must be in [0, 1]"));
        Assert.That(ex.Message, Does.Contain(Mlp(2)), "the first tensor where it goes out of range");

        var dare = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("dare_ties", "weight: 1, density: 0", "weight: 1")))!;
        Assert.That(dare.Message, Does.Contain("models[0].parameters.density").And.Contain("(0, 1]"));
        Assert.That(dare.Message, Does.Not.Contain("tensor '"), "one value for every tensor: no tensor named (it would be the first, " + Embed + ")");

        // A model's list of conditions that misses a tensor falls through to the global value, which is out
        // of range for every tensor: the value at fault is a constant, so no tensor is named, whichever model
        // is checked first.
        foreach (var (math, code) in new[] { ("weight: 1, density: [{filter: mlp, value: 0.3}]", "weight: 1"), ("weight: 1", "weight: 1, density: [{filter: mlp, value: 0.3}]") })
        {
            var fallThrough = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("ties", math, code, "density: 1.5")))!;
            Assert.That(fallThrough.Message, Does.Contain("parameters.density").And.Contain("must be in [0, 1]").And.Not.Contain("tensor '"));
        }
    }

    [Test]
    public void Missing_weight_is_an_error_as_in_mergekit()
    {
        var ex = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("ties", "weight: 1", "density: 0.5")))!;
        Assert.That(ex.Message, Does.Contain("models[1]").And.Contain("no 'weight'").And.Contain("code"));
        Assert.That(ex.Message, Does.Not.Contain("tensor '"), "missing for every tensor alike");

        // Conditions that give a weight to the MLP tensors only leave the others without one: named.
        var partial = Assert.Throws<MergeConfigException>(() => Plan(TwoExperts("ties", "weight: 1", "weight: [{filter: mlp, value: 1}]")))!;
        Assert.That(partial.Message, Does.Contain("models[1]").And.Contain("no 'weight'").And.Contain($"tensor '{Embed}'"));
    }

    [Test]
    public void Base_listed_among_the_models_is_not_an_expert()
    {
        var plan = Plan("""
            models:
              - model: base
              - model: math
                parameters: {weight: 1}
              - model: ./code/
                parameters: {weight: 1}
            base_model: ./base
            merge_method: task_arithmetic
            """);
        Assert.That(plan.BaseModelPath, Is.EqualTo(Path.Combine(_folder.Root, "base")));
        Assert.That(plan.ExpertPaths, Is.EqualTo(new[] { Path.Combine(_folder.Root, "math"), Path.Combine(_folder.Root, "code") }));
        Assert.That(plan.TokenizerSource, Is.EqualTo(plan.BaseModelPath));
    }

    [Test]
    public void Relative_paths_resolve_against_the_config_files_directory()
    {
        _folder.Model("models/base");
        _folder.Model("models/a");
        var path = _folder.Write("""
            models:
              - model: ../models/a
                parameters: {weight: 1}
            base_model: ../models/base
            merge_method: task_arithmetic
            tokenizer_source: ../models/a
            out_dtype: fp16
            dtype: float32
            """, "configs/merge.yml");
        var plan = MergePlan.Create(MergeConfig.Load(path), ThreeLayers);
        Assert.That(plan.BaseModelPath, Is.EqualTo(Path.Combine(_folder.Root, "models", "base")));
        Assert.That(plan.ExpertPaths, Is.EqualTo(new[] { Path.Combine(_folder.Root, "models", "a") }));
        Assert.That(plan.TokenizerSource, Is.EqualTo(Path.Combine(_folder.Root, "models", "a")));
        Assert.That(plan.OutputDType, Is.EqualTo(ScalarType.Float16));
    }

    [Test]
    public void Missing_model_path_is_an_error_with_its_line()
    {
        var ex = Assert.Throws<MergeConfigException>(() => Plan("""
            models:
              - model: math
                parameters: {weight: 1}
              - model: chat
                parameters: {weight: 1}
            base_model: base
            merge_method: task_arithmetic
            """))!;
        Assert.That(ex.Message, Does.Contain("models[1].model").And.Contain("line 4").And.Contain("does not exist"));
        Assert.That(ex.Message, Does.Contain(Path.Combine(_folder.Root, "chat")));
    }

    [Test]
    public void Structural_errors_are_reported_before_work()
    {
        Assert.That(() => Plan("""
            models: [{model: math, parameters: {weight: 1}}]
            merge_method: ties
            """), Throws.TypeOf<MergeConfigException>().With.Message.Contain("needs 'base_model'"));
        Assert.That(() => Plan("""
            models: [{model: math, parameters: {weight: 1}}, {model: ./math, parameters: {weight: 1}}]
            base_model: base
            merge_method: ties
            """), Throws.TypeOf<MergeConfigException>().With.Message.Contain("listed twice"));
        Assert.That(() => Plan("""
            models: [{model: base}]
            base_model: base
            merge_method: ties
            """), Throws.TypeOf<MergeConfigException>().With.Message.Contain("at least one model"));
    }

    [Test]
    public void Tensor_names_can_come_from_the_base_checkpoint()
    {
        _folder.Checkpoint("ckpt/base", ThreeLayers);
        string math = _folder.Model("ckpt/math");
        var path = _folder.Write("""
            models:
              - model: math
                parameters: {weight: 1}
            base_model: base
            merge_method: ties
            parameters: {density: [0.2, 0.8]}
            """, "ckpt/merge.yml");
        // An expert folder without weights is named with its config line; PyTorch weights are named as such.
        File.WriteAllText(Path.Combine(math, "pytorch_model.bin"), "");
        var empty = Assert.Throws<MergeConfigException>(() => MergePlan.Create(MergeConfig.Load(path)))!;
        Assert.That(empty.Message, Does.Contain("line 2, models[0].model").And.Contain("has neither model.safetensors").And.Contain("convert them to safetensors"));

        _folder.Checkpoint("ckpt/math", ThreeLayers);
        var plan = MergePlan.Create(MergeConfig.Load(path), seed: 5);
        Assert.That(plan.Seed, Is.EqualTo(5));
        Assert.That(plan.Methods, Has.Count.EqualTo(3));
        Assert.That(plan.Method, Is.SameAs(plan.MethodFor(Embed)));
        Assert.That(((TiesMerge)plan.MethodFor(Mlp(1))).Options.Densities![0], Is.EqualTo(0.5).Within(1e-12));

        // A base directory without a checkpoint is a config error naming base_model.
        var ex = Assert.Throws<MergeConfigException>(() => MergePlan.Create(MergeConfig.Load(_folder.Write("""
            models:
              - model: math
                parameters: {weight: 1}
            base_model: base
            merge_method: ties
            """))))!;
        Assert.That(ex.Message, Does.Contain("base_model").And.Contain("cannot read the tensor names"));
    }

    [Test]
    public void A_config_built_in_code_is_checked_too()
    {
        var config = new MergeConfig
        {
            MergeMethod = "ties",
            Models = [new ModelReference(Path.Combine(_folder.Root, "math"), new Dictionary<string, ParameterValue> { ["gamma"] = new NumberParameter(0.1) })],
            BaseModel = Path.Combine(_folder.Root, "base"),
        };
        Assert.That(() => MergePlan.Create(config, ThreeLayers),
            Throws.TypeOf<MergeConfigException>().With.Message.Contain("models[0].parameters.gamma"));
    }
}
