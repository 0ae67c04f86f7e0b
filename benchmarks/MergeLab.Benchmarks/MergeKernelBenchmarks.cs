using BenchmarkDotNet.Attributes;
using MergeLab.Methods;
using MergeLab.Stages;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>
/// Per-tensor merge kernels on one parameter of <see cref="Rows"/>×<see cref="Columns"/> with N experts,
/// against a baseline that copies the same input bytes (base + N experts) into a preallocated tensor:
/// the memory-traffic floor of any method that reads every input once. Each shape and dtype is its own
/// class so a filter picks it (<c>--filter '*Kernels_BF16_4096x11008*'</c>).
/// </summary>
/// <remarks>Every method is the per-tensor form: TIES is the mergekit preset (exact top-k per
/// tensor), Breadcrumbs the paper's per-row mask, PCB with per-tensor quantiles, DARE-linear with the
/// paper's 1/(1−p) rescale. Results are disposed inside the timed call, so pooled memory is reused as
/// it is in a streaming merge.</remarks>
public abstract class MergeKernelBenchmarks : IMovesBytes
{
    private ExpertGroup _experts = null!;
    private Tensor _copyDestination = null!;

    private readonly TaskArithmeticMerge _taskArithmetic = new(new TaskArithmeticOptions { Lambda = 0.5 });
    private readonly WeightAverageMerge _linear = new();
    private readonly TiesMerge _ties = new(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
    private readonly DareMerge _dare = new(new DareOptions { DropRate = 0.9, Seed = 1 });
    private readonly DareMerge _dareTies = new(new DareOptions { DropRate = 0.9, Seed = 1, Combination = Combination.Ties });
    private readonly BreadcrumbsMerge _breadcrumbs = new(new BreadcrumbsOptions { Density = 0.2, Gamma = 0.1 });
    private readonly PcbMerge _pcb = new(new PcbOptions { Scope = SelectionScope.PerTensor });

    /// <summary>The number of experts.</summary>
    [Params(2, 4, 8)]
    public int N { get; set; }

    protected abstract long Rows { get; }

    protected abstract long Columns { get; }

    protected abstract ScalarType DType { get; }

    public long BytesMoved(string method, int experts)
    {
        long tensorBytes = Rows * Columns * (DType == ScalarType.Float32 ? 4 : 2);
        long inputs = (experts + 1) * tensorBytes;
        return method == nameof(Copy) ? 2 * inputs : inputs + tensorBytes;
    }

    [GlobalSetup]
    public void Setup()
    {
        _experts = ExpertGroup.Create("model.layers.0.mlp.up_proj.weight", Rows, Columns, N, DType);
        _copyDestination = empty_like(_experts.Inputs);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _experts.Dispose();
        _copyDestination.Dispose();
    }

    [Benchmark(Baseline = true, Description = "copy (inputs)")]
    public void Copy()
    {
        _copyDestination.copy_(_experts.Inputs);
        BenchmarkDevice.Synchronize();
    }

    [Benchmark(Description = "task arithmetic")]
    public void TaskArithmetic() => Run(_taskArithmetic);

    [Benchmark(Description = "linear")]
    public void Linear() => Run(_linear);

    [Benchmark(Description = "TIES")]
    public void Ties() => Run(_ties);

    [Benchmark(Description = "DARE")]
    public void Dare() => Run(_dare);

    [Benchmark(Description = "DARE-TIES")]
    public void DareTies() => Run(_dareTies);

    [Benchmark(Description = "Breadcrumbs")]
    public void Breadcrumbs() => Run(_breadcrumbs);

    [Benchmark(Description = "PCB")]
    public void Pcb() => Run(_pcb);

    private void Run(MergeMethod method)
    {
        using var merged = method.MergeTensor(_experts.Group);
        BenchmarkDevice.Synchronize();
    }
}

public class Kernels_F32_4096x4096 : MergeKernelBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 4096;

    protected override ScalarType DType => ScalarType.Float32;
}

public class Kernels_BF16_4096x4096 : MergeKernelBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 4096;

    protected override ScalarType DType => ScalarType.BFloat16;
}

public class Kernels_F32_4096x11008 : MergeKernelBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 11008;

    protected override ScalarType DType => ScalarType.Float32;
}

public class Kernels_BF16_4096x11008 : MergeKernelBenchmarks
{
    protected override long Rows => 4096;

    protected override long Columns => 11008;

    protected override ScalarType DType => ScalarType.BFloat16;
}
