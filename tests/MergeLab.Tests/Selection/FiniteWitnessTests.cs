using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
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

    /// <summary>A base and two experts of random values, and their group.</summary>
    private sealed class Inputs : IDisposable
    {
        public Inputs(ScalarType dtype)
        {
            (Base, E0, E1) = (Random(1, dtype), Random(2, dtype), Random(3, dtype));
            Group = new TensorGroup("w", Base, [E0, E1]);
        }

        public Tensor Base { get; }

        public Tensor E0 { get; }

        public Tensor E1 { get; }

        public TensorGroup Group { get; }

        /// <summary>The base, then the experts.</summary>
        public Tensor[] All => [Base, E0, E1];

        public void Dispose()
        {
            Base.Dispose();
            E0.Dispose();
            E1.Dispose();
        }
    }

    /// <summary>Sets entry <paramref name="at"/> (flat index) of <paramref name="t"/> to <paramref name="value"/>;
    /// returns the value it had.</summary>
    private static float Set(Tensor t, long at, float value)
    {
        using var flat = t.view(-1);
        using var entry = flat[at];
        using var widened = entry.to(ScalarType.Float32);
        float old = widened.item<float>();
        using var replacement = tensor(value);
        flat[at] = replacement;
        return old;
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

        using var width = T.WideScan(wide);
        using var witness = FiniteWitness.Begin();
        using var merged = merge();
        return inputs.Select(witness.Covers).ToArray();
    }

    [TestCaseSource(nameof(Scans))]
    public void A_top_k_selection_vouches_for_every_finite_input_it_read(ScalarType dtype, bool wide)
    {
        using var x = new Inputs(dtype);
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(x.Group), x.All), Is.All.True, "TIES: one query per expert");
        var pcb = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        Assert.That(Vouched(wide, () => pcb.MergeTensor(x.Group), x.All), Is.All.True, "PCB: two queries per expert");

        // Vouching changes nothing in the result.
        using var plain = ties.MergeTensor(x.Group);
        using (FiniteWitness.Begin())
        using (var witnessed = ties.MergeTensor(x.Group))
        {
            Assert.That(T.RawBytes(witnessed), Is.EqualTo(T.RawBytes(plain)));
        }

        Assert.That(FiniteWitness.Listening, Is.False);
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float32)]
    public void Task_arithmetic_and_averaging_vouch_for_what_every_result_was_computed_from(ScalarType dtype)
    {
        using var x = new Inputs(dtype);
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = 0.3 });
        var average = new WeightAverageMerge();
        Assert.That(Vouched(false, () => ta.MergeTensor(x.Group), x.All), Is.All.True);
        Assert.That(Vouched(false, () => average.MergeTensor(x.Group), x.All), Is.EqualTo(new[] { false, true, true }),
            "the base takes no part in an average");

        foreach (long at in new[] { 77L, (Rows * Columns) - 1 }) // in a vector, in the scalar tail
        {
            foreach (var poisoned in new[] { x.Base, x.E1 })
            {
                float kept = Set(poisoned, at, float.NaN);
                Assert.That(Vouched(false, () => ta.MergeTensor(x.Group), x.All), Is.All.False, $"task arithmetic, NaN at {at}");
                Set(poisoned, at, float.NegativeInfinity);
                bool[] expected = ReferenceEquals(poisoned, x.Base) ? [false, true, true] : [false, false, false];
                Assert.That(Vouched(false, () => average.MergeTensor(x.Group), x.All), Is.EqualTo(expected), $"average, -inf at {at}");
                Set(poisoned, at, kept);
            }
        }
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float32)]
    public void Dare_with_the_l1_rescale_vouches_through_its_norm_of_every_task_vector_entry(ScalarType dtype)
    {
        using var x = new Inputs(dtype);
        var l1 = new DareMerge(new DareOptions { DropRate = 0.9, Rescale = RescaleNorm.L1, Combination = Combination.Ties });
        var inverse = new DareMerge(new DareOptions { DropRate = 0.9 });
        Assert.That(Vouched(false, () => l1.MergeTensor(x.Group), x.All), Is.All.True);
        Assert.That(Vouched(false, () => inverse.MergeTensor(x.Group), x.All), Is.All.False, "1/(1 − p) sums no norm");

        // A NaN that the drop discards (p = 0.9: most are) still reaches the norm of τ: in the first and the
        // sixth block of the eight summed side by side, in a block summed alone, in the short last block.
        foreach (long at in new[] { 77L, (5 * DropMask.NormBlock) + 100, (8 * DropMask.NormBlock) + 3, (Rows * Columns) - 1 })
        {
            float kept = Set(x.E1, at, float.NaN);
            Assert.That(Vouched(false, () => l1.MergeTensor(x.Group), x.All), Is.EqualTo(new[] { true, true, false }), $"NaN at {at}");
            Set(x.E1, at, kept);
        }
    }

    [TestCaseSource(nameof(Scans))]
    public void A_nan_or_an_infinity_leaves_its_input_unvouched(ScalarType dtype, bool wide)
    {
        using var x = new Inputs(dtype);
        Set(x.E1, (Rows * Columns) - 1, float.NaN); // in the scan's scalar tail when the size is not a multiple of 32
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(x.Group), x.All),
            Is.EqualTo(new[] { true, true, false }), "the base is vouched for by the clean expert's differences");

        Set(x.E1, (Rows * Columns) - 1, 0.5f);
        Set(x.E1, 77, float.NegativeInfinity); // in the vector body
        Assert.That(Vouched(wide, () => ties.MergeTensor(x.Group), x.All), Is.EqualTo(new[] { true, true, false }));
    }

    [TestCaseSource(nameof(Scans))]
    public void A_non_finite_base_is_never_vouched_for(ScalarType dtype, bool wide)
    {
        using var x = new Inputs(dtype);
        Set(x.Base, 1000, float.PositiveInfinity);
        Set(x.E0, 1000, float.PositiveInfinity); // expert and base both +∞ there: ∞ − ∞ is NaN, still a non-finite key
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
        Assert.That(Vouched(wide, () => ties.MergeTensor(x.Group), x.All), Is.All.False,
            "every expert's difference is non-finite there");
    }

    [Test]
    public void A_difference_beyond_the_float32_range_is_not_vouched_for()
    {
        using var bse = Random(1, ScalarType.Float32);
        using var e0 = Random(2, ScalarType.Float32);
        Set(bse, 9, -3e38f);
        Set(e0, 9, 3e38f);
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
