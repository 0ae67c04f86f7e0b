namespace MergeLab.Engine;

/// <summary>What <see cref="CheckpointMerger"/> does with an input tensor that holds NaN or ±∞.</summary>
public enum NonFiniteInputs
{
    /// <summary>Stop before writing anything, with a <see cref="NonFiniteInputException"/> naming the
    /// tensor and the file (the default). A NaN in one expert would otherwise spread silently: every
    /// method's arithmetic, and the top-k selections, propagate it into the merged model.</summary>
    Fail = 0,

    /// <summary>Merge such tensors as they are; the merged tensor then holds whatever the method's
    /// arithmetic gives (usually NaN or ±∞ where an input has them). The inputs are not checked.</summary>
    Pass = 1,
}

/// <summary>An input tensor holds NaN or ±∞ and the merge was asked to fail on it
/// (<see cref="NonFiniteInputs.Fail"/>, the default). Raised before the output is written.</summary>
public sealed class NonFiniteInputException : MergeException
{
    /// <summary>Creates the exception for tensor <paramref name="tensorName"/> of the file <paramref name="filePath"/>.</summary>
    /// <param name="tensorName">The tensor.</param>
    /// <param name="filePath">The safetensors file (shard) that holds it.</param>
    /// <param name="nanCount">How many of its entries are NaN.</param>
    /// <param name="infinityCount">How many are +∞ or −∞.</param>
    public NonFiniteInputException(string tensorName, string filePath, long nanCount, long infinityCount)
        : base(tensorName,
            $"'{filePath}' holds {nanCount} NaN and {infinityCount} infinite value(s) in this tensor. MergeLab refuses non-finite inputs " +
            "by default, since they spread into the merged model; set CheckpointMergeRequest.NonFinite = NonFiniteInputs.Pass " +
            "(mergelab merge --nonfinite pass) to merge them anyway.")
    {
        FilePath = filePath;
        NaNCount = nanCount;
        InfinityCount = infinityCount;
    }

    /// <summary>Creates an exception with a message.</summary>
    public NonFiniteInputException(string message) : base(message)
    {
    }

    /// <summary>Creates an exception with a message and inner exception.</summary>
    public NonFiniteInputException(string message, Exception innerException) : base(message, innerException)
    {
    }

    /// <summary>Creates an exception with no message.</summary>
    public NonFiniteInputException()
    {
    }

    /// <summary>The safetensors file (shard) that holds the tensor, when known.</summary>
    public string? FilePath { get; }

    /// <summary>How many entries of the tensor are NaN.</summary>
    public long NaNCount { get; }

    /// <summary>How many entries of the tensor are +∞ or −∞.</summary>
    public long InfinityCount { get; }
}
