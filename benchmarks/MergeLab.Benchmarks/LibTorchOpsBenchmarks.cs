using BenchmarkDotNet.Attributes;
using MergeLab.Methods;
using MergeLab.Selection;
using MergeLab.Stages;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>
/// Each method's CPU kernel against the same method computed with whole-tensor libtorch operations, in
/// one process on the same inputs and threads (<c>--filter '*LibTorchOps*'</c>). The libtorch
/// formulation is the one MergeLab runs on other devices and tests its kernels against bit for bit; it is
/// also how the Python tools compute a merge (a PyTorch operation per step over [N, …] tensors), so it
/// stands in for them on a machine without them. The shape and the expert count are those of the peer
/// figures in the performance issue: one 4096×4096 float32 parameter, 3 experts. Each method runs in both
/// <see cref="Benchmarks.Formulation"/>s. On a device other than the CPU MergeLab itself merges with
/// libtorch operations, so both rows then time the same code.
/// </summary>
public class LibTorchOps_F32_4096x4096
{
    private const int Experts = 3;
    private ExpertGroup _experts = null!;

    private readonly TaskArithmeticMerge _taskArithmetic = new(new TaskArithmeticOptions { Lambda = 0.5 });
    private readonly TiesMerge _tiesMergekit = new(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 });
    private readonly TiesMerge _tiesPeft = new(new TiesOptions { Preset = TiesPreset.Peft, Density = 0.2 });
    private readonly DareMerge _dare = new(new DareOptions { DropRate = 0.9, Seed = 1 });
    private readonly BreadcrumbsMerge _breadcrumbs = new(new BreadcrumbsOptions { Variant = BreadcrumbsVariant.Mergekit, Density = 0.2, Gamma = 0.01 });
    private readonly PcbMerge _pcb = new(new PcbOptions { Scope = SelectionScope.PerTensor });

    [GlobalSetup]
    public void Setup() => _experts = ExpertGroup.Create("model.layers.0.self_attn.q_proj.weight", 4096, 4096, Experts, ScalarType.Float32);

    [GlobalCleanup]
    public void Cleanup() => _experts.Dispose();

    /// <summary>Which implementation merges: libtorch operations over whole tensors, or MergeLab's CPU kernels.</summary>
    [ParamsAllValues]
    public Formulation Formulation { get; set; }

    [Benchmark(Description = "task arithmetic")]
    public void TaskArithmetic() => Run(_taskArithmetic);

    [Benchmark(Description = "TIES (mergekit)")]
    public void TiesMergekit() => Run(_tiesMergekit);

    [Benchmark(Description = "TIES (PEFT)")]
    public void TiesPeft() => Run(_tiesPeft);

    [Benchmark(Description = "DARE")]
    public void Dare() => Run(_dare);

    [Benchmark(Description = "Breadcrumbs (mergekit)")]
    public void Breadcrumbs() => Run(_breadcrumbs);

    [Benchmark(Description = "PCB")]
    public void Pcb() => Run(_pcb);

    /// <summary>Merges the group with the CPU kernels on or off (off: every step a libtorch operation).</summary>
    private void Run(MergeMethod method)
    {
        MagnitudeThreshold.CpuKernelsEnabled = Formulation == Formulation.MergeLab;
        try
        {
            using var merged = method.MergeTensor(_experts.Group);
            BenchmarkDevice.Synchronize();
        }
        finally
        {
            MagnitudeThreshold.CpuKernelsEnabled = true;
        }
    }
}

/// <summary>How <see cref="LibTorchOps_F32_4096x4096"/> merges.</summary>
public enum Formulation
{
    /// <summary>A libtorch operation per step over whole tensors (MergeLab with its CPU kernels off).</summary>
    LibTorchOps,

    /// <summary>MergeLab's CPU kernels.</summary>
    MergeLab,
}
