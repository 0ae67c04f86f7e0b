using System.Globalization;
using System.Numerics;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using NUnit.Framework;

namespace MergeLab.Tests.Selection;

/// <summary>
/// .ci/run runs the kernels' tests again with AVX-512 off and with <c>Vector&lt;T&gt;</c> at 128 and 512
/// bits, through the runtime's environment switches. A switch the runtime ignored would run the default
/// paths again and still pass, so this test, which those runs include, checks that each switch took
/// effect, and logs the width every run used.
/// </summary>
[TestFixture]
public class VectorWidthTests
{
    [Test]
    public void The_runtime_switches_of_the_run_took_effect()
    {
        int bits = Vector<byte>.Count * 8;
        TestContext.Progress.WriteLine($"Vector<T>: {bits} bits; Vector512 accelerated: {Vector512.IsHardwareAccelerated}; AVX-512F: {Avx512F.IsSupported}");
        // The runtime reads the switch as a decimal width and ignores one below 128 (as this test does).
        if (Environment.GetEnvironmentVariable("DOTNET_MaxVectorTBitWidth") is { Length: > 0 } asked
            && int.TryParse(asked, NumberStyles.None, CultureInfo.InvariantCulture, out int wanted)
            && wanted >= 128)
        {
            // At most the width asked for, and at least that or the widest the CPU accelerates, whichever is
            // smaller (a CPU whose 512-bit operations are not "accelerated" may still give Vector<T> 512 bits).
            int widest = Vector512.IsHardwareAccelerated ? 512 : Vector256.IsHardwareAccelerated ? 256 : 128;
            Assert.That(bits, Is.InRange(Math.Min(wanted, widest), wanted), $"DOTNET_MaxVectorTBitWidth={asked}");
        }

        if (Environment.GetEnvironmentVariable("DOTNET_EnableAVX512") == "0")
        {
            Assert.That(Avx512F.IsSupported || Vector512.IsHardwareAccelerated, Is.False, "DOTNET_EnableAVX512=0");
        }
    }
}
