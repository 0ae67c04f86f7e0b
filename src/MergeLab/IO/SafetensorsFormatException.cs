namespace MergeLab.IO;

/// <summary>
/// A safetensors file or checkpoint folder is malformed: the message starts with the file's path and
/// says what is wrong, e.g. <c>"/m/model.safetensors: header size 9000000000000000000 is beyond the
/// file size 1234"</c>.
/// </summary>
/// <remarks>
/// Every problem found in a file's bytes (size prefix, JSON header, offsets, an index that does not
/// match its shards) is reported with this type, never with a JSON, argument or overflow exception, so
/// callers can catch one type for "this checkpoint cannot be read".
/// </remarks>
public class SafetensorsFormatException : Exception
{
    /// <summary>Creates an exception about the file at <paramref name="path"/>.</summary>
    /// <param name="path">The file (or checkpoint folder) that is malformed.</param>
    /// <param name="problem">What is wrong, without the path.</param>
    /// <param name="innerException">The parser error behind the problem, when there is one.</param>
    public SafetensorsFormatException(string path, string problem, Exception? innerException = null)
        : base($"{path}: {problem}", innerException)
    {
        Path = path;
        Problem = problem;
    }

    /// <summary>Creates an exception with a message and no path.</summary>
    public SafetensorsFormatException(string message) : base(message)
    {
        Problem = message;
    }

    /// <summary>Creates an exception with a message, an inner exception and no path.</summary>
    public SafetensorsFormatException(string message, Exception innerException) : base(message, innerException)
    {
        Problem = message;
    }

    /// <summary>Creates an exception with no message.</summary>
    public SafetensorsFormatException()
    {
        Problem = Message;
    }

    /// <summary>The malformed file or folder, when known.</summary>
    public string? Path { get; }

    /// <summary>What is wrong, without the path.</summary>
    public string Problem { get; }

    /// <summary>The tensor being read when the problem was found (e.g. a file truncated after it was
    /// opened), when there is one; the message names it too.</summary>
    public string? TensorName { get; init; }
}
