using BenchmarkDotNet.Attributes;
using MergeLab.Methods;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>
/// Per-tensor merge kernels on one 4096×4096 float32 parameter (64 MiB) with N experts, against a
/// baseline that only copies the same input bytes (base + N experts) into a preallocated tensor: the
/// memory-traffic floor of any method that reads every input once.
/// </summary>
public class MergeKernelBenchmarks
{
    private const int Size = 4096;

    private Tensor _base = null!;
    private Tensor[] _experts = [];
    private Tensor _inputs = null!;
    private Tensor _copyDestination = null!;
    private TensorGroup _group = null!;

    private readonly TaskArithmeticMerge _taskArithmetic = new(new TaskArithmeticOptions { Lambda = 0.5 });
    private readonly TiesMerge _ties = new(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });

    /// <summary>The number of experts.</summary>
    [Params(3)]
    public int N { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(2); // the default (all cores) makes timings noisy on shared machines
        torch.manual_seed(0);

        // The inputs live in one [N + 1, Size, Size] tensor: row 0 is the base, rows 1..N the experts
        // (the base plus a small dense fine-tuning delta each).
        using (var scope = NewDisposeScope())
        {
            var rows = new Tensor[N + 1];
            rows[0] = randn(Size, Size);
            for (int k = 1; k <= N; k++)
            {
                rows[k] = rows[0] + 0.01 * randn(Size, Size);
            }

            _inputs = stack(rows).MoveToOuterDisposeScope();
        }

        _base = _inputs[0];
        _experts = Enumerable.Range(1, N).Select(k => _inputs[k]).ToArray();
        _group = new TensorGroup("layer.weight", _base, _experts);
        _copyDestination = empty_like(_inputs);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var t in _experts)
        {
            t.Dispose();
        }

        _base.Dispose();
        _inputs.Dispose();
        _copyDestination.Dispose();
    }

    [Benchmark(Baseline = true, Description = "copy_ (inputs)")]
    public void CopyInputs() => _copyDestination.copy_(_inputs);

    [Benchmark(Description = "task arithmetic")]
    public void TaskArithmetic()
    {
        using var merged = _taskArithmetic.MergeTensor(_group);
    }

    [Benchmark(Description = "TIES (mergekit)")]
    public void TiesMergekit()
    {
        using var merged = _ties.MergeTensor(_group);
    }
}
