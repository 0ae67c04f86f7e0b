using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
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
/// figures in the performance issue: one 4096×4096 float32 parameter, 3 experts. Each method is a
/// category whose baseline is its libtorch formulation, so the Ratio column is the kernel's time over it.
/// On a device other than the CPU MergeLab itself merges with libtorch operations, so both rows then time
/// the same code.
/// </summary>
[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
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

    [Benchmark(Description = "task arithmetic, libtorch ops", Baseline = true), BenchmarkCategory("task arithmetic")]
    public void TaskArithmeticOps() => Run(_taskArithmetic, libtorch: true);

    [Benchmark(Description = "task arithmetic, MergeLab"), BenchmarkCategory("task arithmetic")]
    public void TaskArithmetic() => Run(_taskArithmetic, libtorch: false);

    [Benchmark(Description = "TIES (mergekit), libtorch ops", Baseline = true), BenchmarkCategory("TIES (mergekit)")]
    public void TiesMergekitOps() => Run(_tiesMergekit, libtorch: true);

    [Benchmark(Description = "TIES (mergekit), MergeLab"), BenchmarkCategory("TIES (mergekit)")]
    public void TiesMergekit() => Run(_tiesMergekit, libtorch: false);

    [Benchmark(Description = "TIES (PEFT), libtorch ops", Baseline = true), BenchmarkCategory("TIES (PEFT)")]
    public void TiesPeftOps() => Run(_tiesPeft, libtorch: true);

    [Benchmark(Description = "TIES (PEFT), MergeLab"), BenchmarkCategory("TIES (PEFT)")]
    public void TiesPeft() => Run(_tiesPeft, libtorch: false);

    [Benchmark(Description = "DARE, libtorch ops", Baseline = true), BenchmarkCategory("DARE")]
    public void DareOps() => Run(_dare, libtorch: true);

    [Benchmark(Description = "DARE, MergeLab"), BenchmarkCategory("DARE")]
    public void Dare() => Run(_dare, libtorch: false);

    [Benchmark(Description = "Breadcrumbs (mergekit), libtorch ops", Baseline = true), BenchmarkCategory("Breadcrumbs (mergekit)")]
    public void BreadcrumbsOps() => Run(_breadcrumbs, libtorch: true);

    [Benchmark(Description = "Breadcrumbs (mergekit), MergeLab"), BenchmarkCategory("Breadcrumbs (mergekit)")]
    public void Breadcrumbs() => Run(_breadcrumbs, libtorch: false);

    [Benchmark(Description = "PCB, libtorch ops", Baseline = true), BenchmarkCategory("PCB")]
    public void PcbOps() => Run(_pcb, libtorch: true);

    [Benchmark(Description = "PCB, MergeLab"), BenchmarkCategory("PCB")]
    public void Pcb() => Run(_pcb, libtorch: false);

    /// <summary>Merges the group with the CPU kernels on or off (off: every step a libtorch operation).</summary>
    private void Run(MergeMethod method, bool libtorch)
    {
        MagnitudeThreshold.CpuKernelsEnabled = !libtorch;
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
