using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Selection;

/// <summary>
/// The selection's scan vouches for the inputs it read in full and found finite (<see cref="FiniteWitness"/>),
/// which is what lets the checkpoint engine skip its own NaN/±∞ pass over them; it never vouches for an input
/// holding NaN or ±∞, nor for a pair whose difference overflows.
/// </summary>
public class FiniteWitnessTests
{
    // Above the in-memory selection's limit (2^17 entries); the last entry falls in a scalar tail of both the
    // selection's blocks (16384 entries, 32 at a time) and task arithmetic's (65536, 16 or 32 at a time).
    private const long Rows = 401, Columns = 401;

    private static Tensor Random(long seed, ScalarType dtype)
    {
        using var g = new Generator((ulong)seed);
        return randn([Rows, Columns], generator: g).to(dtype);
    }

    private static IEnumerable<TestCaseData> Scans()
    {
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float32 })
        {
            foreach (bool wide in new[] { true, false })
            {
                yield return new TestCaseData(dtype, wide).SetArgDisplayNames(dtype.ToString(), wide ? "512-bit scan" : "Vector<T> scan");
            }
        }
    }

    /// <summary>Runs <paramref name="merge"/> under a witness with the given scan width; returns which of
    /// <paramref name="inputs"/> it covers.</summary>
    private static bool[] Vouched(bool wide, Func<Tensor> merge, params Tensor[] inputs)
    {
        if (wide && !ExactSelector.WideScan)
        {
            Assert.Ignore("This processor has no 512-bit scan.");
        }

        bool chosen = ExactSelector.WideScan;
        ExactSelector.WideScan = wide;
        try
        {
            using var witness = FiniteWitness.Begin();
            using var merged = merge();
            return inputs.Select(witness.Covers).ToArray();
        }
        finally
        {
            ExactSelector.WideScan = chosen;
        }
    }

    [TestCaseSource(nameof(Scans))]
    public void A_top_k_selection_vouches_for_every_finite_input_it_read(ScalarType dtype, bool wide)
    {
        using var bse = Random(1, dtype);
        using var e0 = Random(2, dtype);
        using var e1 = Random(3, dtype);
        var group = new TensorGroup("w", bse, [e0, e1]);
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(group), bse, e0, e1), Is.All.True, "TIES: one query per expert");
        var pcb = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        Assert.That(Vouched(wide, () => pcb.MergeTensor(group), bse, e0, e1), Is.All.True, "PCB: two queries per expert");

        // Vouching changes nothing in the result.
        using var plain = ties.MergeTensor(group);
        using (FiniteWitness.Begin())
        using (var witnessed = ties.MergeTensor(group))
        {
            Assert.That(TensorAssert.RawBytes(witnessed), Is.EqualTo(TensorAssert.RawBytes(plain)));
        }

        Assert.That(FiniteWitness.Listening, Is.False);
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float32)]
    public void Task_arithmetic_and_averaging_vouch_for_what_every_result_was_computed_from(ScalarType dtype)
    {
        using var bse = Random(1, dtype);
        using var e0 = Random(2, dtype);
        using var e1 = Random(3, dtype);
        var group = new TensorGroup("w", bse, [e0, e1]);
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = 0.3 });
        var average = new WeightAverageMerge();
        Assert.That(Vouched(false, () => ta.MergeTensor(group), bse, e0, e1), Is.All.True);
        Assert.That(Vouched(false, () => average.MergeTensor(group), bse, e0, e1), Is.EqualTo(new[] { false, true, true }),
            "the base takes no part in an average");

        foreach (long at in new[] { 77L, (Rows * Columns) - 1 }) // in a vector, in the scalar tail
        {
            foreach (var poisoned in new[] { bse, e1 })
            {
                using var flat = poisoned.view(-1);
                using var kept = flat[at].clone();
                flat[at] = tensor(float.NaN);
                Assert.That(Vouched(false, () => ta.MergeTensor(group), bse, e0, e1), Is.All.False, $"task arithmetic, NaN at {at}");
                flat[at] = tensor(float.NegativeInfinity);
                bool[] expected = ReferenceEquals(poisoned, bse) ? [false, true, true] : [false, false, false];
                Assert.That(Vouched(false, () => average.MergeTensor(group), bse, e0, e1), Is.EqualTo(expected), $"average, -inf at {at}");
                flat[at] = kept;
            }
        }
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float32)]
    public void Dare_with_the_l1_rescale_vouches_through_its_norm_of_every_task_vector_entry(ScalarType dtype)
    {
        using var bse = Random(1, dtype);
        using var e0 = Random(2, dtype);
        using var e1 = Random(3, dtype);
        var group = new TensorGroup("w", bse, [e0, e1]);
        var l1 = new DareMerge(new DareOptions { DropRate = 0.9, Rescale = RescaleNorm.L1, Combination = Combination.Ties });
        var inverse = new DareMerge(new DareOptions { DropRate = 0.9 });
        Assert.That(Vouched(false, () => l1.MergeTensor(group), bse, e0, e1), Is.All.True);
        Assert.That(Vouched(false, () => inverse.MergeTensor(group), bse, e0, e1), Is.All.False, "1/(1 − p) sums no norm");

        // A NaN that the drop discards (p = 0.9: most are) still reaches the norm of τ: in the first and the
        // sixth block of the eight summed side by side, in a block summed alone, in the short last block.
        foreach (long at in new[] { 77L, (5 * DropMask.NormBlock) + 100, (8 * DropMask.NormBlock) + 3, (Rows * Columns) - 1 })
        {
            using var flat = e1.view(-1);
            using var kept = flat[at].clone();
            flat[at] = tensor(float.NaN);
            Assert.That(Vouched(false, () => l1.MergeTensor(group), bse, e0, e1), Is.EqualTo(new[] { true, true, false }), $"NaN at {at}");
            flat[at] = kept;
        }
    }

    [TestCaseSource(nameof(Scans))]
    public void A_nan_or_an_infinity_leaves_its_input_unvouched(ScalarType dtype, bool wide)
    {
        using var bse = Random(1, dtype);
        using var e0 = Random(2, dtype);
        using var e1 = Random(3, dtype);
        using (var flat = e1.view(-1))
        {
            flat[Rows * Columns - 1] = tensor(float.NaN); // in the scan's scalar tail when the size is not a multiple of 32
        }

        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(new TensorGroup("w", bse, [e0, e1])), bse, e0, e1),
            Is.EqualTo(new[] { true, true, false }), "the base is vouched for by the clean expert's differences");

        using (var flat = e1.view(-1))
        {
            flat[Rows * Columns - 1] = tensor(0.5f);
            flat[77] = tensor(float.NegativeInfinity); // in the vector body
        }

        Assert.That(Vouched(wide, () => ties.MergeTensor(new TensorGroup("w", bse, [e0, e1])), bse, e0, e1),
            Is.EqualTo(new[] { true, true, false }));
    }

    [TestCaseSource(nameof(Scans))]
    public void A_non_finite_base_is_never_vouched_for(ScalarType dtype, bool wide)
    {
        using var bse = Random(1, dtype);
        using var e0 = Random(2, dtype);
        using (var flat = bse.view(-1))
        {
            flat[1000] = tensor(float.PositiveInfinity);
        }

        // Expert and base both +∞ at that entry: ∞ − ∞ is NaN, still a non-finite key.
        using (var flat = e0.view(-1))
        {
            flat[1000] = tensor(float.PositiveInfinity);
        }

        using var e1 = Random(3, dtype);
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(new TensorGroup("w", bse, [e0, e1])), bse, e0, e1), Is.All.False,
            "every expert's difference is non-finite there");
    }

    [Test]
    public void A_difference_beyond_the_float32_range_is_not_vouched_for()
    {
        using var bse = Random(1, ScalarType.Float32);
        using var e0 = Random(2, ScalarType.Float32);
        using (var b = bse.view(-1))
        using (var e = e0.view(-1))
        {
            b[9] = tensor(-3e38f);
            e[9] = tensor(3e38f);
        }

        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(ExactSelector.WideScan, () => ties.MergeTensor(new TensorGroup("w", bse, [e0])), bse, e0), Is.All.False);
    }

    [Test]
    public void Slices_of_a_vouched_range_are_covered_and_other_memory_is_not()
    {
        using var bse = Random(1, ScalarType.BFloat16);
        using var e0 = Random(2, ScalarType.BFloat16);
        using var other = Random(3, ScalarType.BFloat16);
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        using var witness = FiniteWitness.Begin();
        using (ties.MergeTensor(new TensorGroup("w", bse, [e0])))
        {
        }

        using var rows = e0.narrow(0, 10, 5);
        Assert.That((witness.Covers(rows), witness.Covers(other)), Is.EqualTo((true, false)));
        using (FiniteWitness.Begin())
        {
            Assert.That(FiniteWitness.Listening, Is.True);
        }

        witness.Dispose();
        Assert.That(FiniteWitness.Listening, Is.False, "disposing the outermost witness stops the recording");

        // Closed out of order, the outer one does not listen again once the inner one closes.
        var outer = FiniteWitness.Begin();
        var inner = FiniteWitness.Begin();
        outer.Dispose();
        Assert.That(FiniteWitness.Listening, Is.True, "the inner one still listens");
        inner.Dispose();
        Assert.That(FiniteWitness.Listening, Is.False);
    }
}
