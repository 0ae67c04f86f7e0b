using System.Buffers.Binary;
using System.IO.Compression;
using System.Security.Cryptography;

namespace MergeLab.MultiTask;

/// <summary>Fashion-MNIST's IDX files are not where they were looked for.</summary>
public sealed class FashionMnistNotFoundException : Exception
{
    /// <summary>Creates the exception with the standard explanation.</summary>
    public FashionMnistNotFoundException()
        : base(Explain(FashionMnist.DefaultDirectory, FashionMnist.TrainImages))
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public FashionMnistNotFoundException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception with a message and the cause.</summary>
    public FashionMnistNotFoundException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    internal static string Explain(string directory, string missing) =>
        $"Fashion-MNIST was not found: '{missing}' (or '{missing}.gz') is missing in '{directory}'. " +
        "Install Debian's package (apt-get install dataset-fashion-mnist, which puts the IDX files in " +
        $"{FashionMnist.DefaultDirectory}), or point --data or the {FashionMnist.EnvironmentVariable} environment " +
        "variable at a directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte " +
        "and t10k-labels-idx1-ubyte (gzipped or not). Nothing is downloaded.";
}

/// <summary>
/// Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test 28×28 grey-scale images of 10
/// clothing classes, read from the IDX files of Debian's <c>dataset-fashion-mnist</c> package.
/// </summary>
public sealed class FashionMnist
{
    /// <summary>Where Debian's <c>dataset-fashion-mnist</c> installs the files.</summary>
    public const string DefaultDirectory = "/usr/share/datasets/fashion-mnist";

    /// <summary>The environment variable that overrides <see cref="DefaultDirectory"/>.</summary>
    public const string EnvironmentVariable = "MERGELAB_FASHION_MNIST";

    /// <summary>Image side length in pixels.</summary>
    public const int Side = 28;

    /// <summary>Pixels per image.</summary>
    public const int Pixels = Side * Side;

    /// <summary>The class names, in label order.</summary>
    public static readonly IReadOnlyList<string> ClassNames =
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

    internal const string TrainImages = "train-images-idx3-ubyte";
    internal const string TrainLabels = "train-labels-idx1-ubyte";
    internal const string TestImages = "t10k-images-idx3-ubyte";
    internal const string TestLabels = "t10k-labels-idx1-ubyte";

    private FashionMnist(byte[] trainImages, byte[] trainLabels, byte[] testImages, byte[] testLabels, string directory)
    {
        TrainImagesBytes = trainImages;
        TrainLabelsBytes = trainLabels;
        TestImagesBytes = testImages;
        TestLabelsBytes = testLabels;
        Directory = directory;
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        Span<byte> length = stackalloc byte[8];
        foreach (var part in new[] { trainImages, trainLabels, testImages, testLabels })
        {
            BinaryPrimitives.WriteInt64LittleEndian(length, part.Length);
            hash.AppendData(length);
            hash.AppendData(part);
        }

        Fingerprint = CacheKeys.FromDigest(hash.GetHashAndReset());
    }

    /// <summary>The directory the files were read from.</summary>
    public string Directory { get; }

    /// <summary>A short hash of the images and labels (not of where they were read from), so trained
    /// checkpoints are reused only for the same data.</summary>
    public string Fingerprint { get; }

    /// <summary>Training images, row-major, <see cref="Pixels"/> bytes each (0 = background).</summary>
    public byte[] TrainImagesBytes { get; }

    /// <summary>Training labels, 0–9.</summary>
    public byte[] TrainLabelsBytes { get; }

    /// <summary>Test images, row-major.</summary>
    public byte[] TestImagesBytes { get; }

    /// <summary>Test labels, 0–9.</summary>
    public byte[] TestLabelsBytes { get; }

    /// <summary>The number of training images.</summary>
    public int TrainCount => TrainLabelsBytes.Length;

    /// <summary>The number of test images.</summary>
    public int TestCount => TestLabelsBytes.Length;

    /// <summary>The directory to read: <paramref name="directory"/> when given, else the
    /// <see cref="EnvironmentVariable"/>, else <see cref="DefaultDirectory"/>.</summary>
    public static string ResolveDirectory(string? directory = null)
    {
        if (!string.IsNullOrEmpty(directory))
        {
            return directory;
        }

        var fromEnvironment = Environment.GetEnvironmentVariable(EnvironmentVariable);
        return string.IsNullOrEmpty(fromEnvironment) ? DefaultDirectory : fromEnvironment;
    }

    /// <summary>Whether all four files are present in the resolved directory.</summary>
    public static bool IsAvailable(string? directory = null)
    {
        var dir = ResolveDirectory(directory);
        return new[] { TrainImages, TrainLabels, TestImages, TestLabels }.All(f => Find(dir, f) is not null);
    }

    /// <summary>Reads the four IDX files (each plain or gzipped) from the resolved directory.</summary>
    /// <exception cref="FashionMnistNotFoundException">A file is missing; the message says how to install it.</exception>
    /// <exception cref="InvalidDataException">A file is not a valid IDX file of the expected shape, is cut
    /// short or not valid gzip, or holds a label outside 0–9 (the message names the file); or the images and
    /// labels of a split differ in number (the message names the folder).</exception>
    public static FashionMnist Load(string? directory = null)
    {
        var dir = ResolveDirectory(directory);
        var trainImages = ReadIdx(dir, TrainImages, 0x0803, [Side, Side]);
        var trainLabels = ReadIdx(dir, TrainLabels, 0x0801, []);
        var testImages = ReadIdx(dir, TestImages, 0x0803, [Side, Side]);
        var testLabels = ReadIdx(dir, TestLabels, 0x0801, []);
        if (trainImages.Length != trainLabels.Length * Pixels || testImages.Length != testLabels.Length * Pixels)
        {
            throw new InvalidDataException($"The image and label counts of Fashion-MNIST in '{dir}' disagree.");
        }

        foreach (var (labels, name) in new[] { (trainLabels, TrainLabels), (testLabels, TestLabels) })
        {
            int bad = Array.FindIndex(labels, l => l >= ClassNames.Count);
            if (bad >= 0)
            {
                throw new InvalidDataException($"'{Find(dir, name)}' has label {labels[bad]} at item {bad}; Fashion-MNIST's labels are 0–{ClassNames.Count - 1}.");
            }
        }

        return new FashionMnist(trainImages, trainLabels, testImages, testLabels, dir);
    }

    private static string? Find(string directory, string name)
    {
        foreach (var candidate in new[] { name, name + ".gz" })
        {
            var path = Path.Combine(directory, candidate);
            if (File.Exists(path))
            {
                return path;
            }
        }

        return null;
    }

    /// <summary>Reads an IDX file: magic (0x00 0x00 type rank), big-endian dimensions, then the bytes.</summary>
    internal static byte[] ReadIdx(string directory, string name, int magic, int[] itemShape)
    {
        var path = Find(directory, name) ?? throw new FashionMnistNotFoundException(FashionMnistNotFoundException.Explain(directory, name));
        string? problem;
        byte[]? data;
        try
        {
            using var file = File.OpenRead(path);
            using Stream stream = path.EndsWith(".gz", StringComparison.Ordinal) ? new GZipStream(file, CompressionMode.Decompress) : file;
            data = ReadIdx(stream, magic, itemShape, out problem);
        }
        catch (EndOfStreamException)
        {
            throw new InvalidDataException($"'{path}' is cut short: it ends before the items its header declares.");
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"'{path}' is not valid: {e.Message}", e); // e.g. corrupt gzip
        }

        return data ?? throw new InvalidDataException($"'{path}' {problem}");
    }

    /// <summary>The items of the IDX file <paramref name="stream"/> holds, or null with what is wrong with its
    /// header in <paramref name="problem"/> (a phrase that follows the file's path).</summary>
    private static byte[]? ReadIdx(Stream stream, int magic, int[] itemShape, out string? problem)
    {
        Span<byte> word = stackalloc byte[4];
        stream.ReadExactly(word);
        int actualMagic = BinaryPrimitives.ReadInt32BigEndian(word);
        if (actualMagic != magic)
        {
            problem = $"is not an IDX file of the expected kind (magic 0x{actualMagic:x8}, expected 0x{magic:x8}).";
            return null;
        }

        stream.ReadExactly(word);
        int count = BinaryPrimitives.ReadInt32BigEndian(word);
        long itemSize = 1;
        foreach (int expected in itemShape)
        {
            stream.ReadExactly(word);
            int dim = BinaryPrimitives.ReadInt32BigEndian(word);
            if (dim != expected)
            {
                problem = $"has items of side {dim}, expected {expected}.";
                return null;
            }

            itemSize *= dim;
        }

        if (count <= 0 || count * itemSize > int.MaxValue)
        {
            problem = $"declares {count} items.";
            return null;
        }

        var data = new byte[count * itemSize];
        stream.ReadExactly(data);
        problem = null;
        return data;
    }
}
