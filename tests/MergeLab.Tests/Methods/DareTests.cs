using MergeLab.Methods;
using MergeLab.Stages;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

public class DareTests
{
    [Test]
    public void Drop_rate_zero_equals_task_arithmetic()
    {
        using var baseModel = T.RandomModel(10);
        using var e1 = T.Expert(baseModel, 11);
        using var e2 = T.Expert(baseModel, 12);
        var weights = new[] { .7, 1.3 };
        using var dare = new DareMerge(new DareOptions { DropRate = 0, Weights = weights, Lambda = .8 }).Merge(baseModel, [e1, e2]);
        using var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Weights = weights, Lambda = .8 }).Merge(baseModel, [e1, e2]);
        foreach (var name in ta.Names)
        {
            T.BitEqual(dare[name], ta[name]);
        }
    }

    [Test]
    public void Same_seed_gives_identical_output_on_one_and_two_threads()
    {
        using var baseModel = T.RandomModel(20);
        using var e1 = T.Expert(baseModel, 21);
        using var e2 = T.Expert(baseModel, 22);
        var method = new DareMerge(new DareOptions { DropRate = .7, Seed = 42, Combination = Combination.Ties });
        int threads = torch.get_num_threads();
        try
        {
            torch.set_num_threads(1);
            using var one = method.Merge(baseModel, [e1, e2]);
            torch.set_num_threads(2);
            using var two = method.Merge(baseModel, [e1, e2]);
            foreach (var name in one.Names)
            {
                T.BitEqual(two[name], one[name]);
            }
        }
        finally
        {
            torch.set_num_threads(threads);
        }
    }

    [Test]
    public void Different_seeds_give_different_masks()
    {
        using var tau = ones(10_000);
        using var a = new RandomDrop(.5, seed: 1).Apply(tau, new SparsifyContext("w", 0));
        using var b = new RandomDrop(.5, seed: 2).Apply(tau, new SparsifyContext("w", 0));
        using var c = new RandomDrop(.5, seed: 1).Apply(tau, new SparsifyContext("w", 0));
        Assert.That(T.Same(a, b), Is.False);
        Assert.That(T.Same(a, c), Is.True);
    }

    [Test]
    public void Masks_differ_between_tensors_and_experts_of_one_seed()
    {
        using var tau = ones(10_000);
        var drop = new RandomDrop(.5, seed: 1);
        using var a = drop.Apply(tau, new SparsifyContext("w", 0));
        using var otherExpert = drop.Apply(tau, new SparsifyContext("w", 1));
        using var otherTensor = drop.Apply(tau, new SparsifyContext("v", 0));
        Assert.That(T.Same(a, otherExpert), Is.False);
        Assert.That(T.Same(a, otherTensor), Is.False);
    }

    [Test]
    public void Rescaled_deltas_keep_their_mean_and_drop_the_stated_fraction()
    {
        // Each survivor is τ/(1−p): E = τ. With p = .9, one entry has standard deviation 3τ; over 10^6
        // entries the mean's is .003, so 0.02 is a six-sigma bound. The dropped fraction's sd is .0003.
        const int n = 1_000_000;
        using var tau = full(n, 0.5f);
        using var kept = new RandomDrop(.9, seed: 7).Apply(tau, new SparsifyContext("w", 0));
        Assert.That(kept.mean().item<float>(), Is.EqualTo(.5).Within(.02));
        double dropped = kept.eq(0).to(ScalarType.Float64).mean().item<double>();
        Assert.That(dropped, Is.EqualTo(.9).Within(.002));
        Assert.That(kept.max().item<float>(), Is.EqualTo(5f).Within(1e-5)); // .5 / (1 − .9)
    }

    [Test]
    public void L1_rescale_preserves_the_l1_norm()
    {
        using var g = new Generator(3);
        using var tau = randn(50_000, generator: g);
        using var kept = new RandomDrop(.8, RescaleNorm.L1, seed: 9).Apply(tau, new SparsifyContext("w", 0));
        Assert.That(kept.abs().sum().item<float>(), Is.EqualTo(tau.abs().sum().item<float>()).Within(1e-3).Percent);
        Assert.That(kept.eq(0).sum().item<long>(), Is.GreaterThan(35_000));
    }

    [Test]
    public void Names_follow_the_combination()
    {
        Assert.That(new DareMerge().Name, Is.EqualTo("dare_linear"));
        Assert.That(new DareMerge(new DareOptions { Combination = Combination.Ties }).Name, Is.EqualTo("dare_ties"));
    }
}
