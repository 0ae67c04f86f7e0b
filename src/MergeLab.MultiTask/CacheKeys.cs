using System.Security.Cryptography;
using System.Text;

namespace MergeLab.MultiTask;

/// <summary>The benchmark's cache keys: the first 12 hex digits of a SHA-256 digest (of the training
/// settings, of the data files, and of both together for a cache folder's name).</summary>
internal static class CacheKeys
{
    /// <summary>The key of <paramref name="text"/>'s UTF-8 bytes.</summary>
    public static string Of(string text) => FromDigest(SHA256.HashData(Encoding.UTF8.GetBytes(text)));

    /// <summary>The key of a finished SHA-256 <paramref name="digest"/> (its first 12 hex digits).</summary>
    public static string FromDigest(byte[] digest) => Convert.ToHexStringLower(digest)[..12];
}
