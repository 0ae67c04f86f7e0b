using System.Numerics;
using MergeLab.IO;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// What "loads correctly" means for a safetensors file the reader accepted, checked against the
/// file's bytes rather than the reader's own arithmetic: the header is within the limit, the tensors
/// tile the data buffer exactly, each size is shape × element size, and every tensor reads back as
/// exactly its bytes in the file. So no tensor the reader allocates is larger than the file.
/// </summary>
internal static class SafetensorsOracle
{
    public static void CheckFile(SafetensorsFile file, byte[] bytes, SafetensorsReadOptions options, AllocationMeter meter)
    {
        Assert.That(file.FileLength, Is.EqualTo(bytes.Length), "file length");
        Assert.That(file.HeaderLength, Is.LessThanOrEqualTo(options.MaxHeaderBytes), "header within the limit");
        Assert.That(file.DataStart, Is.EqualTo(8 + (long)BitConverter.ToUInt64(bytes, 0)), "data start from the size prefix");
        Assert.That(file.TensorNames, Is.Unique, "tensor names");
        Assert.That(file.TensorNames, Has.None.EqualTo("__metadata__"));

        long covered = file.DataStart;
        foreach (var info in file.Tensors.OrderBy(t => t.DataOffset).ThenBy(t => t.ByteLength))
        {
            Assert.That(info.DataOffset, Is.EqualTo(covered), $"tensor '{info.Name}' starts where the previous one ends");
            BigInteger elements = info.Shape.Aggregate(BigInteger.One, (a, d) => a * d);
            Assert.That(info.Shape, Has.All.GreaterThanOrEqualTo(0), $"dimensions of '{info.Name}'");
            Assert.That(elements * SafetensorsDType.ElementSize(info.DType), Is.EqualTo(new BigInteger(info.ByteLength)), $"size of '{info.Name}'");
            covered += info.ByteLength;
        }

        Assert.That(covered, Is.EqualTo(bytes.Length), "the tensors cover the data buffer exactly");
        foreach (var info in file.Tensors)
        {
            using var t = meter.Measure(() => file.ReadTensor(info.Name));
            CheckTensor(t, info, bytes);
        }
    }

    public static void CheckTensor(TorchSharp.torch.Tensor t, SafetensorsTensorInfo info, byte[] fileBytes)
    {
        Assert.That(t.dtype, Is.EqualTo(info.DType), $"dtype of '{info.Name}'");
        Assert.That(t.shape, Is.EqualTo(info.Shape), $"shape of '{info.Name}'");
        Assert.That(T.RawBytes(t), Is.EqualTo(fileBytes.AsSpan((int)info.DataOffset, (int)info.ByteLength).ToArray()),
            $"bytes of '{info.Name}'");
    }
}
