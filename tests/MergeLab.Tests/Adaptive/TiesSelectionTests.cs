using MergeLab.Adaptive;
using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Adaptive;

public class TiesSelectionTests
{
    [Test]
    public void The_selected_vectors_sum_to_the_ties_dis_sum_merge()
    {
        using var baseModel = T.RandomModel(1);
        StateDict[] experts = [T.Expert(baseModel, 2), T.Expert(baseModel, 3), T.Expert(baseModel, 4)];
        using var ownedExperts = T.DisposingAll(experts);
        var taus = experts.Select(e => TaskVector.Between(e, baseModel)).ToArray();
        using var ownedTaus = T.DisposingAll(taus);
        var selected = TiesSelection.Select(taus, density: 0.3);
        using var ownedSelected = T.DisposingAll(selected);
        using var sum = TaskVector.Combine(selected);
        using var ties = new TiesMerge(new TiesOptions { Density = 0.3, Aggregation = Aggregation.Sum }).Merge(baseModel, experts);
        using var tiesTau = TaskVector.Between(ties, baseModel);
        foreach (var name in baseModel.Names)
        {
            T.Near(sum[name], tiesTau[name], 1e-5);
        }
    }

    [Test]
    public void Each_task_keeps_its_trimmed_entries_that_agree_with_the_elected_sign()
    {
        // Density 0.5 of 4 entries over the whole model keeps ⌊4·0.5⌋ + 1 = 3 largest (the paper's
        // k-th smallest threshold, k = 4 − 2).
        using var a = TaskVector.FromDeltas(new StateDict { { "w", tensor(new float[] { 4, -3, 0.5f, 2 }) } });
        using var b = TaskVector.FromDeltas(new StateDict { { "w", tensor(new float[] { -1, -5, 3, 0.1f }) } });
        var selected = TiesSelection.Select([a, b], density: 0.5);
        using var owned = T.DisposingAll(selected);
        // a trimmed: [4, -3, 0, 2]; b trimmed: [-1, -5, 3, 0]; sums [3, -8, 3, 2] → signs [+, -, +, +].
        T.Near(selected[0]["w"], [4, -3, 0, 2]);
        T.Near(selected[1]["w"], [0, -5, 3, 0]);
    }

    [TestCase(ScalarType.Float64)]
    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float16)]
    public void The_selection_keeps_each_task_vectors_dtype_and_exact_values(ScalarType dtype)
    {
        // 4 + 2^-40 (and −5 − 2^-40) are not float32s: a float64 τ must come back with its own value, not float32's.
        using var scope = NewDisposeScope();
        double fine = dtype == ScalarType.Float64 ? Math.Pow(2, -40) : 0;
        using var a = TaskVector.FromDeltas(new StateDict { { "w", tensor(new[] { 4 + fine, -3, 0.5, 2 }).to(dtype) } });
        using var b = TaskVector.FromDeltas(new StateDict { { "w", tensor(new[] { -1, -5 - fine, 3, 0.125 }).to(dtype) } });
        var selected = TiesSelection.Select([a, b], density: 0.5);
        using var owned = T.DisposingAll(selected);
        Assert.That(selected.Select(s => s["w"].dtype), Is.All.EqualTo(dtype));
        Assert.That(selected[0]["w"].to(ScalarType.Float64).data<double>().ToArray(), Is.EqualTo(new[] { 4 + fine, -3, 0, 2 }));
        Assert.That(selected[1]["w"].to(ScalarType.Float64).data<double>().ToArray(), Is.EqualTo(new[] { 0, -5 - fine, 3, 0 }));
    }

    [Test]
    public void Mismatched_or_missing_task_vectors_are_named_as_task_vectors()
    {
        using var a = TaskVector.FromDeltas(new StateDict { { "w", zeros(4) } });
        using var b = TaskVector.FromDeltas(new StateDict { { "w", zeros(3) } });
        Assert.That(() => TiesSelection.Select([a, b]), Throws.TypeOf<MergeException>()
            .With.Message.Contain("task vector 1 has shape [3] but task vector 0 has [4]"));
        Assert.That(() => TiesSelection.Select([a, null!]), Throws.ArgumentException.With.Message.Contain("Task vector 1 is null"));
    }
}
