using MergeLab.Selection;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.Selection;

public class SelectionTests
{
    [Test]
    public void Kth_smallest_matches_a_full_sort()
    {
        using var g = new Generator(80);
        using var x = randn(1001, generator: g);
        using var sorted = x.sort().Values;
        foreach (long k in new long[] { 1, 2, 500, 1000, 1001 })
        {
            Assert.That(MagnitudeThreshold.KthSmallest(x, k), Is.EqualTo(sorted[k - 1].item<float>()), $"k = {k}");
        }
    }

    [Test]
    public void Top_k_mask_takes_exactly_k_with_ties_at_the_lowest_positions()
    {
        using var m = T.Vec(1, 3, 3, 3, 0);
        using var mask = MagnitudeThreshold.TopKMask(m, 2);
        Assert.That(mask.data<bool>().ToArray(), Is.EqualTo(new[] { false, true, true, false, false }));
        using var none = MagnitudeThreshold.TopKMask(m, 0);
        Assert.That(none.any().item<bool>(), Is.False);
        using var all = MagnitudeThreshold.TopKMask(m, 5);
        Assert.That(all.all().item<bool>(), Is.True);
    }

    [Test]
    public void Top_k_mask_counts_are_exact_on_random_data()
    {
        using var g = new Generator(81);
        using var m = randint(0, 20, [300], generator: g).to(ScalarType.Float32); // many ties
        foreach (long k in new long[] { 1, 17, 150, 299 })
        {
            using var mask = MagnitudeThreshold.TopKMask(m, k);
            Assert.That(mask.sum().item<long>(), Is.EqualTo(k));
            float minKept = m.masked_select(mask).min().item<float>();
            float maxDropped = m.masked_select(mask.logical_not()).max().item<float>();
            Assert.That(minKept, Is.GreaterThanOrEqualTo(maxDropped));
        }
    }

    [Test]
    public void Rank_window_is_per_row_and_stable()
    {
        using var m = T.Mat([2, 1, 2, 0, 5, 5, 5, 5], 2, 4);
        using var mask = MagnitudeThreshold.RankWindowMask(m, 1, 3);
        // Row 0 ascending stable: 0(i3) 1(i1) 2(i0) 2(i2) → ranks 1..2 are i1, i0. Row 1: i1, i2.
        Assert.That(mask.flatten().data<bool>().ToArray(), Is.EqualTo(new[] { true, true, false, false, false, true, true, false }));
    }

    [TestCase(false)]
    [TestCase(true)]
    public void Radix_select_over_chunks_equals_kthvalue_over_their_concatenation(bool signedValues)
    {
        using var scope = NewDisposeScope(); // the chunks and every intermediate
        using var g = new Generator(82);
        var chunks = new[]
        {
            randn(5000, generator: g),
            randn(7, generator: g) * 1e-30, // subnormal-adjacent and tiny values
            zeros(100),
            -zeros(50), // negative zeros
            randint(-3, 3, [2000], generator: g).to(ScalarType.Float32), // heavy ties
        };
        T.RadixSelectMatchesKthvalue(chunks, signedValues, n => [1, 2, 100, n / 2, n - 1, n]);
    }
}
