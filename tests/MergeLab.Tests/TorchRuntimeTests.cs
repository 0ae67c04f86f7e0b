using NUnit.Framework;
using TorchSharp;

namespace MergeLab.Tests;

/// <summary>Proves the native TorchSharp library loads on this machine and actually computes.</summary>
public class TorchRuntimeTests
{
    [Test]
    public void Torch_loads_and_computes_a_matrix_product()
    {
        using var a = torch.tensor(new float[] { 1, 2, 3, 4 }, new long[] { 2, 2 });
        using var b = torch.tensor(new float[] { 5, 6, 7, 8 }, new long[] { 2, 2 });
        using var c = a.matmul(b);
        Assert.That(c.data<float>().ToArray(), Is.EqualTo(new float[] { 19, 22, 43, 50 }));
    }
}
