using MergeLab.Config;
using NUnit.Framework;

namespace MergeLab.Tests.Config;

public class MergeConfigParseTests
{
    [Test]
    public void A_full_config_parses_into_its_records()
    {
        var config = MergeConfig.Parse("""
            models:
              - model: experts/math
                parameters:
                  weight: 1
                  density: [0.2, 0.8]
              - model: {model: experts/code}
                parameters:
                  weight: 0.5
                  density:
                    - filter: mlp
                      value: 0.5
                    - value: 0.9
              - model:
                  model: {path: base}
            base_model: base
            merge_method: ties
            parameters:
              normalize: false
              lambda: 1.5
              int8_mask: yes
            dtype: bfloat16
            out_dtype: float32
            tokenizer_source: base
            """, "/configs/merge.yml");

        Assert.That(config.MergeMethod, Is.EqualTo("ties"));
        Assert.That(config.Models.Select(m => m.Path), Is.EqualTo(new[] { "experts/math", "experts/code", "base" }));
        Assert.That(config.BaseModel, Is.EqualTo("base"));
        Assert.That(config.DType, Is.EqualTo("bfloat16"));
        Assert.That(config.OutDType, Is.EqualTo("float32"));
        Assert.That(config.TokenizerSource, Is.EqualTo("base"));
        Assert.That(config.SourcePath, Is.EqualTo("/configs/merge.yml"));

        Assert.That(config.Models[0].Parameters["weight"], Is.EqualTo(new NumberParameter(1)));
        Assert.That(config.Models[0].Parameters["weight"].Line, Is.EqualTo(4));
        Assert.That(config.Models[0].Parameters["density"], Is.EqualTo(new GradientParameter([0.2, 0.8])));
        Assert.That(config.Models[1].Parameters["density"], Is.EqualTo(new ConditionalParameter(
        [
            new ParameterCondition("mlp", new NumberParameter(0.5)),
            new ParameterCondition(null, new NumberParameter(0.9)),
        ])));
        Assert.That(config.Models[2].Parameters, Is.Empty);
        Assert.That(config.Parameters["normalize"], Is.InstanceOf<BooleanParameter>().And.Property("Value").False);
        Assert.That(config.Parameters["int8_mask"], Is.InstanceOf<BooleanParameter>().And.Property("Value").True);
        Assert.That(config.Parameters["lambda"].Resolve("x", 0), Is.EqualTo(1.5));
    }

    [Test]
    public void Yaml_merge_keys_copy_a_mapping_and_its_own_keys_override_as_in_pyyaml()
    {
        // mergekit reads configs with PyYAML's safe_load, which expands "<<: *anchor" (and a list of them).
        var config = MergeConfig.Parse("""
            merge_method: ties
            base_model: base
            models:
              - model: m1
                parameters: &common {weight: 1.0, density: 0.5}
              - model: m2
                parameters:
                  <<: *common
                  weight: 0.3
              - &third {model: m3, parameters: {weight: 2}}
              - <<: [*third]
                model: m4
            """);
        Assert.That(config.Models.Select(m => m.Path), Is.EqualTo(new[] { "m1", "m2", "m3", "m4" }));
        Assert.That(config.Models[1].Parameters["weight"], Is.EqualTo(new NumberParameter(0.3)));
        Assert.That(config.Models[1].Parameters["density"], Is.EqualTo(new NumberParameter(0.5)));
        Assert.That(config.Models[1].Parameters.Keys.Order(), Is.EqualTo(new[] { "density", "weight" }));
        Assert.That(config.Models[3].Parameters["weight"], Is.EqualTo(new NumberParameter(2)));

        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      <<: 5\n"));
        Assert.That(ex!.Message, Does.Contain("line 5, models[0].parameters.<<: a merge key takes a mapping or a list of mappings"));
        ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("merge_method: linear\nparameters: {normalize: &s true}\nmodels:\n  - model: m1\n    parameters:\n      <<: *s\n"));
        Assert.That(ex!.Message, Does.Contain("line 6, models[0].parameters.<<"), "the merge key's line, not the anchor's");
    }

    [Test]
    public void Unknown_parameter_key_is_reported_with_its_path_and_line()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
                parameters:
                  weight: 1
              - model: b
                parameters:
                  weight: 1
                  densty: 0.5
            base_model: base
            merge_method: ties
            """, "merge.yml"))!;
        Assert.That(ex.Message, Does.Contain("merge.yml").And.Contain("line 8").And.Contain("models[1].parameters.densty"));
        Assert.That(ex.Message, Does.Contain("weight, density"));
        Assert.That(ex.Line, Is.EqualTo(8));
        Assert.That(ex.KeyPath, Is.EqualTo("models[1].parameters.densty"));
    }

    [Test]
    public void Unknown_top_level_and_model_keys_are_errors()
    {
        var top = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
            merge_method: linear
            weights: [1, 2]
            """))!;
        Assert.That(top.Message, Does.Contain("line 4").And.Contain("unknown key 'weights'"));

        var inModel = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
                weight: 1
            merge_method: linear
            """))!;
        Assert.That(inModel.Message, Does.Contain("line 3").And.Contain("models[0].weight"));

        var inCondition = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
            merge_method: linear
            parameters:
              weight: [{filtr: mlp, value: 1}]
            """))!;
        Assert.That(inCondition.Message, Does.Contain("parameters.weight[0].filtr"));
    }

    [Test]
    public void Mergekit_sections_that_are_not_supported_say_so()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            slices:
              - sources:
                  - model: a
                    layer_range: [0, 16]
            merge_method: passthrough
            """))!;
        Assert.That(ex.Message, Does.Contain("'slices' is not supported"));

        var tok = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a}]
            merge_method: linear
            tokenizer: {source: union}
            """))!;
        Assert.That(tok.Message, Does.Contain("'tokenizer' is not supported"));

        var union = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a}]
            merge_method: linear
            tokenizer_source: union
            """))!;
        Assert.That(union.Message, Does.Contain("tokenizer_source").And.Contain("'union' is not supported"));
    }

    [Test]
    public void Unknown_method_is_an_error_listing_the_supported_ones()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a}]
            merge_method: tie
            """))!;
        Assert.That(ex.Message, Does.Contain("line 2").And.Contain("unknown merge method 'tie'").And.Contain("dare_ties"));

        var slerp = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a}]
            merge_method: slerp
            """))!;
        Assert.That(slerp.Message, Does.Contain("mergekit method that MergeLab does not implement"));
    }

    [Test]
    public void Gamma_on_ties_is_rejected_naming_the_accepted_parameters()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
                parameters: {weight: 1, density: 0.5, gamma: 0.01}
            base_model: base
            merge_method: ties
            """))!;
        Assert.That(ex.Message, Does.Contain("unknown parameter 'gamma'").And.Contain("'ties'").And.Contain("line 3"));
        Assert.That(ex.Message, Does.Contain("weight, density").And.Contain("normalize").And.Contain("lambda"));
    }

    [Test]
    public void Global_only_parameter_under_a_model_is_an_error()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
                parameters: {weight: 1, lambda: 2}
            base_model: base
            merge_method: task_arithmetic
            """))!;
        Assert.That(ex.Message, Does.Contain("models[0].parameters.lambda").And.Contain("global parameter"));
    }

    [Test]
    public void Parameters_without_effect_are_errors()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models:
              - model: a
                parameters: {weight: 1, density: 0.5}
            base_model: base
            merge_method: task_arithmetic
            """))!;
        Assert.That(ex.Message, Does.Contain("'density'").And.Contain("no effect"));
    }

    [Test]
    public void Value_types_are_checked()
    {
        var boolForNumber = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a, parameters: {weight: true}}]
            merge_method: linear
            """))!;
        Assert.That(boolForNumber.Message, Does.Contain("'weight' is a number"));

        var numberForBool = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a, parameters: {weight: 1}}]
            merge_method: linear
            parameters: {normalize: [0, 1]}
            """))!;
        Assert.That(numberForBool.Message, Does.Contain("'normalize' is true or false"));

        var text = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a, parameters: {weight: heavy}}]
            merge_method: linear
            """))!;
        Assert.That(text.Message, Does.Contain("'heavy' is not a finite number"));

        var badGradient = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a, parameters: {weight: [1, x]}}]
            merge_method: linear
            """))!;
        Assert.That(badGradient.Message, Does.Contain("models[0].parameters.weight[1]"));
    }

    [Test]
    public void Bad_yaml_missing_keys_and_bad_dtypes_are_reported()
    {
        var yaml = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("models: [a\nmerge_method: linear\n", "x.yml"))!;
        Assert.That(yaml.Message, Does.Contain("x.yml").And.Contain("invalid YAML"));

        // YamlDotNet's scanner fails on a flow mapping left open before a block with an
        // InvalidOperationException that has no position; the message still names the line reached.
        var open = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("merge_method: ties\nbase_model: {a: 1\nmodels:\n  - model: x\n", "x.yml"))!;
        Assert.That(open.Message, Does.Contain("line 3").And.Contain("bracket or brace"));
        Assert.That(open.InnerException, Is.InstanceOf<InvalidOperationException>());

        var duplicate = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("""
            models: [{model: a}]
            merge_method: linear
            merge_method: ties
            """))!;
        Assert.That(duplicate.Message, Does.Contain("line 3"));

        // A tab in the indentation: YamlDotNet puts it at the enclosing mapping's start (line 1 here);
        // the message names the tabbed line.
        var tab = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("merge_method: linear\nmodels:\n  - model: a\n\t- model: b\n", "x.yml"))!;
        Assert.That(tab.Message, Does.Contain("line 4").And.Contain("tab"));

        // A tab YAML allows earlier on (leading a quoted scalar's continuation line) is not the one reported.
        tab = Assert.Throws<MergeConfigException>(() => MergeConfig.Parse("merge_method: \"linear\n\tx\"\nmodels:\n  - model: a\n\t- model: b\n", "x.yml"))!;
        Assert.That(tab.Message, Does.Contain("line 5").And.Contain("tab"));

        Assert.That(() => MergeConfig.Parse("models: [{model: a}]\n"), Throws.TypeOf<MergeConfigException>().With.Message.Contain("'merge_method' is required"));
        Assert.That(() => MergeConfig.Parse("merge_method: linear\n"), Throws.TypeOf<MergeConfigException>().With.Message.Contain("'models' is required"));
        Assert.That(() => MergeConfig.Parse(""), Throws.TypeOf<MergeConfigException>().With.Message.Contain("empty"));
        Assert.That(() => MergeConfig.Parse("models: [{model: a}]\nmerge_method: linear\ndtype: float8\n"),
            Throws.TypeOf<MergeConfigException>().With.Message.Contain("unknown dtype 'float8'").And.Message.Contain("line 3"));
        Assert.That(() => MergeConfig.Parse("models:\n  - model: {model: a, lora: b}\nmerge_method: linear\n"),
            Throws.TypeOf<MergeConfigException>().With.Message.Contain("'lora' is not supported"));
    }

    [Test]
    public void Load_names_the_file_it_cannot_read()
    {
        var ex = Assert.Throws<MergeConfigException>(() => MergeConfig.Load("/nonexistent/merge.yml"))!;
        Assert.That(ex.Message, Does.Contain("/nonexistent/merge.yml").And.Contain("cannot read"));

        // A folder given by mistake (e.g. a model folder) is named as one, not as a missing file.
        string folder = Path.GetTempPath();
        var dir = Assert.Throws<MergeConfigException>(() => MergeConfig.Load(folder))!;
        Assert.That(dir.Message, Does.Contain("is a folder").And.Not.Contain("Could not find"));
    }
}
