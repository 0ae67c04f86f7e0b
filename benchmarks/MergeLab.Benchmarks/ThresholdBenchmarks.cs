using BenchmarkDotNet.Attributes;
using MergeLab.Selection;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>
/// The exact top-k magnitude threshold alone on one |τ| tensor (float32): MergeLab's selection against
/// libtorch's <c>kthvalue</c> (the baseline) and <c>topk</c> of 20%. The k-th smallest is the TIES
/// paper's trim threshold; the top-k mask is mergekit's exact-count trim with ties to the lowest positions.
/// </summary>
public abstract class ThresholdBenchmarks : IMovesBytes
{
    private Tensor _magnitudes = null!;
    private long _k;

    protected abstract long Rows { get; }

    protected abstract long Columns { get; }

    public long BytesMoved(string method, int experts) => Rows * Columns * 4;

    [GlobalSetup]
    public void Setup()
    {
        BenchmarkDevice.Initialize();
        torch.manual_seed(0);
        using var tau = randn(Rows, Columns) * 0.01;
        _magnitudes = tau.abs().to(BenchmarkDevice.Device);
        _k = _magnitudes.numel() - _magnitudes.numel() / 5; // the threshold of the top 20%
    }

    [GlobalCleanup]
    public void Cleanup() => _magnitudes.Dispose();

    [Benchmark(Baseline = true, Description = "libtorch kthvalue")]
    public float KthValue()
    {
        using var flat = _magnitudes.flatten();
        var (values, indices) = flat.kthvalue(_k, 0, false);
        using (values)
        using (indices)
        {
            return values.item<float>();
        }
    }

    [Benchmark(Description = "libtorch topk (20%)")]
    public void TopK()
    {
        using var flat = _magnitudes.flatten();
        var (values, indices) = flat.topk((int)(_magnitudes.numel() - _k));
        values.Dispose();
        indices.Dispose();
        BenchmarkDevice.Synchronize();
    }

    [Benchmark(Description = "MergeLab k-th smallest")]
    public float KthSmallest() => MagnitudeThreshold.KthSmallest(_magnitudes, _k);

    [Benchmark(Description = "MergeLab top-k mask (20%)")]
    public void TopKMask()
    {
        using var mask = MagnitudeThreshold.TopKMask(_magnitudes, _magnitudes.numel() - _k);
        BenchmarkDevice.Synchronize();
    }
}

public class Threshold_4096x4096 : ThresholdBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 4096;
}

public class Threshold_4096x11008 : ThresholdBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 11008;
}
