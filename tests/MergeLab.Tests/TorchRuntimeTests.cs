using System.Text;
using NUnit.Framework;
using TorchSharp;

namespace MergeLab.Tests;

/// <summary>Proves the native TorchSharp library loads on this machine, computes, and was patched by the
/// build exactly when the system's libstdc++ needs it.</summary>
public class TorchRuntimeTests
{
    private const string SystemLibstdcxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";

    [Test]
    public void Torch_loads_and_computes_a_matrix_product()
    {
        using var a = torch.tensor(new float[] { 1, 2, 3, 4 }, new long[] { 2, 2 });
        using var b = torch.tensor(new float[] { 5, 6, 7, 8 }, new long[] { 2, 2 });
        using var c = a.matmul(b);
        Assert.That(c.data<float>().ToArray(), Is.EqualTo(new float[] { 19, 22, 43, 50 }));
    }

    [Test]
    public void Native_library_is_patched_only_when_the_system_libstdcxx_lacks_GLIBCXX_3_4_32()
    {
        Assume.That(OperatingSystem.IsLinux() && File.Exists(SystemLibstdcxx), "Linux x64 only");
        string packages = Environment.GetEnvironmentVariable("NUGET_PACKAGES")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        string original = Path.Combine(packages, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        string copied = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        Assume.That(File.Exists(original), "the TorchSharp package is in the NuGet cache");
        Assert.That(File.Exists(copied), Is.True, "the build copies the native library to the output folder");

        byte[] a = File.ReadAllBytes(original), b = File.ReadAllBytes(copied);
        Assert.That(b.Length, Is.EqualTo(a.Length));
        int differing = a.Zip(b).Count(p => p.First != p.Second);
        bool systemHasIt = Encoding.ASCII.GetString(File.ReadAllBytes(SystemLibstdcxx)).Contains("GLIBCXX_3.4.32\0", StringComparison.Ordinal);
        // The patch rewrites one Vernaux entry: its 4-byte hash and its 4-byte name offset, nothing else.
        Assert.That(differing, systemHasIt ? Is.EqualTo(0) : Is.InRange(1, 8));
    }
}
