using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Stages;

/// <summary>Seeded random keep-masks for DARE-style dropping.</summary>
internal static class DropMask
{
    /// <summary>
    /// A 64-bit seed for one (seed, tensor, expert) stream: FNV-1a of the UTF-8 name mixed with the
    /// seed and index by SplitMix64, so each tensor's mask is independent of merge order.
    /// </summary>
    public static long StreamSeed(long seed, string tensorName, int expertIndex)
    {
        ulong h = 14695981039346656037UL;
        foreach (byte b in Encoding.UTF8.GetBytes(tensorName))
        {
            h = (h ^ b) * 1099511628211UL;
        }

        return (long)(SplitMix(SplitMix((ulong)seed ^ h) + (ulong)expertIndex) >> 1);
    }

    /// <summary>
    /// A float mask (1 keep, 0 drop) of <paramref name="like"/>'s shape: entry i is kept when
    /// u_i ≥ p for u_i uniform in [0, 1). The CPU uniform generator is sequential, so the mask does
    /// not depend on the thread count.
    /// </summary>
    public static Tensor Keep(Tensor like, double dropRate, long streamSeed)
    {
        using var generator = new Generator((ulong)streamSeed, like.device);
        using var u = rand(like.shape, ScalarType.Float32, like.device, generator: generator);
        return u.ge(dropRate).to(ScalarType.Float32);
    }

    private static ulong SplitMix(ulong x)
    {
        x += 0x9E3779B97F4A7C15UL;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }
}
