namespace MergeLab;

/// <summary>A merge could not be carried out: inconsistent inputs or an invalid option. The message
/// names the tensor (when there is one) and the problem.</summary>
public class MergeException : Exception
{
    /// <summary>Creates an exception about the tensor named <paramref name="tensorName"/>.</summary>
    public MergeException(string? tensorName, string problem)
        : base(tensorName is null ? problem : $"Tensor '{tensorName}': {problem}")
    {
        TensorName = tensorName;
    }

    /// <summary>Creates an exception about the tensor named <paramref name="tensorName"/>, caused by
    /// <paramref name="innerException"/>.</summary>
    public MergeException(string? tensorName, string problem, Exception innerException)
        : base(tensorName is null ? problem : $"Tensor '{tensorName}': {problem}", innerException)
    {
        TensorName = tensorName;
    }

    /// <summary>Creates an exception with a message.</summary>
    public MergeException(string message) : base(message)
    {
    }

    /// <summary>Creates an exception with a message and inner exception.</summary>
    public MergeException(string message, Exception innerException) : base(message, innerException)
    {
    }

    /// <summary>Creates an exception with no message.</summary>
    public MergeException()
    {
    }

    /// <summary>The tensor the problem concerns, when there is one.</summary>
    public string? TensorName { get; }
}
