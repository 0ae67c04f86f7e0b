using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>Where the benchmarks put their tensors: <c>--device cpu|cuda</c> on the command line
/// (default cpu). Torch runs with 2 threads, as in the tests, so runs on shared machines compare.</summary>
public static class BenchmarkDevice
{
    /// <summary>The device name given on the command line.</summary>
    public static string Name { get; set; } = "cpu";

    /// <summary>The torch device.</summary>
    public static Device Device => Name == "cuda" ? CUDA : CPU;

    /// <summary>Fixes torch's threads and checks the device exists.</summary>
    public static void Initialize()
    {
        torch.set_num_threads(2);
        if (Name == "cuda" && !torch.cuda.is_available())
        {
            throw new InvalidOperationException(
                "--device cuda was given but torch sees no CUDA device: this build references TorchSharp-cpu; " +
                "reference a TorchSharp-cuda package (and run on a machine with a GPU) to benchmark on CUDA.");
        }
    }

    /// <summary>Waits for queued device work, so a timed operation includes it.</summary>
    public static void Synchronize()
    {
        if (Name == "cuda")
        {
            torch.cuda.synchronize(CUDA);
        }
    }
}
