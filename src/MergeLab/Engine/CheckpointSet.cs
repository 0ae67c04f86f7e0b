using System.Runtime.ExceptionServices;
using MergeLab.Config;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Selection;
using static TorchSharp.torch;

namespace MergeLab.Engine;

/// <summary>The opened inputs of a merge, checked for compatibility from their headers alone.</summary>
internal sealed class CheckpointSet
{
    /// <summary>Each name's input bytes per pass, its reference dtype, and whether that is floating-point
    /// (merged) or not (copied).</summary>
    private readonly Dictionary<string, (long Bytes, ScalarType DType, bool Floating)> _tensors = new(StringComparer.Ordinal);

    /// <summary>Every input in read order: the base (when the method uses it), then the experts.</summary>
    private readonly SafetensorsCheckpoint[] _inputs;

    /// <summary>The base model given to a method that merges without one (weight averaging), or null: read only
    /// for the tensors the merge copies from it.</summary>
    private readonly SafetensorsCheckpoint? _unmergedBase;

    /// <summary>That base, then <see cref="_inputs"/>: what a copied tensor is read from; null without it.</summary>
    private readonly SafetensorsCheckpoint[]? _withUnmergedBase;

    public CheckpointSet(SafetensorsCheckpoint? baseModel, IReadOnlyList<SafetensorsCheckpoint> experts, bool requiresBase)
    {
        if (experts.Count == 0)
        {
            throw new MergeException("The expert list is empty; a merge needs at least one expert model.");
        }

        if (requiresBase && baseModel is null)
        {
            throw new MergeException("This method needs a base (pretrained) model, and none was given.");
        }

        Base = requiresBase ? baseModel : null;
        Experts = experts;
        Reference = baseModel ?? experts[0];
        Names = Reference.TensorNames;
        _inputs = (Base is null ? experts : experts.Prepend(Base)).ToArray();

        // A base the method does not merge with still gives the output its names, order and dtypes, and its
        // tensors that are copied rather than merged (integer and boolean buffers), so it is checked too.
        _unmergedBase = Base is null ? baseModel : null;
        _withUnmergedBase = _unmergedBase is null ? null : [_unmergedBase, .. _inputs];
        var checkedInputs = _withUnmergedBase ?? _inputs;
        foreach (var name in Names)
        {
            var reference = Reference.GetInfo(name);
            bool floating = DTypeNames.IsFloating(reference.DType);
            long bytes = 0;
            foreach (var c in checkedInputs)
            {
                if (!c.TryGetInfo(name, out var info))
                {
                    throw new MergeException(name, $"'{c.Path}' has no tensor of this name, which '{Reference.Path}' has.");
                }

                if (!info.Shape.SequenceEqual(reference.Shape))
                {
                    throw new MergeException(name,
                        $"'{c.Path}' has shape [{string.Join(", ", info.Shape)}] but '{Reference.Path}' has [{string.Join(", ", reference.Shape)}].");
                }

                if (DTypeNames.IsFloating(info.DType) != floating)
                {
                    throw new MergeException(name,
                        $"'{c.Path}' has it as {info.DTypeName} but '{Reference.Path}' as {reference.DTypeName}; {DTypeNames.KindMismatchReason}");
                }

                bytes += c != _unmergedBase || !floating ? info.ByteLength : 0; // an unmerged base is read for copied tensors only
            }

            _tensors[name] = (bytes, reference.DType, floating);
            BytesPerPass += bytes;
        }

        foreach (var c in checkedInputs)
        {
            if (c.Count != Names.Count)
            {
                var extra = c.TensorNames.First(n => !_tensors.ContainsKey(n));
                throw new MergeException(extra, $"'{c.Path}' has this tensor but '{Reference.Path}' does not; the architectures differ.");
            }
        }
    }

    public SafetensorsCheckpoint? Base { get; }

    public IReadOnlyList<SafetensorsCheckpoint> Experts { get; }

    /// <summary>The checkpoint whose names, order and dtypes the output follows: the base model when one is
    /// given (whether or not the method merges with it), else the first expert.</summary>
    public SafetensorsCheckpoint Reference { get; }

    public IReadOnlyList<string> Names { get; }

    public long BytesPerPass { get; }

    /// <summary>Whether <see cref="Load"/> maps CPU tensors from their files instead of copying them
    /// (<see cref="CheckpointMergeRequest.MapInputs"/>). Default false.</summary>
    public bool MapInputs { get; init; }

    public long Bytes(string name) => _tensors[name].Bytes;

    /// <summary>The default of <see cref="SmallGroupBytes"/>: 256 KiB.</summary>
    public const long DefaultSmallGroupBytes = 256 * 1024;

    /// <summary>
    /// Groups of fewer input bytes than this (all inputs together; norms and biases) are read on the
    /// calling thread and copied, not mapped. Mapping a tensor and unmapping it (which interrupts every CPU
    /// to flush its TLB) and handing the inputs to worker threads cost more than copying a few pages: a
    /// whole-model PCB merge of 3,000 tensors of 1 KiB spent a fifth of its time unmapping.
    /// </summary>
    public long SmallGroupBytes { get; init; } = DefaultSmallGroupBytes;

    /// <summary>What the merge writes for <paramref name="name"/>: floating-point tensors in the requested
    /// dtype (default the reference's), other tensors as the reference has them (they are copied).</summary>
    public PlannedTensor OutputLayout(string name, ScalarType? outputType)
    {
        var info = Reference.GetInfo(name);
        return new PlannedTensor(name, MergeType(name, outputType) ?? info.DType, info.Shape);
    }

    /// <summary>The dtype <paramref name="name"/> is merged into: <paramref name="outputType"/>, else the
    /// reference's (which the method would not know when it merges without the base); null for a tensor
    /// that is copied.</summary>
    public ScalarType? MergeType(string name, ScalarType? outputType)
    {
        var (_, type, floating) = _tensors[name];
        return floating ? outputType ?? type : null;
    }

    /// <summary>Reads one name's tensors from every input onto <paramref name="device"/>; with
    /// <paramref name="checkFinite"/>, float32 and bfloat16 values are checked for NaN and ±∞ as they are
    /// read (<see cref="LoadedGroup.FoundFinite"/>). With <see cref="MapInputs"/>, CPU tensors are mapped from
    /// their files instead of copied (<see cref="MappedTensors"/>); the check then reads the mapping. A group
    /// under <see cref="SmallGroupBytes"/> is copied, one input after another, on the calling thread.</summary>
    /// <remarks>Larger groups' inputs are read in parallel, up to torch's thread count at a time: one thread copying
    /// file pages into memory is the slowest stage of a merge on a small machine (about 3.3 GB/s inside a
    /// 4 × 1.1B merge on 2 cores); mapped, the page faults and the check are spread the same way. If
    /// reads fail, the error of the first failing input (base, then the experts in order) is thrown, as a
    /// sequential read would, and nothing read is kept.</remarks>
    public LoadedGroup Load(string name, Device device, bool checkFinite = false)
    {
        // A tensor copied rather than merged comes from the base, even where the method merges without it.
        var (bytes, _, floating) = _tensors[name];
        var inputs = _withUnmergedBase is not null && !floating ? _withUnmergedBase : _inputs;
        bool withBase = Base is not null || inputs == _withUnmergedBase;
        var tensors = new Tensor?[inputs.Length];
        var finite = new bool?[inputs.Length];
        var errors = new Exception?[inputs.Length];
        bool small = bytes < SmallGroupBytes;
        void ReadInput(int i)
        {
            try
            {
                tensors[i] = inputs[i].ReadTensor(name, device, checkFinite, out finite[i], MapInputs && !small);
            }
            catch (Exception e)
            {
                errors[i] = e;
            }
        }

        if (small)
        {
            for (int i = 0; i < inputs.Length; i++)
            {
                ReadInput(i);
            }
        }
        else
        {
            Parallel.For(0, inputs.Length, new ParallelOptions { MaxDegreeOfParallelism = CpuParallel.Threads }, ReadInput);
        }

        if (Array.Find(errors, e => e is not null) is { } error)
        {
            foreach (var t in tensors)
            {
                t?.Dispose();
            }

            ExceptionDispatchInfo.Throw(error);
        }

        var read = tensors.Select(t => t!).ToList();
        var bse = withBase ? read[0] : null;
        var experts = read.Skip(withBase ? 1 : 0).ToArray();
        return new LoadedGroup(new TensorGroup(name, bse, experts), read, finite);
    }
}

/// <summary>Finds NaN and ±∞ in the tensors of a loaded group.</summary>
internal static class FiniteCheck
{
    /// <summary>Throws a <see cref="NonFiniteInputException"/> for the first tensor of
    /// <paramref name="loaded"/> (base first, then the experts in order) that holds NaN or ±∞.</summary>
    public static void Require(CheckpointSet model, LoadedGroup loaded) =>
        Require(model, loaded.Group, (index, _) => loaded.FoundFinite(index));

    /// <summary>As <see cref="Require(CheckpointSet, LoadedGroup)"/> for a group whose inputs were not
    /// checked as they were read, skipping those that <paramref name="witness"/> saw vouched for.</summary>
    public static void Require(CheckpointSet model, TensorGroup group, FiniteWitness? witness) =>
        Require(model, group, (_, tensor) => witness?.Covers(tensor) == true ? true : null);

    private static void Require(CheckpointSet model, TensorGroup group, Func<int, Tensor, bool?> known)
    {
        int first = 0; // the experts' index among the group's inputs
        if (group.Base is not null)
        {
            Require(group.Base, group.Name, model.Reference, known(0, group.Base)); // the base: merged, or its copied tensor
            first = 1;
        }

        for (int k = 0; k < group.Experts.Count; k++)
        {
            Require(group.Experts[k], group.Name, model.Experts[k], known(first + k, group.Experts[k]));
        }
    }

    private static void Require(Tensor tensor, string name, SafetensorsCheckpoint source, bool? knownFinite)
    {
        // Found finite as it was read: nothing to check. Found otherwise: counted below for the message.
        if (knownFinite == true || !tensor.is_floating_point() || (knownFinite is null && FiniteValues.IsAllFinite(tensor)))
        {
            return;
        }

        using var scope = NewDisposeScope();
        long nan = tensor.isnan().sum().item<long>();
        long inf = tensor.isinf().sum().item<long>();
        throw new NonFiniteInputException(name, source.GetShard(name).Path, nan, inf);
    }
}

/// <summary>A tensor group read from disk; disposing it releases its tensors.</summary>
internal sealed class LoadedGroup(TensorGroup group, List<Tensor> tensors, IReadOnlyList<bool?>? finite = null) : IDisposable
{
    public TensorGroup Group { get; } = group;

    /// <summary>Whether all values of tensor <paramref name="index"/> (the base first, then the experts)
    /// were found finite as it was read; null where it was not checked then.</summary>
    public bool? FoundFinite(int index) => finite is not null && index < finite.Count ? finite[index] : null;

    public void Dispose()
    {
        foreach (var t in tensors)
        {
            t.Dispose();
        }
    }
}
