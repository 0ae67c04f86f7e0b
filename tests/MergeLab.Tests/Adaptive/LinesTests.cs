using MergeLab.Adaptive;
using MergeLab.Methods;
using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Adaptive;

public class LinesTests
{
    /// <summary>A ViT-like layout: an embedding, three residual blocks, a final norm and a head.</summary>
    private static StateDict Model(long seed, double scale = 1.0)
    {
        using var g = new TorchSharp.torch.Generator((ulong)seed);
        return new StateDict
        {
            { "embed.weight", randn([4, 3], generator: g) * scale },
            { "blocks.0.attn.weight", randn([3, 3], generator: g) * scale },
            { "blocks.0.attn.bias", randn([3], generator: g) * scale },
            { "blocks.1.mlp.weight", randn([3, 3], generator: g) * scale },
            { "blocks.2.mlp.weight", randn([3, 3], generator: g) * scale },
            { "norm.weight", randn([3], generator: g) * scale },
            { "head.weight", randn([2, 3], generator: g) * scale },
        };
    }

    [Test]
    public void Alpha_one_beta_zero_is_the_identity_bit_for_bit()
    {
        using var baseModel = Model(1);
        using var fineTuned = Model(2);
        var identity = new LinesOptions { Alpha = 1, Beta = 0 };
        using var edited = Lines.Edit(baseModel, fineTuned, identity);
        foreach (var name in fineTuned.Names)
        {
            T.BitEqual(edited[name], fineTuned[name]);
        }

        using var tau = TaskVector.Between(fineTuned, baseModel);
        using var scaled = Lines.Scale(tau, identity);
        foreach (var name in tau.Names)
        {
            T.BitEqual(scaled[name], tau[name]);
        }
    }

    [Test]
    public void Each_block_is_scaled_by_alpha_plus_beta_l_over_L_minus_1()
    {
        using var baseModel = Model(1);
        using var fineTuned = Model(2);
        using var tau = TaskVector.Between(fineTuned, baseModel);
        var options = new LinesOptions { Alpha = 0.2, Beta = 0.6 };
        using var scaled = Lines.Scale(tau, options);
        var expected = new Dictionary<string, double>
        {
            ["embed.weight"] = 0.2,          // outside the blocks: α
            ["blocks.0.attn.weight"] = 0.2,  // l = 0: α
            ["blocks.0.attn.bias"] = 0.2,
            ["blocks.1.mlp.weight"] = 0.5,   // l = 1 of L = 3: α + β/2
            ["blocks.2.mlp.weight"] = 0.8,   // l = 2: α + β
            ["norm.weight"] = 0.2,
            ["head.weight"] = 0.2,
        };
        Assert.That(Lines.Factors(tau.Names, options), Is.EquivalentTo(expected).Using<double>((a, b) => Math.Abs(a - b) < 1e-12));
        foreach (var (name, f) in expected)
        {
            T.Near(scaled[name], T.Values(tau[name]).Select(v => v * f), 1e-6);
        }

        // The model edit is θ0 + λ(l)·(θ_ft − θ0).
        using var edited = Lines.Edit(baseModel, fineTuned, options);
        using var applied = Lines.Apply(baseModel, tau, options);
        foreach (var (name, f) in expected)
        {
            var b = T.Values(baseModel[name]);
            var ft = T.Values(fineTuned[name]);
            var hand = b.Select((v, i) => v + f * (ft[i] - v)).Select(v => (double)v);
            T.Near(edited[name], hand, 1e-5);
            T.Near(applied[name], hand, 1e-5);
        }
    }

    [Test]
    public void Single_task_options_keep_the_deepest_block_whole()
    {
        var o = Lines.SingleTask(0.1, blockCount: 12);
        Assert.That(o.Alpha, Is.EqualTo(0.1));
        Assert.That(o.Beta, Is.EqualTo(0.9).Within(1e-15));
        Assert.That(Lines.Factor(11, 12, o.Alpha, o.Beta), Is.EqualTo(1.0).Within(1e-15));
        Assert.That(Lines.Factor(0, 12, o.Alpha, o.Beta), Is.EqualTo(0.1));
        var defaults = new LinesOptions();
        Assert.That((defaults.Alpha, defaults.Beta, defaults.BlockCount), Is.EqualTo((0.1, 0.9, (int?)null)));
    }

    [Test]
    public void Block_grouping_follows_the_reference_substring_rule()
    {
        // The first i in 0 … L−1 with ".i." in the name; ".1." is not inside ".10.".
        Assert.That(ParameterLayers.BlockIndex("visual.transformer.resblocks.10.mlp.c_fc.weight", 12), Is.EqualTo(10));
        Assert.That(ParameterLayers.BlockIndex("visual.transformer.resblocks.1.ln_1.bias", 12), Is.EqualTo(1));
        Assert.That(ParameterLayers.BlockIndex("layers.3.experts.0.weight", 4), Is.EqualTo(0), "the reference takes the smallest matching i");
        Assert.That(ParameterLayers.BlockIndex("blocks.5.weight", 4), Is.Null, "beyond the block count");
        Assert.That(ParameterLayers.BlockIndex("token_embedding.weight", 12), Is.Null);
        Assert.That(ParameterLayers.BlockIndex("blocks.0", 4), Is.Null, "needs a dot after the index");

        Assert.That(ParameterLayers.InferBlockCount(["embed.weight", "blocks.0.w", "blocks.11.w", "head.3"]), Is.EqualTo(12));
        Assert.That(ParameterLayers.InferBlockCount(["a.weight", "b.bias"]), Is.EqualTo(0));

        // ".n." as text: "01" is not ".1.", and a block number is looked up, not counted up to.
        Assert.That(ParameterLayers.BlockIndex("blocks.01.w", 4), Is.Null);
        Assert.That(ParameterLayers.InferBlockCount(["blocks.01.w", "blocks.0.w"]), Is.EqualTo(1));
        Assert.That(ParameterLayers.BlockIndex("blocks.2000000000.w", int.MaxValue), Is.EqualTo(2_000_000_000));
        Assert.That(ParameterLayers.BlockIndex("..3..1.", 4), Is.EqualTo(1), "every interior component, as a substring search finds them");
        var ex = Assert.Throws<ArgumentException>(() => ParameterLayers.InferBlockCount(["blocks.2147483647.w"]));
        Assert.That(ex!.Message, Does.Contain("'blocks.2147483647.w' numbers a block 2147483647"));
        Assert.That(ParameterLayers.ModulePrefix("blocks.2.weight"), Is.EqualTo("blocks.2"));
        Assert.That(ParameterLayers.ModulePrefix("scale"), Is.EqualTo("scale"));
    }

    [Test]
    public void A_custom_block_rule_and_count_are_used()
    {
        var names = new[] { "enc.a", "enc.b", "dec.a", "other" };
        var o = new LinesOptions
        {
            Alpha = 0,
            Beta = 1,
            BlockCount = 2,
            BlockOf = n => n.StartsWith("enc", StringComparison.Ordinal) ? 0 : n.StartsWith("dec", StringComparison.Ordinal) ? 1 : null,
        };
        Assert.That(Lines.Factors(names, o), Is.EquivalentTo(new Dictionary<string, double> { ["enc.a"] = 0, ["enc.b"] = 0, ["dec.a"] = 1, ["other"] = 0 }));
        Assert.Throws<ArgumentException>(() => Lines.Factors(names, o with { BlockOf = _ => 2 }));
    }

    [Test]
    public void Fewer_than_two_blocks_is_an_error()
    {
        var inferred = Assert.Throws<ArgumentException>(() => Lines.Factors(["a.weight", "b.weight"]));
        Assert.That(inferred!.Message, Does.Contain("the names imply 0"));
        // A custom block rule alone cannot help: the count is still inferred from the names.
        var custom = Assert.Throws<ArgumentException>(() => Lines.Factors(["a.weight", "b.weight"], new LinesOptions { BlockOf = n => n[0] == 'a' ? 0 : 1 }));
        Assert.That(custom!.Message, Does.Contain("with a custom BlockOf, set BlockCount too"));
        Assert.That(Lines.Factors(["a.weight", "b.weight"], new LinesOptions { BlockOf = n => n[0] == 'a' ? 0 : 1, BlockCount = 2, Alpha = 0.5, Beta = 0.5 }),
            Is.EqualTo(new Dictionary<string, double> { ["a.weight"] = 0.5, ["b.weight"] = 1.0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new LinesOptions { BlockCount = 1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new LinesOptions { Alpha = double.NaN });
    }

    [Test]
    public void Multi_task_alpha_is_the_l1_ratio_over_the_task_count()
    {
        using var baseModel = Model(1);
        using var e1 = Model(2, 0.1);
        using var e2 = Model(3, 0.1);
        using var tau1 = TaskVector.FromDeltas(e1.Clone());
        using var tau2 = TaskVector.FromDeltas(e2.Clone());
        // Task arithmetic's merged vector is the plain sum: α = 1/T.
        using var sum = TaskVector.Combine([tau1, tau2]);
        Assert.That(Lines.MultiTaskAlpha([tau1, tau2], sum), Is.EqualTo(0.5).Within(1e-6), "the sum is formed in float32");

        // Any other merged vector: ‖Σ τ‖₁ / (T·‖τ_MTL‖₁).
        using var half = sum.Scale(0.25);
        Assert.That(Lines.MultiTaskAlpha([tau1, tau2], half), Is.EqualTo(2.0).Within(1e-6));
        var o = Lines.MultiTask([tau1, tau2], half, beta: 0.7);
        Assert.That((o.Alpha, o.Beta), Is.EqualTo((Lines.MultiTaskAlpha([tau1, tau2], half), 0.7)));

        // Mismatches are named (they reached libtorch as a native error, or a KeyNotFoundException).
        using var narrow = TaskVector.FromDeltas(new StateDict(e1.Names.Select(n => KeyValuePair.Create(n, zeros(1)))));
        Assert.That(() => Lines.MultiTaskAlpha([tau1, narrow], sum), Throws.TypeOf<MergeException>().With.Message.Contain("task vector 1 has shape [1]"));
        Assert.That(() => Lines.MultiTaskAlpha([tau1, tau2], narrow), Throws.TypeOf<MergeException>().With.Message.Contain("the merged task vector has shape [1]"));
        Assert.That(() => Lines.MultiTaskAlpha([tau1, null!], sum), Throws.ArgumentException.With.Message.Contain("Task vector 1 is null"));
    }

    [Test]
    public void Integer_buffers_are_copied_and_mismatches_rejected()
    {
        using var baseModel = new StateDict { { "blocks.0.w", ones(2) }, { "blocks.1.w", ones(2) }, { "steps", tensor(new long[] { 3 }) } };
        using var ft = new StateDict { { "blocks.0.w", full(2, 3f) }, { "blocks.1.w", full(2, 3f) }, { "steps", tensor(new long[] { 9 }) } };
        using var edited = Lines.Edit(baseModel, ft, new LinesOptions { Alpha = 0.5, Beta = 0.5 });
        T.Near(edited["blocks.0.w"], [2, 2]);
        T.Near(edited["blocks.1.w"], [3, 3]);
        Assert.That(edited["steps"].item<long>(), Is.EqualTo(9));

        using var wrong = new StateDict { { "blocks.0.w", ones(3) }, { "blocks.1.w", ones(2) }, { "steps", tensor(new long[] { 3 }) } };
        Assert.That(() => Lines.Edit(baseModel, wrong), Throws.TypeOf<MergeException>()
            .With.Message.Contain("the fine-tuned model has shape [3] but the base model has [2]"));
    }
}
