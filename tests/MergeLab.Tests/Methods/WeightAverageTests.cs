using MergeLab.Methods;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class WeightAverageTests
{
    [Test]
    public void Mean_of_experts_needs_no_base()
    {
        var avg = new WeightAverageMerge();
        using var a = T.Vec(1, 2, 3);
        using var b = T.Vec(3, 6, -3);
        using var merged = avg.MergeTensor(new TensorGroup("w", null, [a, b]));
        T.Near(merged, [2, 4, 0]);
    }

    [Test]
    public void Weights_are_normalized_by_default_and_optionally_not()
    {
        using var a = T.Vec(1, 2);
        using var b = T.Vec(5, 6);
        using var norm = new WeightAverageMerge(new WeightAverageOptions { Weights = [1, 3] }).MergeTensor(new("w", null, [a, b]));
        T.Near(norm, [4, 5]);
        using var raw = new WeightAverageMerge(new WeightAverageOptions { Weights = [1, 3], Normalize = false }).MergeTensor(new("w", null, [a, b]));
        T.Near(raw, [16, 20]);
    }

    [Test]
    public void Averaging_equals_task_arithmetic_with_lambda_one_over_n()
    {
        using var baseModel = T.RandomModel(50);
        using var e1 = T.Expert(baseModel, 51);
        using var e2 = T.Expert(baseModel, 52);
        using var e3 = T.Expert(baseModel, 53);
        using var avg = new WeightAverageMerge().Merge(baseModel, [e1, e2, e3]);
        using var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = 1.0 / 3 }).Merge(baseModel, [e1, e2, e3]);
        foreach (var name in ta.Names)
        {
            T.Near(avg[name], ta[name], 1e-5);
        }
    }

    [Test]
    public void Identical_experts_average_to_that_expert()
    {
        using var expert = T.RandomModel(54);
        using var merged = new WeightAverageMerge().Merge(null, [expert, expert, expert]);
        foreach (var name in expert.Names)
        {
            T.Near(merged[name], expert[name], 1e-6);
        }
    }

    [TestCase(new[] { 1.0, -1.0 })]
    [TestCase(new[] { 0.1, 0.2, -0.3 })] // 5.6e-17 in doubles: dividing by it would scale the merge by 1.8e16
    public void Weights_summing_to_zero_are_refused(double[] weights)
    {
        var ex = Assert.Throws<ArgumentException>(() => new WeightAverageMerge(new WeightAverageOptions { Weights = weights }));
        Assert.That(ex!.Message, Does.Contain("sum to 0"));
    }

    [Test]
    public void Weights_summing_to_just_above_the_tolerance_are_accepted() =>
        Assert.DoesNotThrow(() => new WeightAverageMerge(new WeightAverageOptions { Weights = [1, -1 + 1e-7] }));
}
