using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>
/// One task of the benchmark: a fixed transformation of Fashion-MNIST images (its input distribution)
/// and a mapping of the 10 clothing labels to the task's classes (its label space).
/// </summary>
public sealed class ImageTask
{
    private readonly Func<Tensor, Generator, Tensor> _transform;
    private readonly long[]? _labelMap;

    /// <summary>Creates a task.</summary>
    /// <param name="name">The snake_case name used in the results (e.g. <c>rotated</c>).</param>
    /// <param name="description">One line for the results' legend.</param>
    /// <param name="classCount">The number of classes.</param>
    /// <param name="transform">Maps images [B, 28, 28] in [0, 1] to transformed images of the same
    /// shape in [0, 1]; may draw noise from the generator it is given.</param>
    /// <param name="labelMap">Maps each of the 10 Fashion-MNIST labels to a class; null keeps them.</param>
    public ImageTask(string name, string description, int classCount, Func<Tensor, Generator, Tensor> transform, long[]? labelMap = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(transform);
        if (labelMap is not null && (labelMap.Length != 10 || labelMap.Any(c => c < 0 || c >= classCount)))
        {
            throw new ArgumentException("The label map needs 10 entries, each a class of the task.", nameof(labelMap));
        }

        Name = name;
        Description = description;
        ClassCount = classCount;
        _transform = transform;
        _labelMap = labelMap;
    }

    /// <summary>The task's name in the results table.</summary>
    public string Name { get; }

    /// <summary>What the task is.</summary>
    public string Description { get; }

    /// <summary>The number of classes of the task's head.</summary>
    public int ClassCount { get; }

    /// <summary>The model input for images [B, 28, 28] of bytes or floats in [0, 1]: the task's
    /// transformation, centred to [−1, 1] and flattened to [B, 784] float32.</summary>
    public Tensor Inputs(Tensor images01, Generator noise)
    {
        ArgumentNullException.ThrowIfNull(images01);
        using var scope = NewDisposeScope();
        var x = _transform(images01, noise);
        using var two = 2.ToScalar();
        using var one = 1.ToScalar();
        return x.mul(two).sub_(one).reshape(x.shape[0], FashionMnist.Pixels).MoveToOuterDisposeScope();
    }

    /// <summary>The task's labels for Fashion-MNIST labels (int64).</summary>
    public Tensor Labels(Tensor labels)
    {
        ArgumentNullException.ThrowIfNull(labels);
        if (_labelMap is null)
        {
            return labels.to(ScalarType.Int64, copy: true);
        }

        using var map = tensor(_labelMap, device: labels.device);
        using var index = labels.to(ScalarType.Int64);
        return map.index_select(0, index);
    }

    /// <inheritdoc />
    public override string ToString() => Name;
}

/// <summary>The eight tasks of the benchmark.</summary>
public static class BenchmarkTasks
{
    /// <summary>The seed of the patch permutation of <c>patch_shuffled</c>.</summary>
    public const int PatchPermutationSeed = 20240521;

    /// <summary>Coarse classes: tops (T-shirt, pullover, dress, coat, shirt), bottoms (trouser),
    /// footwear (sandal, sneaker, ankle boot), bags.</summary>
    public static readonly IReadOnlyList<long> CoarseLabels = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2];

    /// <summary>The eight tasks, in table order.</summary>
    public static IReadOnlyList<ImageTask> All { get; } = Create();

    private static ImageTask[] Create()
    {
        var patchIndex = PatchShuffleIndex(PatchPermutationSeed);
        return
        [
            new("plain", "the 10 classes as they are", 10, (x, _) => x.alias()),
            new("rotated", "rotated 90° clockwise", 10, (x, _) => x.rot90(-1, (1, 2))),
            new("inverted", "intensities inverted (1 − x)", 10, (x, _) =>
            {
                using var one = 1.ToScalar();
                return x.neg().add_(one);
            }),
            new("flipped_noisy", "mirrored left-right, plus Gaussian noise σ = 0.3", 10,
                (x, g) =>
                {
                    using var sigma = 0.3.ToScalar();
                    using var zero = 0.ToScalar();
                    using var one = 1.ToScalar();
                    return (x.flip(2) + randn(x.shape, generator: g) * sigma).clamp_(zero, one);
                }),
            new("coarse", "4 classes: tops, bottoms, footwear, bags", 4, (x, _) => x.alias(), [.. CoarseLabels]),
            new("patch_shuffled", "the 49 4×4 patches in a fixed random order", 10,
                (x, _) =>
                {
                    using var index = tensor(patchIndex, device: x.device);
                    return x.reshape(x.shape[0], FashionMnist.Pixels).index_select(1, index).reshape(x.shape);
                }),
            new("low_res", "averaged to 7×7, then blown up to 28×28", 10,
                (x, _) =>
                {
                    using var scope = NewDisposeScope();
                    long b = x.shape[0];
                    var small = x.reshape(b, 7, 4, 7, 4).mean([2, 4]);
                    return small.repeat_interleave(4, 1).repeat_interleave(4, 2).MoveToOuterDisposeScope();
                }),
            new("thresholded", "binarised at 0.5 (silhouettes)", 10, (x, _) =>
            {
                using var half = 0.5.ToScalar();
                return x.ge(half).to(ScalarType.Float32);
            }),
        ];
    }

    /// <summary>The pixel index of the patch-shuffled image: 4×4 patches moved by a seeded permutation.</summary>
    internal static long[] PatchShuffleIndex(int seed)
    {
        const int patch = 4, grid = FashionMnist.Side / patch;
        var order = Enumerable.Range(0, grid * grid).ToArray();
#pragma warning disable CA5394 // A fixed, reproducible permutation, not security.
        new Random(seed).Shuffle(order);
#pragma warning restore CA5394
        var index = new long[FashionMnist.Pixels];
        for (int target = 0; target < order.Length; target++)
        {
            int source = order[target];
            int tr = target / grid, tc = target % grid, sr = source / grid, sc = source % grid;
            for (int i = 0; i < patch; i++)
            {
                for (int j = 0; j < patch; j++)
                {
                    index[((tr * patch) + i) * FashionMnist.Side + (tc * patch) + j] =
                        ((sr * patch) + i) * FashionMnist.Side + (sc * patch) + j;
                }
            }
        }

        return index;
    }
}
