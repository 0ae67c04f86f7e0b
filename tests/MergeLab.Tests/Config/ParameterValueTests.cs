using MergeLab.Config;
using NUnit.Framework;

namespace MergeLab.Tests.Config;

public class ParameterValueTests
{
    [Test]
    public void Gradient_interpolates_piecewise_linearly_between_evenly_spaced_points()
    {
        var g = new GradientParameter([0.2, 0.8]);
        Assert.That(g.Resolve("x", 0), Is.EqualTo(0.2).Within(1e-12));
        Assert.That(g.Resolve("x", 0.5), Is.EqualTo(0.5).Within(1e-12));
        Assert.That(g.Resolve("x", 1), Is.EqualTo(0.8).Within(1e-12));

        // Three points sit at t = 0, .5, 1: t = .75 is halfway between the last two.
        var three = new GradientParameter([0, 1, 0.5]);
        Assert.That(three.Resolve("x", 0.25), Is.EqualTo(0.5).Within(1e-12));
        Assert.That(three.Resolve("x", 0.75), Is.EqualTo(0.75).Within(1e-12));
        Assert.That(three.Resolve("x", 1), Is.EqualTo(0.5).Within(1e-12));
    }

    [Test]
    public void One_point_gradient_is_a_constant()
    {
        var g = new GradientParameter([0.3]);
        Assert.That(new[] { 0.0, 0.4, 1.0 }.Select(t => g.Resolve("x", t)), Is.All.EqualTo(0.3));
        Assert.That(g.VariesByTensor, Is.False);
    }

    [Test]
    public void First_matching_filter_wins_and_an_entry_without_filter_is_the_fallback()
    {
        var p = new ConditionalParameter(
        [
            new ParameterCondition("mlp", new NumberParameter(0.5)),
            new ParameterCondition("self_attn", new GradientParameter([0, 1])),
            new ParameterCondition(null, new NumberParameter(0.9)),
        ]);
        Assert.That(p.Resolve("model.layers.0.mlp.up_proj.weight", 0.3), Is.EqualTo(0.5));
        Assert.That(p.Resolve("model.layers.1.self_attn.q_proj.weight", 0.25), Is.EqualTo(0.25).Within(1e-12));
        Assert.That(p.Resolve("lm_head.weight", 0), Is.EqualTo(0.9));
    }

    [Test]
    public void Conditions_that_all_miss_leave_the_value_unset()
    {
        var p = new ConditionalParameter([new ParameterCondition("mlp", new NumberParameter(0.5))]);
        Assert.That(p.Resolve("model.norm.weight", 0), Is.Null);
        var star = new ConditionalParameter([new ParameterCondition("*", new NumberParameter(0.7))]);
        Assert.That(star.Resolve("model.norm.weight", 0), Is.EqualTo(0.7));
    }

    [Test]
    public void Booleans_resolve_to_one_and_zero()
    {
        Assert.That(new BooleanParameter(true).Resolve("x", 0), Is.EqualTo(1));
        Assert.That(new BooleanParameter(false).Resolve("x", 1), Is.EqualTo(0));
    }

    [Test]
    public void Position_outside_zero_to_one_is_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new NumberParameter(1).Resolve("x", 1.5));
        Assert.Throws<ArgumentException>(() => _ = new GradientParameter([]));
    }
}

public class LayerPositionsTests
{
    [Test]
    public void Layer_i_of_n_sits_at_i_over_n_minus_one_and_everything_else_at_zero()
    {
        var layers = LayerPositions.FromTensorNames(ConfigNames.ThreeLayers);
        Assert.That(layers.PositionOf(ConfigNames.Mlp(0)), Is.EqualTo(0));
        Assert.That(layers.PositionOf(ConfigNames.Attn(1)), Is.EqualTo(0.5));
        Assert.That(layers.PositionOf(ConfigNames.Mlp(2)), Is.EqualTo(1));
        Assert.That(layers.LayerCount(ConfigNames.Mlp(2)), Is.EqualTo(3));

        // mergekit plans pre- and post-layer weights alike at t = 0.
        Assert.That(layers.PositionOf(ConfigNames.Embed), Is.EqualTo(0));
        Assert.That(layers.PositionOf(ConfigNames.Norm), Is.EqualTo(0));
        Assert.That(layers.PositionOf(ConfigNames.Head), Is.EqualTo(0));
    }

    [TestCase("model.layers.12.mlp.up_proj.weight", 12)]
    [TestCase("transformer.h.3.attn.c_attn.weight", 3)]
    [TestCase("blocks.0.norm1.weight", 0)]
    [TestCase("encoder.layer.7.attention.self.query.weight", 7)]
    [TestCase("model.embed_tokens.weight", null)]
    [TestCase("model.layers_norm.12.weight", null)]
    [TestCase("model.layers.12", null)]
    public void Layer_index_is_parsed_from_the_usual_patterns(string name, int? index) =>
        Assert.That(LayerPositions.LayerIndex(name), Is.EqualTo(index));

    [Test]
    public void A_single_layer_sits_at_one_as_in_mergekit()
    {
        var layers = LayerPositions.FromTensorNames(["emb.weight", "layers.0.weight"]);
        Assert.That(layers.PositionOf("layers.0.weight"), Is.EqualTo(1));
        Assert.That(layers.PositionOf("emb.weight"), Is.EqualTo(0));
    }

    [Test]
    public void Each_stack_of_layers_is_counted_on_its_own()
    {
        var layers = LayerPositions.FromTensorNames(
            ["vision.encoder.layers.0.w", "vision.encoder.layers.1.w", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "model.layers.3.w", "model.layers.4.w"]);
        Assert.That(layers.PositionOf("vision.encoder.layers.1.w"), Is.EqualTo(1));
        Assert.That(layers.PositionOf("model.layers.1.w"), Is.EqualTo(0.25));
    }
}
