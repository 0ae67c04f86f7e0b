namespace MergeLab.IO;

/// <summary>Limits applied when opening a safetensors file (and a checkpoint's index). Immutable and thread-safe.</summary>
/// <remarks>Tensor sizes need no limit of their own: every tensor's byte range is checked against the
/// file's size before anything is allocated, so a tensor is never larger than its file.</remarks>
public sealed record SafetensorsReadOptions
{
    /// <summary>The reference implementation's limit on the JSON header: 100,000,000 bytes
    /// (<c>MAX_HEADER_SIZE</c> in huggingface/safetensors <c>safetensors/src/tensor.rs</c>).</summary>
    public const int DefaultMaxHeaderBytes = 100_000_000;

    /// <summary>The options used when none are given.</summary>
    public static SafetensorsReadOptions Default { get; } = new();

    /// <summary>
    /// The largest JSON header accepted, in bytes. Default 100,000,000 (as the reference reader); range
    /// [1, <see cref="int.MaxValue"/>]. A file that declares a larger header is refused before any of
    /// the header is read, so a corrupt size prefix cannot trigger a huge allocation.
    /// </summary>
    public int MaxHeaderBytes { get; init; } = DefaultMaxHeaderBytes;

    internal void Validate()
    {
        if (MaxHeaderBytes < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxHeaderBytes), MaxHeaderBytes,
                $"{nameof(MaxHeaderBytes)} must be at least 1, but was {MaxHeaderBytes}.");
        }
    }
}
