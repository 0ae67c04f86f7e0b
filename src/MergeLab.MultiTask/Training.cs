using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>Pretraining, linear probes and fine-tuning of the benchmark's models (Adam, cross-entropy).</summary>
internal static class Training
{
    /// <summary>
    /// Pretrains <paramref name="backbone"/> on the generic objective (<see cref="BenchmarkOptions.Pretraining"/>)
    /// over the first <see cref="BenchmarkOptions.PretrainExamples"/> training images, with a temporary
    /// head (a classifier or a decoder) that is then discarded.
    /// </summary>
    public static void Pretrain(MlpBackbone backbone, BenchmarkData data, BenchmarkOptions o, CancellationToken ct)
    {
        manual_seed(o.Seed + 1);
        bool autoencode = o.Pretraining == PretrainingObjective.MixtureAutoencoder;
        bool mixture = o.Pretraining != PretrainingObjective.PlainClassification;
        using var head = nn.Linear(backbone.FeatureWidth, autoencode ? FashionMnist.Pixels : 10);
        var random = new Random(o.Seed + 1);
        using var noise = new Generator((ulong)(o.Seed + 1));
        var parameters = backbone.parameters().Concat(head.parameters()).ToArray();
        using var optimizer = optim.Adam(parameters, o.PretrainLearningRate);
        backbone.train();
        for (int epoch = 0; epoch < o.PretrainEpochs; epoch++)
        {
            // The autoencoder sees every task's input distribution in turn (one task per batch, no
            // labels); the classifier sees the plain task only.
            // The mixture classifier skips tasks with other label spaces (the coarse task's images are
            // the plain task's anyway).
            var streams = mixture
                ? Enumerable.Range(0, data.Tasks.Count).Where(t => autoencode || data.Tasks[t].ClassCount == 10)
                    .Select(t => data.TrainBatches(t, o.BatchSize, random, noise, o.PretrainExamples).GetEnumerator()).ToArray()
                : [data.TrainBatches(0, o.BatchSize, random, noise, o.PretrainExamples).GetEnumerator()];
            try
            {
                for (int b = 0; ; b++)
                {
                    var stream = streams[b % streams.Length];
                    if (!stream.MoveNext())
                    {
                        break;
                    }

                    ct.ThrowIfCancellationRequested();
                    var (x, y) = stream.Current;
                    using var scope = NewDisposeScope();
                    optimizer.zero_grad();
                    var output = head.call(backbone.call(x));
                    var loss = autoencode ? nn.functional.mse_loss(output, x) : nn.functional.cross_entropy(output, y);
                    loss.backward();
                    optimizer.step();
                    x.Dispose();
                    y.Dispose();
                }
            }
            finally
            {
                foreach (var s in streams)
                {
                    s.Dispose();
                }
            }
        }

        backbone.eval();
    }

    /// <summary>
    /// Trains a linear head for task <paramref name="task"/> on the frozen features of
    /// <paramref name="backbone"/> (the "zero-shot" head: the pretrained backbone's linear probe).
    /// </summary>
    public static Linear TrainProbe(MlpBackbone backbone, int task, BenchmarkData data, BenchmarkOptions o, CancellationToken ct)
    {
        backbone.eval();
        using var noise = new Generator((ulong)(o.Seed + 100 + task));
        Tensor features, labels;
        using (no_grad())
        {
            var fs = new List<Tensor>();
            var ls = new List<Tensor>();
            foreach (var (x, y) in data.OrderedTrainBatches(task, 1024, noise, o.ProbeExamples))
            {
                using (x)
                {
                    fs.Add(backbone.call(x));
                }

                ls.Add(y);
            }

            features = cat(fs, 0);
            labels = cat(ls, 0);
            foreach (var t in fs.Concat(ls))
            {
                t.Dispose();
            }
        }

        using (features)
        using (labels)
        {
            manual_seed(o.Seed + 200 + task);
            var head = nn.Linear(backbone.FeatureWidth, data.Tasks[task].ClassCount);
            using var optimizer = optim.Adam(head.parameters(), o.ProbeLearningRate);
            var random = new Random(o.Seed + 300 + task);
            long n = features.shape[0];
            var order = Enumerable.Range(0, (int)n).Select(i => (long)i).ToArray();
            for (int epoch = 0; epoch < o.ProbeEpochs; epoch++)
            {
#pragma warning disable CA5394
                random.Shuffle(order);
#pragma warning restore CA5394
                for (int start = 0; start + o.BatchSize <= n; start += o.BatchSize)
                {
                    ct.ThrowIfCancellationRequested();
                    using var scope = NewDisposeScope();
                    var index = tensor(order.AsSpan(start, o.BatchSize).ToArray());
                    optimizer.zero_grad();
                    var loss = nn.functional.cross_entropy(head.call(features.index_select(0, index)), labels.index_select(0, index));
                    loss.backward();
                    optimizer.step();
                }
            }

            return head;
        }
    }

    /// <summary>
    /// Fine-tunes <paramref name="backbone"/> (and <paramref name="head"/> when
    /// <see cref="BenchmarkOptions.FineTuneHead"/>) on task <paramref name="task"/>.
    /// </summary>
    public static void FineTune(MlpBackbone backbone, Linear head, int task, BenchmarkData data, BenchmarkOptions o, CancellationToken ct)
    {
        manual_seed(o.Seed + 400 + task);
        var random = new Random(o.Seed + 500 + task);
        using var noise = new Generator((ulong)(o.Seed + 600 + task));
        var parameters = o.FineTuneHead ? backbone.parameters().Concat(head.parameters()).ToArray() : backbone.parameters().ToArray();
        foreach (var p in head.parameters())
        {
            p.requires_grad_(o.FineTuneHead);
        }

        using optim.Optimizer optimizer = o.FineTuneSgd
            ? optim.SGD(parameters, o.FineTuneLearningRate, momentum: 0.9)
            : optim.Adam(parameters, o.FineTuneLearningRate);
        backbone.train();
        for (int epoch = 0; epoch < o.FineTuneEpochs; epoch++)
        {
            foreach (var (x, y) in data.TrainBatches(task, o.BatchSize, random, noise, o.FineTuneExamples))
            {
                ct.ThrowIfCancellationRequested();
                using var scope = NewDisposeScope();
                optimizer.zero_grad();
                var loss = nn.functional.cross_entropy(head.call(backbone.call(x)), y);
                loss.backward();
                optimizer.step();
                x.Dispose();
                y.Dispose();
            }
        }

        foreach (var p in head.parameters())
        {
            p.requires_grad_(true);
        }

        backbone.eval();
    }
}
