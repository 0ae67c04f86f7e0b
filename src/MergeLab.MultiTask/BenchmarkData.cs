using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>Prepared inputs and labels of one task on one split (validation or test).</summary>
/// <param name="Inputs">[N, 784] float32.</param>
/// <param name="Labels">[N] int64, the task's classes.</param>
public sealed record TaskSplit(Tensor Inputs, Tensor Labels) : IDisposable
{
    /// <summary>The number of examples.</summary>
    public long Count => Labels.shape[0];

    /// <inheritdoc />
    public void Dispose()
    {
        Inputs.Dispose();
        Labels.Dispose();
    }
}

/// <summary>
/// The benchmark's data: the training split less a held-out validation split, and the test split,
/// with every task's validation and test inputs prepared once (fixed noise seeds) and training batches
/// drawn on the fly.
/// </summary>
public sealed class BenchmarkData : IDisposable
{
    private readonly Tensor _trainImages;   // [N, 28, 28] uint8
    private readonly Tensor _trainLabels;   // [N] uint8
    private readonly TaskSplit[] _validation;
    private readonly TaskSplit[] _test;

    /// <summary>Splits Fashion-MNIST and prepares the tasks' validation and test sets.</summary>
    /// <param name="mnist">The loaded dataset.</param>
    /// <param name="tasks">The tasks.</param>
    /// <param name="trainCount">Training images used (at most 60,000 − <paramref name="validationCount"/>).</param>
    /// <param name="validationCount">Training images held out for validation (choosing λ).</param>
    /// <param name="testCount">Test images used per task (the first ones of the test split).</param>
    /// <param name="seed">Seeds the split and the noise of the prepared sets.</param>
    public BenchmarkData(FashionMnist mnist, IReadOnlyList<ImageTask> tasks, int trainCount, int validationCount, int testCount, int seed)
    {
        ArgumentNullException.ThrowIfNull(mnist);
        ArgumentNullException.ThrowIfNull(tasks);
        if (validationCount < 1 || trainCount < 1 || trainCount + validationCount > mnist.TrainCount)
        {
            throw new ArgumentException($"{trainCount} training and {validationCount} validation images do not fit in {mnist.TrainCount}.");
        }

        if (testCount < 1 || testCount > mnist.TestCount)
        {
            throw new ArgumentOutOfRangeException(nameof(testCount), testCount, $"The test split has {mnist.TestCount} images.");
        }

        Tasks = tasks;
        var order = Enumerable.Range(0, mnist.TrainCount).ToArray();
#pragma warning disable CA5394 // Reproducible split, not security.
        new Random(seed).Shuffle(order);
#pragma warning restore CA5394
        using var allImages = tensor(mnist.TrainImagesBytes, [mnist.TrainCount, FashionMnist.Side, FashionMnist.Side]);
        using var allLabels = tensor(mnist.TrainLabelsBytes, [mnist.TrainCount]);
        using var validationIndex = tensor(order.Take(validationCount).Select(i => (long)i).ToArray());
        using var trainIndex = tensor(order.Skip(validationCount).Take(trainCount).Select(i => (long)i).ToArray());
        _trainImages = allImages.index_select(0, trainIndex);
        _trainLabels = allLabels.index_select(0, trainIndex);
        using var validationImages = allImages.index_select(0, validationIndex);
        using var validationLabels = allLabels.index_select(0, validationIndex);
        using var testImages = tensor(mnist.TestImagesBytes.AsSpan(0, testCount * FashionMnist.Pixels).ToArray(), [testCount, FashionMnist.Side, FashionMnist.Side]);
        using var testLabels = tensor(mnist.TestLabelsBytes.AsSpan(0, testCount).ToArray(), [testCount]);
        _validation = new TaskSplit[tasks.Count];
        _test = new TaskSplit[tasks.Count];
        for (int t = 0; t < tasks.Count; t++)
        {
            _validation[t] = Prepare(tasks[t], validationImages, validationLabels, seed * 1000 + 2 * t);
            _test[t] = Prepare(tasks[t], testImages, testLabels, seed * 1000 + 2 * t + 1);
        }
    }

    /// <summary>The tasks, in table order.</summary>
    public IReadOnlyList<ImageTask> Tasks { get; }

    /// <summary>The number of training images.</summary>
    public long TrainCount => _trainLabels.shape[0];

    /// <summary>Task <paramref name="task"/>'s validation split.</summary>
    public TaskSplit Validation(int task) => _validation[task];

    /// <summary>Task <paramref name="task"/>'s test split.</summary>
    public TaskSplit Test(int task) => _test[task];

    /// <summary>
    /// One epoch of shuffled training batches of task <paramref name="task"/> (the last partial batch
    /// dropped): inputs [B, 784] and labels [B]. Each batch's tensors belong to the caller's dispose
    /// scope at the time it is produced.
    /// </summary>
    /// <param name="task">The task index.</param>
    /// <param name="batchSize">Examples per batch.</param>
    /// <param name="random">The shuffle.</param>
    /// <param name="noise">The noise generator for noisy tasks.</param>
    /// <param name="limit">Use only the first <paramref name="limit"/> training images (before shuffling); null for all.</param>
    public IEnumerable<(Tensor Inputs, Tensor Labels)> TrainBatches(int task, int batchSize, Random random, Generator noise, long? limit = null)
    {
        long n = Math.Min(limit ?? TrainCount, TrainCount);
        var order = Enumerable.Range(0, (int)n).Select(i => (long)i).ToArray();
#pragma warning disable CA5394
        random.Shuffle(order);
#pragma warning restore CA5394
        // Held across the caller's steps, so outside any dispose scope the caller opens per batch.
        using var shuffled = tensor(order).DetachFromDisposeScope();
        for (int start = 0; start + batchSize <= order.Length; start += batchSize)
        {
            using var index = shuffled.narrow(0, start, batchSize);
            using var raw = _trainImages.index_select(0, index);
            using var labels = _trainLabels.index_select(0, index);
            yield return Batch(task, raw, labels, noise);
        }
    }

    /// <summary>The first <paramref name="count"/> training images of task <paramref name="task"/> in
    /// fixed order, in batches (for computing frozen features).</summary>
    public IEnumerable<(Tensor Inputs, Tensor Labels)> OrderedTrainBatches(int task, int batchSize, Generator noise, long? count = null)
    {
        long n = Math.Min(count ?? TrainCount, TrainCount);
        for (long start = 0; start < n; start += batchSize)
        {
            long length = Math.Min(n, start + batchSize) - start;
            using var raw = _trainImages.narrow(0, start, length);
            using var labels = _trainLabels.narrow(0, start, length);
            yield return Batch(task, raw, labels, noise);
        }
    }

    /// <summary>Task <paramref name="task"/>'s inputs and labels made from raw training images and labels
    /// (both copied: the task's transforms and label map return fresh tensors).</summary>
    private (Tensor Inputs, Tensor Labels) Batch(int task, Tensor raw, Tensor labels, Generator noise)
    {
        using var images = UnitRange(raw);
        return (Tasks[task].Inputs(images, noise), Tasks[task].Labels(labels));
    }

    /// <summary>Pixel bytes as float32 in [0, 1].</summary>
    private static Tensor UnitRange(Tensor pixels)
    {
        using var levels = 255.ToScalar();
        return pixels.to(ScalarType.Float32).div_(levels);
    }

    private static TaskSplit Prepare(ImageTask task, Tensor images, Tensor labels, long seed)
    {
        using var g = new Generator((ulong)seed);
        using var x = UnitRange(images);
        return new TaskSplit(task.Inputs(x, g).DetachFromDisposeScope(), task.Labels(labels).DetachFromDisposeScope());
    }

    /// <inheritdoc />
    public void Dispose()
    {
        _trainImages.Dispose();
        _trainLabels.Dispose();
        foreach (var s in _validation.Concat(_test))
        {
            s.Dispose();
        }
    }
}
