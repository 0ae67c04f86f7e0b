using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
using MergeLab.Tensors;
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
    public void Same_seed_gives_identical_output_on_one_two_and_three_threads()
    {
        // Tensors of 330,000 and 77,777 entries: eleven and three of the kernels' 32,768-entry blocks, so
        // the blocks are split over the threads (a tiny model runs on one thread whatever the count).
        using var baseModel = T.DrawnModel(20, ("w", [300, 1100], ScalarType.BFloat16), ("v", [77_777], ScalarType.Float32));
        using var e1 = T.Expert(baseModel, 21);
        using var e2 = T.Expert(baseModel, 22);
        foreach (var method in new[]
        {
            new DareMerge(new DareOptions { DropRate = .7, Seed = 42, Combination = Combination.Ties }),
            new DareMerge(new DareOptions { DropRate = .6, Seed = 43, Rescale = RescaleNorm.L1 }),
        })
        {
            T.SameOnAnyThreadCount(() => method.Merge(baseModel, [e1, e2]), method.Name);
        }
    }

    /// <summary>
    /// A seed's masks are part of the results users reproduce, so the first bits of two streams are pinned
    /// to values computed outside MergeLab, by a script of the documented generator (the stream seed from
    /// FNV-1a of the name and SplitMix64; word c = mix(s + (c + 1)·γ), low half to entry 2c, high half to
    /// 2c + 1; kept when bits ≫ 8 ≥ ⌈p·2²⁴⌉). Both the CPU kernel and the libtorch path (other devices).
    /// </summary>
    [TestCase(true)]
    [TestCase(false)]
    public void Keep_masks_are_pinned_to_the_documented_generator(bool cpuKernels)
    {
        using var kernels = T.CpuKernels(cpuKernels);
        using var tau = ones(64);
        using var a = new RandomDrop(.5, RescaleNorm.None, seed: 42).Apply(tau, new SparsifyContext("w", 0));
        AssertKeepBits(a, 0x0413_52bd_bfa7_e556UL);

        // Entries 1000–1063 of a longer stream: the counter is the entry's index in the tensor.
        using var longer = ones(1064);
        using var b = new RandomDrop(.9, RescaleNorm.None, seed: 7).Apply(longer, new SparsifyContext("model.layers.0.mlp.up_proj.weight", 3));
        using var tail = b.narrow(0, 1000, 64);
        AssertKeepBits(tail, 0x0408_2000_2000_0090UL);
    }

    private static void AssertKeepBits(Tensor mask, ulong expected)
    {
        var values = T.Values(mask);
        Assert.That(values, Has.Length.EqualTo(64));
        ulong bits = 0;
        for (int i = 0; i < 64; i++)
        {
            Assert.That(values[i], Is.EqualTo(0f).Or.EqualTo(1f), $"entry {i}");
            bits |= values[i] == 1f ? 1UL << i : 0;
        }

        Assert.That(bits.ToString("x16", System.Globalization.CultureInfo.InvariantCulture), Is.EqualTo(expected.ToString("x16", System.Globalization.CultureInfo.InvariantCulture)));
    }

    /// <summary>
    /// The standalone sparsifier's CPU kernel (what <see cref="RandomDrop.Apply"/> runs on CPU tensors, and
    /// merges of more experts than the fused kernel takes) gives the libtorch path's bits for every
    /// rescale rule, on 1, 2 and 3 threads, over three whole 16,384-entry blocks and an odd tail.
    /// </summary>
    [TestCase(RescaleNorm.None)]
    [TestCase(RescaleNorm.InverseKeepProbability)]
    [TestCase(RescaleNorm.L1)]
    public void Cpu_kernel_gives_the_libtorch_paths_bits_on_any_thread_count(RescaleNorm rescale)
    {
        const int n = (3 * 16384) + 5;
        using var g = new Generator(3);
        using var tau = randn([n], generator: g);
        var drop = new RandomDrop(.7, rescale, seed: 3);
        var context = new SparsifyContext("w", 1);
        using var reference = T.Libtorch(() => drop.Apply(tau, context));
        using (T.CpuKernels(true))
        {
            foreach (int count in new[] { 1, 2, 3 })
            {
                using var threads = T.Threads(count);
                using var fast = drop.Apply(tau, context);
                T.BitEqual(fast, reference, $"{count} threads");
            }
        }

        // The mask itself, entry by entry (the scalar generator, not the vector one): zero exactly where
        // the generator drops, and τ's sign wherever it keeps.
        var values = T.Values(reference);
        var source = T.Values(tau);
        long stream = DropMask.StreamSeed(3, "w", 1);
        uint threshold = DropMask.KeepThreshold(.7);
        for (int i = 0; i < n; i++)
        {
            bool kept = DropMask.IsKept(stream, i, threshold);
            if (kept != (values[i] != 0) || (kept && Math.Sign(values[i]) != Math.Sign(source[i])))
            {
                Assert.Fail($"entry {i}: kept {kept}, τ {source[i]}, result {values[i]}");
            }
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

    /// <summary>mergekit's <c>dare_ties</c> and <c>breadcrumbs_ties</c> default to <c>normalize: false</c>:
    /// the agreeing entries are added, not averaged (the TIES presets' default would give 1 here).</summary>
    [Test]
    public void Mergekit_consensus_adds_the_agreeing_entries_by_default()
    {
        var dare = new DareMerge(new DareOptions { DropRate = 0, Combination = Combination.Ties });
        using var d = T.MergeDeltas(dare, [1, -2], [1, 3]);
        T.Near(d, [2, 3]);

        var crumbs = new BreadcrumbsMerge(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 1, Gamma = 0, Combination = Combination.Ties });
        using var c = T.MergeDeltas(crumbs, [1, -2], [1, 3]);
        T.Near(c, [2, 3]);

        // The PEFT consensus keeps its own default, the mean of the agreeing entries.
        var peft = new DareMerge(new DareOptions { DropRate = 0, Combination = Combination.Ties, ConsensusPreset = TiesPreset.Peft });
        using var p = T.MergeDeltas(peft, [1, -2], [1, 3]);
        T.Near(p, [1, 3]);
    }

    [Test]
    public void Names_follow_the_combination()
    {
        Assert.That(new DareMerge().Name, Is.EqualTo("dare_linear"));
        Assert.That(new DareMerge(new DareOptions { Combination = Combination.Ties }).Name, Is.EqualTo("dare_ties"));
    }
}
