using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
using MergeLab.Tensors;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tests.Methods;

/// <summary>
/// PCB's candidate passes (AVX-512): exact scores only where a cheap bound reaches the cutoff (always
/// positive). The bound must never fall below a positive computed score (else an entry would be dropped
/// that the full pass keeps) and be at most 0 where the score is, must be tight enough to skip most
/// entries, and the merges must keep the full passes' bits.
/// </summary>
public class PcbCandidateTests
{
    /// <summary>Skips a merge test where the candidate passes cannot run. (Called from each test: NUnit 4.4 ran the
    /// tests of this class after a failed assumption in a <c>[SetUp]</c>, and on a CPU without AVX-512 they failed.)</summary>
    private static void RequireAvx512() =>
        Assume.That(Avx512F.IsSupported && Vector512.IsHardwareAccelerated, "the candidate passes need AVX-512");

    /// <summary>Random τ and Σ τ over many scales (tiny products, products around tanh's series limit 0.3
    /// and past 1, negative ones), clamp bounds of several widths, 1 to 64 experts, and the special values.
    /// Each entry with a positive score must be a candidate at a cutoff equal to its own score (the hardest
    /// cutoff it must pass), and no entry with a product ≤ 0 at any cutoff the bound serves.</summary>
    [TestCase(1, 0f, 0.02f, 1e-2f)]
    [TestCase(4, 1e-4f, 0.01f, 1e-2f)]
    [TestCase(8, 0.001f, 3f, 1f)]
    [TestCase(64, 0f, 1f, 0.5f)]
    [TestCase(3, 0.5f, 0.5f, 0.3f)] // constant clamp range: minmax is 0
    [TestCase(64, 0.5f, 0.502f, 0.502f)] // low 250 times the range: minmax's rounding must stay relative
    public void The_score_bound_keeps_every_entry_whose_score_reaches_the_cutoff(int experts, float low, float high, float scale)
    {
        var random = new Random(experts);
        var terms = new PcbKernel.ScoreTerms<Vector512Lanes, Vector512<float>>(low, high, experts);
        var bound = new PcbKernel.ScoreBound(terms);
        float lowest = PcbKernel.ScoreBound.Level(PcbKernel.ScoreBound.MinCutoff);
        int checkedLanes = 0, tight = 0, smallPositive = 0;
        var t = new float[16];
        var sum = new float[16];
        for (int v = 0; v < 20_000; v++)
        {
            for (int i = 0; i < 16; i++)
            {
                double magnitude = scale * Math.Pow(10, -4 * random.NextDouble());
                t[i] = (float)((random.NextDouble() - 0.5) * 2 * magnitude);
                sum[i] = (float)(t[i] + ((random.NextDouble() - 0.4) * 4 * magnitude));
            }

            if (v == 0)
            {
                (t[0], t[1], t[2], t[3], t[4], sum[5], t[6], sum[6]) = (float.NaN, float.PositiveInfinity, -0f, 0f, 1e30f, float.NaN, 2f, 1f);
            }

            var tv = Vector512.Create(t);
            var product = tv * Vector512.Create(sum);
            var score = PcbKernel.ScoreTerms<Vector512Lanes, Vector512<float>>.Score(terms.IntraArgument(tv), product);
            var of = bound.Of(tv, product);
            for (int i = 0; i < 16; i++)
            {
                if (float.IsNaN(score[i]))
                {
                    Assert.That(float.IsNaN(of[i]) || of[i] == float.PositiveInfinity, Is.True, $"NaN score at t={t[i]}, Σ={sum[i]} needs a NaN bound");
                    continue;
                }

                checkedLanes++;
                if (!(product[i] > 0))
                {
                    // Below every cutoff the bound serves, as the score is.
                    Assert.That(score[i], Is.LessThanOrEqualTo(0f), $"t={t[i]:R}, Σ={sum[i]:R}");
                    Assert.That(of[i], Is.LessThan(lowest), $"t={t[i]:R}, Σ={sum[i]:R}");
                    continue;
                }

                Assert.That(score[i], Is.GreaterThanOrEqualTo(PcbKernel.ScoreBound.MinCutoff), "the cases keep scores in the served range");
                // A candidate unless proved below (NaN, as for an infinite product, is never proved below).
                Assert.That(of[i] < PcbKernel.ScoreBound.Level(score[i]), Is.False, $"t={t[i]:R}, Σ={sum[i]:R}");
                if (product[i] < 0.01f)
                {
                    smallPositive++;
                    tight += of[i] < PcbKernel.ScoreBound.Level(score[i] * 1.07f) ? 1 : 0;
                }
            }
        }

        Assert.That(checkedLanes, Is.GreaterThan(300_000));
        Assert.That(smallPositive, Is.GreaterThan(50_000));
        Assert.That(tight, Is.EqualTo(smallPositive), "for small positive products the bound skips every entry scoring below 93% of the cutoff");
    }

    /// <summary>Products down to the smallest subnormals, times the largest exponential factors, so that
    /// scores from the smallest cutoff the bound serves (2^-100) up come from subnormal products: each must
    /// still be a candidate at a cutoff equal to its score.</summary>
    [TestCase(40, 0f, 0.02f)]
    [TestCase(64, 0.001f, 0.01f)]
    [TestCase(64, 0f, 1f)]
    public void The_score_bound_holds_for_subnormal_products(int experts, float low, float high)
    {
        var random = new Random(experts + 100);
        var terms = new PcbKernel.ScoreTerms<Vector512Lanes, Vector512<float>>(low, high, experts);
        var bound = new PcbKernel.ScoreBound(terms);
        var t = new float[16];
        var ulps = new float[16];
        long missed = 0, served = 0;
        for (int v = 0; v < 4000; v++)
        {
            for (int i = 0; i < 16; i++)
            {
                t[i] = (float)(low + ((high - low) * random.NextDouble()));
            }

            var tv = Vector512.Create(t);
            var argument = terms.IntraArgument(tv);
            for (int j = 1; j <= 1024; j += 16)
            {
                for (int i = 0; i < 16; i++)
                {
                    ulps[i] = BitConverter.Int32BitsToSingle(j + i); // (j + i)·2^-149
                }

                var product = Vector512.Create(ulps);
                var score = PcbKernel.ScoreTerms<Vector512Lanes, Vector512<float>>.Score(argument, product);
                var of = bound.Of(tv, product);
                for (int i = 0; i < 16; i++)
                {
                    if (score[i] >= PcbKernel.ScoreBound.MinCutoff)
                    {
                        served++;
                        missed += of[i] < PcbKernel.ScoreBound.Level(score[i]) ? 1 : 0;
                    }
                }
            }
        }

        Assert.That(served, Is.GreaterThan(300_000));
        Assert.That(missed, Is.Zero, "lanes that would be skipped at a cutoff equal to their score");
    }

    /// <summary><paramref name="count"/> experts b + 0.01·N(0, 1), each step drawn from <paramref name="g"/> in
    /// turn; expert <paramref name="unchanged"/> (if any) is b itself, its step drawn all the same.</summary>
    private static Tensor[] Experts(Generator g, Tensor b, int count, int unchanged = -1)
    {
        using var scale = 0.01.ToScalar();
        return Enumerable.Range(0, count).Select(k =>
        {
            using var step = randn(b.shape, generator: g);
            return k == unchanged ? b.clone() : b + step.mul_(scale);
        }).ToArray();
    }

    /// <summary>With the default ratio 0.1, the merge and the selection score about a tenth of the entries
    /// exactly, not all of them; with the selection's candidates kept, the merge scores none.</summary>
    [TestCase(false)]
    [TestCase(true)]
    public void The_candidate_passes_score_few_entries_exactly(bool keep)
    {
        RequireAvx512();
        using var g = new Generator(96);
        using var b = randn([300, 700], generator: g);
        var list = Experts(g, b, 3);
        using var owned = T.DisposingAll(list);
        using var keeping = KeepCandidates(keep);
        using var counting = Counting();
        var pcb = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        using var merged = pcb.MergeTensor(new TensorGroup("w", b, list));
        TestContext.Out.WriteLine($"scored {PcbKernel.Scored} of {PcbKernel.Offered}");
        Assert.That(PcbKernel.Offered, Is.EqualTo((keep ? 1L : 2L) * 3 * 300 * 700),
            keep ? "only the selection looks at every entry of every task" : "the selection and the merge both look at every entry of every task");
        Assert.That(PcbKernel.Scored, Is.LessThan(PcbKernel.Offered / 5));
        Assert.That(PcbKernel.Scored, Is.GreaterThan(PcbKernel.Offered / 20));
    }

    /// <summary>A store too small for every chunk keeps some (the merge takes those from it) and scores
    /// the others again; a task that changes nothing (score range 0, its selection not packed) is left out
    /// of the kept merge as of the full one. Both with the full passes' bits, whether the store writes its
    /// candidates with plain or non-temporal stores.</summary>
    [TestCase(false)]
    [TestCase(true)]
    public void A_store_that_keeps_only_some_chunks_and_an_unchanged_task_keep_the_full_passes_bits(bool streaming)
    {
        RequireAvx512();
        using var stores = T.Setting(() => PcbKernel.StreamingArenaBytes, v => PcbKernel.StreamingArenaBytes = v, streaming ? 0 : long.MaxValue);
        using var g = new Generator(97);
        using var b = randn([512, 1024], generator: g);
        var list = Experts(g, b, 3, unchanged: 1);
        long defaultArena = PcbKernel.MaxKeptArenaBytes;
        using var owned = T.DisposingAll(list);
        var pcb = new PcbMerge(new PcbOptions { Scope = SelectionScope.PerTensor });
        long d = 512 * 1024;
        foreach (long arena in new[] { defaultArena, 300L << 10 })
        {
            using var arenaSize = T.Setting(() => PcbKernel.MaxKeptArenaBytes, v => PcbKernel.MaxKeptArenaBytes = v, arena);
            using (Counting())
            {
                AssertSameBits(() => pcb.MergeTensor(new TensorGroup("w", b, list)));
            }

            // Offered counts, in each of AssertSameBits' two candidate runs, the selection of the two
            // changed tasks (d each: the unchanged task's cutoff is not positive, so its selection computes
            // every key without packing); in the run without keeping, the merge's three tasks (3d); in the
            // kept run, three tasks for each entry of a chunk scored again (the full passes pack nothing).
            TestContext.Out.WriteLine($"arena {arena}: offered {PcbKernel.Offered}");
            long scoredAgain = PcbKernel.Offered - (2 * d) - (2 * d) - (3 * d);
            if (arena == defaultArena)
            {
                Assert.That(scoredAgain, Is.Zero, "every chunk kept");
            }
            else
            {
                Assert.That(scoredAgain, Is.GreaterThan(0).And.LessThan(3 * d), "some chunks kept, others scored again");
                Assert.That(scoredAgain % (3 * 1024), Is.Zero, "whole chunks of 1,024 entries");
            }
        }
    }

    private static IEnumerable<TestCaseData> Cases()
    {
        // dtype, experts, rows, cols, scale of the task vectors, ratio: the bracket pass (> 2^17 entries),
        // chunks that end in a partial vector, pair of vectors or chunk, large products (tanh's float64 path
        // and saturation), many experts, and the small-input selection.
        // The last two write bfloat16 (a store of its own in the candidate merge), on a length that is not
        // a whole number of vector pairs.
        yield return new TestCaseData(ScalarType.Float32, 3, 301, 699, 0.01, 0.1, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.BFloat16, 5, 300, 640, 0.01, 0.2, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.Float32, 2, 257, 1031, 1.0, 0.1, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.BFloat16, 9, 131, 1009, 0.05, 0.3, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.Float32, 4, 33, 101, 0.01, 0.1, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.Float32, 3, 400, 400, 0.01, 1.0, ScalarType.Float32);
        yield return new TestCaseData(ScalarType.BFloat16, 5, 300, 641, 0.01, 0.1, ScalarType.BFloat16);
        yield return new TestCaseData(ScalarType.Float32, 3, 301, 699, 0.01, 0.1, ScalarType.BFloat16);
    }

    [TestCaseSource(nameof(Cases))]
    public void Per_tensor_merges_keep_the_full_score_passes_bits(ScalarType dtype, int experts, int rows, int cols, double scale, double ratio, ScalarType output)
    {
        using var g = new Generator(94);
        using var b = T.Drawn(g, [rows, cols], dtype);
        var list = Enumerable.Range(0, experts).Select(k =>
        {
            using var scope = NewDisposeScope();
            var step = randn([rows, cols], generator: g).mul_(scale);
            if (k == 0)
            {
                step.neg_().mul_(0.25); // pulls against the sum: mostly negative scores
            }

            return (b.to(ScalarType.Float32) + step).to(dtype).MoveToOuterDisposeScope();
        }).ToArray();
        using var owned = T.DisposingAll(list);
        var pcb = new PcbMerge(new PcbOptions { Ratio = ratio, ClampLow = 0.01, ClampHigh = 0.01, Lambda = .8, Scope = SelectionScope.PerTensor });
        AssertSameBits(() => pcb.MergeTensor(new TensorGroup("w", b, list), outputType: output));
    }

    /// <summary>A task whose scores are all negative (its threshold is not positive: every entry is a
    /// candidate), and non-finite entries (NaN scores are always candidates).</summary>
    [Test]
    public void Negative_thresholds_and_non_finite_entries_keep_the_full_passes_bits()
    {
        using var g = new Generator(95);
        using var b = randn([200, 700], generator: g);
        using var pull = rand([200, 700], generator: g).add_(0.5);
        using var push = rand([200, 700], generator: g).add_(0.5);
        using var e0 = b - (pull * 0.01);
        using var e1 = b + (push * 0.1);
        using var step = randn([200, 700], generator: g);
        using var e2 = b + step.mul_(0.01);
        using var nan = tensor(float.NaN);
        using var infinity = tensor(float.PositiveInfinity);
        e2[3, 5] = nan;
        e2[7, 9] = infinity;
        var pcb = new PcbMerge(new PcbOptions { Ratio = 0.5, Scope = SelectionScope.PerTensor });
        AssertSameBits(() => pcb.MergeTensor(new TensorGroup("w", b, [e0, e1, e2]), outputType: ScalarType.Float32));
    }

    /// <summary>With the whole model's thresholds (the default scope), the merge pass takes them as its cutoffs.</summary>
    [Test]
    public void Whole_model_merges_keep_the_full_passes_bits()
    {
        RequireAvx512();
        using var baseModel = T.RandomModel(44);
        var experts = new[] { T.Expert(baseModel, 45), T.Expert(baseModel, 46), T.Expert(baseModel, 47) };
        using var owned = T.DisposingAll(experts);
        var pcb = new PcbMerge(new PcbOptions { Ratio = .2, ClampLow = .01, ClampHigh = .01 });
        using var candidates = pcb.Merge(baseModel, experts);
        using var fullPasses = ScoreCandidatesOnly(false);
        using var full = pcb.Merge(baseModel, experts);
        foreach (var (name, tensor) in full)
        {
            T.BitEqual(candidates[name], tensor, name);
        }
    }

    /// <summary>The candidate passes with the selection's candidates kept for the merge, then scored again
    /// by the merge, against the full passes.</summary>
    private static void AssertSameBits(Func<Tensor> merge)
    {
        RequireAvx512();
        using var onlyCandidates = ScoreCandidatesOnly(true);
        using var keeping = KeepCandidates(true);
        using var kept = merge();
        PcbKernel.KeepCandidates = false;
        using var candidates = merge();
        PcbKernel.ScoreCandidatesOnly = false;
        using var full = merge();
        T.BitEqual(candidates, full, "scored again");
        T.BitEqual(kept, full, "kept");
    }

    /// <summary>Keeps the selection's candidates for the merge (<paramref name="on"/>) until disposed.</summary>
    private static IDisposable KeepCandidates(bool on) => T.Setting(() => PcbKernel.KeepCandidates, v => PcbKernel.KeepCandidates = v, on);

    /// <summary>Scores only the candidates (<paramref name="on"/>), not every entry, until disposed.</summary>
    private static IDisposable ScoreCandidatesOnly(bool on) =>
        T.Setting(() => PcbKernel.ScoreCandidatesOnly, v => PcbKernel.ScoreCandidatesOnly = v, on);

    /// <summary>Counts the candidate passes' entries (from 0) until disposed.</summary>
    private static IDisposable Counting()
    {
        PcbKernel.Scored = PcbKernel.Offered = 0;
        return T.Setting(() => PcbKernel.CountCandidates, v => PcbKernel.CountCandidates = v, true);
    }
}
