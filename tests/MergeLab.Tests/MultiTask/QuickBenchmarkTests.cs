using System.Diagnostics;
using System.Globalization;
using MergeLab.MultiTask;
using NUnit.Framework;

namespace MergeLab.Tests.MultiTask;

/// <summary>
/// Runs the benchmark's quick configuration on the real Fashion-MNIST (Debian's dataset-fashion-mnist,
/// which .ci/run installs) once, with fixed seeds, training into a fresh checkpoint cache, and checks the
/// table; a second run from that cache learns AdaMerging with its class-balance term.
/// The dataset being missing is a failure, not a skip, so CI cannot pass without running it.
/// </summary>
[TestFixture]
[NonParallelizable]
public class QuickBenchmarkTests
{
    private static readonly string CacheDirectory = Path.Combine(Path.GetTempPath(), $"mergelab-quick-{Guid.NewGuid():N}");
    private static BenchmarkResults? _results;
    private static BenchmarkResults? _balanced;
    private static TimeSpan _elapsed;

    [OneTimeTearDown]
    public void DeleteCache()
    {
        if (Directory.Exists(CacheDirectory))
        {
            Directory.Delete(CacheDirectory, recursive: true);
        }
    }

    /// <summary>The quick configuration again, from the checkpoints the first run saved, with
    /// AdaMerging's diversity weight at 3.</summary>
    private static BenchmarkResults Balanced
    {
        get
        {
            _ = Results;
            if (_balanced is null)
            {
                // Under a culture with decimal commas: the notes and settings must still read "0.125".
                var saved = CultureInfo.CurrentCulture;
                CultureInfo.CurrentCulture = CultureInfo.GetCultureInfo("de-DE");
                try
                {
                    _balanced = MultiTaskBenchmark.Run(BenchmarkOptions.Quick with { CacheDirectory = CacheDirectory, AdaMergingDiversityWeight = 3 },
                        log: new Progress<string>(line => TestContext.Progress.WriteLine(line)));
                }
                finally
                {
                    CultureInfo.CurrentCulture = saved;
                }
            }

            return _balanced;
        }
    }

    private static BenchmarkResults Results
    {
        get
        {
            if (_results is null)
            {
                if (!FashionMnist.IsAvailable())
                {
                    Assert.Fail($"Fashion-MNIST is not installed in '{FashionMnist.ResolveDirectory()}': run " +
                        $"'apt-get install dataset-fashion-mnist' (or set {FashionMnist.EnvironmentVariable}). The multi-task benchmark test needs it.");
                }

                var clock = Stopwatch.StartNew();
                _results = MultiTaskBenchmark.Run(BenchmarkOptions.Quick with { CacheDirectory = CacheDirectory },
                    log: new Progress<string>(line => TestContext.Progress.WriteLine(line)));
                _elapsed = clock.Elapsed;
                TestContext.Progress.WriteLine(_results.ToMarkdown());
                TestContext.Progress.WriteLine($"quick benchmark: {_elapsed.TotalSeconds:F0} s");
            }

            return _results;
        }
    }

    [Test]
    public void The_table_has_every_method_and_task_in_the_issue_s_order()
    {
        Assert.That(Results.Rows.Select(r => r.Method), Is.EqualTo(MultiTaskBenchmark.Methods));
        Assert.That(Results.ToCsv().Split('\n')[0],
            Is.EqualTo("method,plain,rotated,inverted,flipped_noisy,coarse,patch_shuffled,low_res,thresholded,average"));
        Assert.That(Results.Rows.SelectMany(r => r.Accuracies), Is.All.InRange(0.0, 100.0));
    }

    [Test]
    public void The_experts_are_the_ceiling()
    {
        var individual = Results["individual"].Average;
        Assert.That(individual, Is.GreaterThan(Results["pretrained"].Average + 5), "fine-tuning must help each task");
        foreach (var row in Results.Rows.Where(r => r.Method != "individual"))
        {
            Assert.That(row.Average, Is.LessThan(individual), row.Method);
        }
    }

    // Measured on the quick configuration (seed 0) on an AMD EPYC: pretrained 73.4, weight averaging
    // 74.8, task arithmetic 74.8, TIES 74.9, DARE-TIES 75.0, Breadcrumbs 74.6, PCB 75.1, LiNeS-TA 74.2
    // (before its β grid had 0), LiNeS-TIES 74.9; on an Intel Xeon, where libtorch's matrix kernels
    // round differently and training drifts: 73.1, 73.9, 74.5, 74.4, 74.5, 73.9, 74.6, 73.9 (β = 0;
    // 72.9 with the reference's grid, which starts at 0.1), 74.4. AdaMerging does NOT beat the floor
    // or task arithmetic here: on this small MLP the entropy minimum lies at larger coefficients than
    // the accuracy maximum, so it is checked for what it does (lower entropy, moved coefficients), not
    // for the papers' ranking.
    [TestCase("weight_averaging")]
    [TestCase("task_arithmetic")]
    [TestCase("ties")]
    [TestCase("dare_ties")]
    [TestCase("breadcrumbs")]
    [TestCase("pcb")]
    [TestCase("lines_ta")]
    [TestCase("lines_ties")]
    public void A_static_merge_beats_the_pretrained_floor(string method) =>
        Assert.That(Results[method].Average, Is.GreaterThan(Results["pretrained"].Average + 0.5));

    // The papers rank TIES and PCB above task arithmetic; here the best of them is level with it, and
    // which is ahead depends on the CPU's rounding. Best of TIES and PCB minus task arithmetic, quick
    // configuration, seed 0: +0.13 (Intel Xeon), +0.3 (AMD EPYC), and on the Xeon with libtorch's
    // kernels forced to other code paths, as other processors take: +0.36 (ATEN_CPU_CAPABILITY=avx2,
    // MKL_CBWR=COMPATIBLE), +0.04 (avx2), −0.02 (avx2, MKL_CBWR=AVX2), +0.30 (MKL_CBWR=COMPATIBLE).
    // So the test asks only that neither falls half a point behind; their exact arithmetic is tested
    // against hand-computed cases and the libtorch formulation elsewhere.
    [Test]
    public void The_ties_family_is_level_with_task_arithmetic()
    {
        var ta = Results["task_arithmetic"].Average;
        Assert.That(new[] { "ties", "pcb" }.Max(m => Results[m].Average), Is.GreaterThan(ta - 0.5));
    }

    // Measured (seed 0): layer-wise 72.8 with the paper's loss, 75.2 with the class-balance term at 3,
    // against task arithmetic's 74.8 on an AMD EPYC (the README's table of four runs); 69.9, 74.6 and
    // 74.5 on an Intel Xeon. With the term, layer-wise minus task arithmetic on the Xeon with libtorch
    // forced onto other processors' code paths (see the test above): +0.35, +0.10, +0.63, +0.59.
    // Level, then, not ahead by a margin: the test asks for no more than half a point behind.
    [Test]
    public void The_class_balance_term_brings_layer_wise_AdaMerging_level_with_task_arithmetic()
    {
        Assert.That(Results.Notes["checkpoints"], Does.StartWith("trained and saved"));
        Assert.That(Balanced.Notes["checkpoints"], Does.StartWith("reused"));
        foreach (var method in new[] { "individual", "task_arithmetic", "ties" })
        {
            Assert.That(Balanced[method].Accuracies, Is.EqualTo(Results[method].Accuracies), $"{method}: the cached checkpoints are the trained ones");
        }

        double paper = Results["adamerging_layer"].Average, balanced = Balanced["adamerging_layer"].Average;
        Assert.That(balanced, Is.GreaterThan(paper + 1), "the term lifts layer-wise AdaMerging");
        Assert.That(balanced, Is.GreaterThan(Results["task_arithmetic"].Average - 0.5), "to within half a point of task arithmetic");
        Assert.That(Balanced["adamerging_layer"].Setting, Does.EndWith("diversity weight 3"));
        Assert.That(Balanced.Notes.ContainsKey("adamerging_layer entropy"), Is.False, "the history is the loss, named so");
        var loss = Balanced.Notes["adamerging_layer loss"].Split(" → ").Select(v => double.Parse(v, CultureInfo.InvariantCulture)).ToArray();
        Assert.That(loss[1], Is.LessThan(loss[0]));
    }

    [Test]
    public void Notes_and_settings_use_the_invariant_culture_under_any_culture()
    {
        // Balanced ran under de-DE.
        Assert.That(Balanced["lines_ta"].Setting, Does.Match(@"^α = \d\.\d{3}, β = \d\.\d \(validation\)$"));
        Assert.That(Balanced.Notes["task_arithmetic validation curve (λ: average %)"], Does.Match(@"^0\.1: \d+\.\d, 0\.2: \d+\.\d, "));
        Assert.That(Balanced.Notes["adamerging_layer loss"], Does.Match(@"^-?\d+\.\d{3} → -?\d+\.\d{3}$"));
        Assert.That(Balanced.Notes["adamerging_task coefficients"], Does.Match(@"^plain \d\.\d\d, rotated \d\.\d\d, "));
        Assert.That(Balanced.Notes["adamerging_layer coefficients"], Does.Match(@"range \d\.\d\d–\d\.\d\d, mean \d\.\d\d$"));
    }

    [TestCase("adamerging_task")]
    [TestCase("adamerging_layer")]
    [TestCase("adamerging_pp")]
    public void AdaMerging_moves_its_coefficients_and_lowers_the_entropy(string method)
    {
        var (initial, learned) = Results.Coefficients[method];
        var before = initial.ToArray().Cast<double>().ToArray();
        var after = learned.ToArray().Cast<double>().ToArray();
        Assert.That(before, Is.All.EqualTo(0.3));
        Assert.That(after.Zip(before).Max(p => Math.Abs(p.First - p.Second)), Is.GreaterThan(0.1));
        Assert.That(learned.Layers, Has.Count.EqualTo(method == "adamerging_task" ? 1 : 3));
        Assert.That(Results.Notes[$"{method} entropy"], Does.Match(@"^\d+\.\d+ → \d+\.\d+$"));
        var parts = Results.Notes[$"{method} entropy"].Split(" → ").Select(v => double.Parse(v, CultureInfo.InvariantCulture)).ToArray();
        Assert.That(parts[1], Is.LessThan(parts[0]));
    }
}
