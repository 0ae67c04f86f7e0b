using System.Diagnostics;
using System.Globalization;
using MergeLab.Adaptive;
using MergeLab.Methods;
using MergeLab.Tensors;
using TorchSharp.Modules;
using static System.FormattableString;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>
/// The multi-task merging benchmark of the model-merging papers (task arithmetic, TIES, AdaMerging,
/// LiNeS), on Fashion-MNIST: one MLP backbone pretrained once, one expert fine-tuned from it per task,
/// every merge method's single backbone evaluated on every task with that task's head.
/// </summary>
/// <remarks>
/// <para>Protocol. The backbone is pretrained without labels, by reconstructing batches of every task's
/// inputs over a subset of the training split (the "generic" pretraining; <see cref="BenchmarkOptions.Pretraining"/>
/// picks another objective). Each task's head is a linear probe of the pretrained backbone's
/// frozen features; that is the <c>pretrained</c> row (the "zero-shot" floor). Each expert fine-tunes the
/// backbone with the task's head frozen (as the papers' vision experts keep the zero-shot head), so all
/// rows share the heads and differ only in the backbone; <c>individual</c> is each expert on its own
/// task (the ceiling). Merge rows use MergeLab's methods on the backbones' state dicts; λ (or LiNeS's β)
/// is chosen by average accuracy on the validation split held out from the training split. AdaMerging
/// learns its coefficients from unlabeled test batches, as in its paper.</para>
/// </remarks>
public static class MultiTaskBenchmark
{
    /// <summary>The table's rows, in order.</summary>
    public static IReadOnlyList<string> Methods { get; } =
    [
        "pretrained", "individual", "weight_averaging", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "pcb",
        "adamerging_task", "adamerging_layer", "adamerging_pp", "lines_ta", "lines_ties",
    ];

    /// <summary>Runs the benchmark and returns the table.</summary>
    /// <param name="options">The configuration (<see cref="BenchmarkOptions.Full"/> or <see cref="BenchmarkOptions.Quick"/>).</param>
    /// <param name="dataDirectory">Fashion-MNIST's directory; null: the environment variable or Debian's.</param>
    /// <param name="log">Receives one line per step.</param>
    /// <param name="cancellationToken">Checked between batches and steps.</param>
    /// <exception cref="FashionMnistNotFoundException">The dataset is missing; the message says how to install it.</exception>
    /// <exception cref="IOException">The data cannot be read, or the cache folder (<see cref="BenchmarkOptions.CacheDirectory"/>)
    /// cannot be created, which is found before any training.</exception>
    /// <exception cref="UnauthorizedAccessException">The cache folder cannot be created for lack of permission.</exception>
    public static BenchmarkResults Run(BenchmarkOptions options, string? dataDirectory = null, IProgress<string>? log = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        var timings = new Dictionary<string, TimeSpan>();
        var notes = new Dictionary<string, string>();
        var coefficients = new Dictionary<string, (LayerCoefficients, LayerCoefficients)>();
        var clock = Stopwatch.StartNew();
        var tasks = BenchmarkTasks.All;

        var mnist = FashionMnist.Load(dataDirectory);
        using var data = new BenchmarkData(mnist, tasks, options.TrainCount, options.ValidationCount, options.TestCount, options.Seed);
        Lap("data");

        var cache = new CheckpointCache(options.CacheDirectory, options, mnist.Fingerprint, log);
        using var models = TrainedModels.LoadOrTrain(data, options, cache, log, cancellationToken);
        notes["checkpoints"] = cache.Directory is null ? "trained in memory (no cache)"
            : $"{(models.FromCache ? "reused" : "trained and saved")} in `{cache.Directory}`";
        Lap("training");

        using var evaluator = new Evaluator(data, models.Heads, options.Widths);
        var rows = new List<MethodResult>();
        using (var probeEvaluator = new Evaluator(data, models.ProbeHeads, options.Widths))
        {
            Add(new("pretrained", probeEvaluator.Test(models.Pretrained), "frozen backbone, linear-probe heads"));
        }

        Add(new("individual", Enumerable.Range(0, tasks.Count).Select(t => evaluator.TestOne(models.Experts[t], t)).ToArray(),
            "each task's own expert"));

        var baseModel = models.Pretrained;
        var experts = models.Experts;
        var taskVectors = experts.Select(e => TaskVector.Between(e, baseModel)).ToArray();
        try
        {
            using (var averaged = new WeightAverageMerge().Merge(baseModel, experts, cancellationToken: cancellationToken))
            {
                Add(new("weight_averaging", evaluator.Test(averaged), "mean of the experts"));
            }

            Add(TunedLambda("task_arithmetic", l => new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = l }), options.LambdaGrid, "λ"));
            Add(TunedLambda("ties", l => new TiesMerge(new TiesOptions { Lambda = l }), options.SparseLambdaGrid, "top 20%, λ"));
            Add(TunedLambda("dare_ties", l => new DareMerge(new DareOptions
            {
                DropRate = options.DareDropRate, Combination = Combination.Ties, Lambda = l, Seed = options.Seed,
            }), options.SparseLambdaGrid, $"p = {options.DareDropRate.ToString(CultureInfo.InvariantCulture)}, λ"));
            Add(TunedLambda("breadcrumbs", l => new BreadcrumbsMerge(new BreadcrumbsOptions { Lambda = l }), options.SparseLambdaGrid, "β = 0.2, γ = 0.1, λ"));
            Add(TunedLambda("pcb", l => new PcbMerge(new PcbOptions { Lambda = l }), options.SparseLambdaGrid, "ratio 0.1, λ"));
            Lap("merges");

            var batches = data.Tasks.Select((_, t) => AdaBatches(data.Test(t), options)).ToArray();
            try
            {
                Add(AdaMergingRow("adamerging_task", AdaMergingGranularity.TaskWise, taskVectors));
                Add(AdaMergingRow("adamerging_layer", AdaMergingGranularity.LayerWise, taskVectors));
                var selected = TiesSelection.Select(taskVectors);
                try
                {
                    Add(AdaMergingRow("adamerging_pp", AdaMergingGranularity.LayerWise, selected));
                }
                finally
                {
                    foreach (var s in selected)
                    {
                        s.Dispose();
                    }
                }
            }
            finally
            {
                foreach (var b in batches.SelectMany(b => b))
                {
                    b.Dispose();
                }
            }

            Lap("adamerging");

            using (var sum = TaskVector.Combine(taskVectors))
            {
                Add(LinesRow("lines_ta", sum, options.LinesBetaGrid));
            }

            using (var tiesModel = new TiesMerge().Merge(baseModel, experts, cancellationToken: cancellationToken))
            using (var ties = TaskVector.Between(tiesModel, baseModel))
            {
                Add(LinesRow("lines_ties", ties, options.LinesTiesBetaGrid));
            }

            Lap("lines");

            MethodResult AdaMergingRow(string name, AdaMergingGranularity granularity, IReadOnlyList<TaskVector> vectors)
            {
                var ada = new AdaMerging(new AdaMergingOptions
                {
                    Granularity = granularity,
                    Steps = options.AdaMergingSteps,
                    LearningRate = options.AdaMergingLearningRate,
                    DiversityWeight = options.AdaMergingDiversityWeight,
                    Seed = options.Seed,
                });
                using var backbone = evaluator.Backbone(baseModel);
                using var result = ada.Learn(backbone, vectors, batches.Select(b => (IReadOnlyList<Tensor>)b).ToArray(),
                    (features, t) => evaluator.Heads[t].call(features), cancellationToken: cancellationToken);
                var c = result.Coefficients;
                coefficients[name] = (result.InitialCoefficients, c);
                var all = c.ToArray().Cast<double>().ToArray();
                notes[$"{name} coefficients"] = granularity == AdaMergingGranularity.TaskWise
                    ? string.Join(", ", Enumerable.Range(0, c.TaskCount).Select(t => Invariant($"{tasks[t].Name} {c[t, 0]:F2}")))
                    : Invariant($"{c.TaskCount}×{c.Layers.Count} (layers {string.Join(", ", c.Layers)}), range {all.Min():F2}–{all.Max():F2}, mean {all.Average():F2}");
                // With the class-balance term the history is the loss (entropy less the weighted batch-mean entropy).
                bool paperLoss = options.AdaMergingDiversityWeight == 0;
                notes[$"{name} {(paperLoss ? "entropy" : "loss")}"] = Invariant($"{result.EntropyHistory[0]:F3} → {result.EntropyHistory[^1]:F3}");
                return new(name, evaluator.Test(result.Merged),
                    $"{(granularity == AdaMergingGranularity.TaskWise ? "task-wise" : "layer-wise")}{(name == "adamerging_pp" ? " on TIES-selected τ" : "")}, {options.AdaMergingSteps} steps"
                    + (paperLoss ? "" : $", diversity weight {options.AdaMergingDiversityWeight.ToString(CultureInfo.InvariantCulture)}"));
            }

            MethodResult LinesRow(string name, TaskVector merged, IReadOnlyList<double> betas)
            {
                double alpha = Lines.MultiTaskAlpha(taskVectors, merged);
                double bestBeta = BestOnValidation(betas, beta => Lines.Apply(baseModel, merged, new LinesOptions { Alpha = alpha, Beta = beta }));
                using var chosen = Lines.Apply(baseModel, merged, new LinesOptions { Alpha = alpha, Beta = bestBeta });
                return new(name, evaluator.Test(chosen), Invariant($"α = {alpha:F3}, β = {bestBeta:F1} (validation)"));
            }
        }
        finally
        {
            foreach (var tv in taskVectors)
            {
                tv.Dispose();
            }
        }

        timings["total"] = clock.Elapsed;
        return new BenchmarkResults(tasks, rows, options, timings, notes, coefficients);

        void Add(MethodResult row)
        {
            rows.Add(row);
            Report(row);
        }

        void Report(MethodResult row) =>
            log?.Report(Invariant($"{row.Method,-17} average {row.Average:F1}%  [{string.Join(" ", row.Accuracies.Select(a => a.ToString("F1", CultureInfo.InvariantCulture)))}]  {row.Setting}"));

        void Lap(string phase)
        {
            timings[phase] = clock.Elapsed - timings.Values.Aggregate(TimeSpan.Zero, (a, b) => a + b);
            log?.Report(Invariant($"-- {phase} done in {timings[phase].TotalSeconds:F1} s"));
        }

        MethodResult TunedLambda(string name, Func<double, MergeMethod> method, IReadOnlyList<double> grid, string setting)
        {
            // Every method here is θ_base + λ·τ_merged, so one merge at λ = 1 gives the whole grid.
            using var atOne = method(1.0).Merge(baseModel, experts, progress: null, cancellationToken: cancellationToken);
            using var merged = TaskVector.Between(atOne, baseModel);
            var curve = new List<string>();
            double bestLambda = BestOnValidation(grid, lambda => merged.ApplyTo(baseModel, lambda), curve);
            notes[$"{name} validation curve (λ: average %)"] = string.Join(", ", curve);

            using var chosen = method(bestLambda).Merge(baseModel, experts, progress: null, cancellationToken: cancellationToken);
            return new(name, evaluator.Test(chosen), $"{setting} = {bestLambda.ToString("0.0##", CultureInfo.InvariantCulture)} (validation)");
        }

        // The grid value whose model scores best on the validation split (the first of equal scores),
        // noting each value's score in `curve` when given.
        double BestOnValidation(IReadOnlyList<double> grid, Func<double, StateDict> modelAt, List<string>? curve = null)
        {
            double best = double.NaN, bestScore = double.NegativeInfinity;
            foreach (var value in grid)
            {
                using var model = modelAt(value);
                double score = evaluator.Validation(model).Average();
                curve?.Add(Invariant($"{value:0.0#}: {score:F1}"));
                if (score > bestScore)
                {
                    (bestScore, best) = (score, value);
                }
            }

            return best;
        }
    }

    /// <summary>The first <see cref="BenchmarkOptions.AdaMergingBatches"/> unlabeled batches of a test split.</summary>
    private static Tensor[] AdaBatches(TaskSplit test, BenchmarkOptions o)
    {
        int count = (int)Math.Min(o.AdaMergingBatches, test.Count / o.AdaMergingBatchSize);
        return Enumerable.Range(0, count)
            .Select(i =>
            {
                using var view = test.Inputs.narrow(0, (long)i * o.AdaMergingBatchSize, o.AdaMergingBatchSize);
                return view.clone().DetachFromDisposeScope();
            })
            .ToArray();
    }

    /// <summary>Evaluates backbone state dicts with the tasks' heads.</summary>
    private sealed class Evaluator : IDisposable
    {
        private readonly BenchmarkData _data;
        private readonly IReadOnlyList<int> _widths;
        private readonly MlpBackbone _scratch;

        public Evaluator(BenchmarkData data, IReadOnlyList<Linear> heads, IReadOnlyList<int> widths)
        {
            _data = data;
            _widths = widths;
            Heads = heads;
            _scratch = new MlpBackbone(widths);
        }

        public IReadOnlyList<Linear> Heads { get; }

        public MlpBackbone Backbone(StateDict weights)
        {
            var module = new MlpBackbone(_widths);
            module.Load(weights);
            module.eval();
            return module;
        }

        /// <summary>Test accuracy (%) of one backbone on every task.</summary>
        public double[] Test(StateDict weights) => Accuracies(weights, _data.Test);

        /// <summary>Validation accuracy (%) of one backbone on every task.</summary>
        public double[] Validation(StateDict weights) => Accuracies(weights, _data.Validation);

        /// <summary>Test accuracy (%) of one backbone on one task.</summary>
        public double TestOne(StateDict weights, int task)
        {
            _scratch.Load(weights);
            return 100 * Evaluation.Accuracy(_scratch, Heads[task], _data.Test(task));
        }

        private double[] Accuracies(StateDict weights, Func<int, TaskSplit> split)
        {
            _scratch.Load(weights);
            return Enumerable.Range(0, _data.Tasks.Count).Select(t => 100 * Evaluation.Accuracy(_scratch, Heads[t], split(t))).ToArray();
        }

        public void Dispose() => _scratch.Dispose();
    }
}
