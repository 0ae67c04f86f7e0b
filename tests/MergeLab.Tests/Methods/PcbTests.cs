using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class PcbTests
{
    /// <summary>
    /// PCB_merge written out as the authors' pcb-merging.py does it: sort-based clamp, min/max taken from
    /// the data, no shortcuts. An independent check of the library's known-bounds formulation.
    /// </summary>
    private static Tensor Reference(Tensor x, double ratio, double clampLow, double clampHigh)
    {
        using var scope = NewDisposeScope();
        long n = x.shape[0], d = x.shape[1];
        Tensor Clamp(Tensor v, double minRatio, double maxRatio)
        {
            var sorted = v.sort(1).Values;
            var lo = sorted[.., (long)(d * minRatio)].unsqueeze(1);
            var hi = sorted[.., (long)(d * (1 - maxRatio) - 1)].unsqueeze(1);
            return v.clamp(lo, hi);
        }

        Tensor Normalize(Tensor v) =>
            (v - v.amin([1], keepdim: true)) / (v.amax([1], keepdim: true) - v.amin([1], keepdim: true));

        var absClamped = Clamp(x.abs(), clampLow, clampHigh);
        var clamped = x.sign() * absClamped;
        var intra = (Normalize(absClamped).pow(2) * n).exp();
        var inter = (x * x.sum(dim: 0)).tanh();
        var scale = Normalize(Clamp(intra * inter, 1 - ratio, 0));
        var merged = (clamped * scale).sum(dim: 0) / scale.sum(dim: 0).clamp_min(1e-12);
        return merged.MoveToOuterDisposeScope();
    }

    /// <summary>At width 205 every rank the formula takes (d·ratio, d·(1 − ratio), …) is fractional, so
    /// its truncation counts.</summary>
    [TestCase(.1, 1e-4, 1e-4, 200)]
    [TestCase(.3, .1, .05, 200)]
    [TestCase(1.0, 0, 0, 200)]
    [TestCase(.1, 1e-4, 1e-4, 205)]
    [TestCase(.3, .1, .05, 205)]
    public void Per_tensor_scope_matches_the_reference_formula(double ratio, double low, double high, int width)
    {
        using var g = new Generator(11);
        using var x = randn([3, width], generator: g);
        using var expected = Reference(x, ratio, low, high);
        var pcb = new PcbMerge(new PcbOptions { Ratio = ratio, ClampLow = low, ClampHigh = high, Scope = SelectionScope.PerTensor });
        using var merged = T.MergeDeltas(pcb, T.Values(x[0]), T.Values(x[1]), T.Values(x[2]));
        T.Near(merged, expected, 1e-5);
        if (ratio < 1)
        {
            Assert.That(merged.eq(0).sum().item<long>(), Is.GreaterThan(0), "low scores must be dropped");
        }
    }

    [Test]
    public void Whole_model_scope_equals_one_tensor_holding_the_whole_model()
    {
        using var baseModel = T.RandomModel(40);
        var experts = new[] { T.Expert(baseModel, 41), T.Expert(baseModel, 42), T.Expert(baseModel, 43) };
        using var owned = T.DisposingAll(experts);
        var options = new PcbOptions { Ratio = .2, ClampLow = .01, ClampHigh = .01 };
        using var merged = new PcbMerge(options).Merge(baseModel, experts);

        // The same model flattened into one tensor, merged per tensor.
        using var scope = NewDisposeScope();
        var flatBase = cat(baseModel.Select(kv => kv.Value.flatten()).ToArray());
        var flatExperts = experts.Select(e => cat(e.Select(kv => kv.Value.flatten()).ToArray())).ToArray();
        var perTensor = new PcbMerge(options with { Scope = SelectionScope.PerTensor });
        var flatMerged = perTensor.MergeTensor(new TensorGroup("all", flatBase, flatExperts));
        var actual = cat(merged.Select(kv => kv.Value.flatten()).ToArray());
        T.Near(actual, flatMerged, 1e-6);
    }

    [Test]
    public void Constant_and_zero_rows_give_numbers_not_nan()
    {
        var pcb = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        using var constant = T.MergeDeltas(pcb, [2, 2, 2, 2], [0, 0, 0, 0]);
        Assert.That(constant.isnan().any().item<bool>(), Is.False);
        using var zero = T.MergeDeltas(pcb, [0, 0, 0], [0, 0, 0]);
        T.Near(zero, [0, 0, 0]);
    }

    [Test]
    public void Lambda_scales_the_merged_vector()
    {
        using var g = new Generator(12);
        using var x = randn([2, 50], generator: g);
        var one = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        var half = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor, Lambda = .5 });
        using var a = T.MergeDeltas(one, T.Values(x[0]), T.Values(x[1]));
        using var b = T.MergeDeltas(half, T.Values(x[0]), T.Values(x[1]));
        T.Near(b, a * .5, 1e-6);
    }
}
