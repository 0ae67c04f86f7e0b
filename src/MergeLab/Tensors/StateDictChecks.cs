using MergeLab.Config;
using static TorchSharp.torch;

namespace MergeLab.Tensors;

/// <summary>Compatibility checks between the state dicts of a merge, run before any work starts.</summary>
internal static class StateDictChecks
{
    /// <summary>
    /// Checks that every expert has exactly the reference's tensor names, with equal shapes, each
    /// floating-point where the reference's is and only there, and returns the names in the reference's order. The reference is the base when given, otherwise
    /// the first expert. <paramref name="label"/> names expert k in messages (default "expert k"), and
    /// <paramref name="baseLabel"/> the base.
    /// </summary>
    public static IReadOnlyList<string> CheckCompatible(StateDict? baseModel, IReadOnlyList<StateDict> experts, bool requiresBase,
        Func<int, string>? label = null, string baseLabel = "the base model")
    {
        label ??= k => $"expert {k}";
        ArgumentNullException.ThrowIfNull(experts);
        if (experts.Count == 0)
        {
            throw new MergeException("The expert list is empty; a merge needs at least one expert model.");
        }

        if (requiresBase && baseModel is null)
        {
            throw new MergeException("This method needs a base (pretrained) model, and none was given.");
        }

        var reference = baseModel ?? experts[0];
        string referenceLabel = baseModel is null ? label(0) : baseLabel;
        for (int k = 0; k < experts.Count; k++)
        {
            string self = label(k);
            var expert = experts[k] ?? throw new MergeException($"{char.ToUpperInvariant(self[0])}{self[1..]} is null.");
            if (FirstUncovered(reference, expert) is var (name, other, tensor))
            {
                throw other is null
                    ? new MergeException(name, $"{self} has no tensor of this name, which {referenceLabel} has.")
                    : new MergeException(name,
                        $"{self} has shape [{string.Join(", ", other.shape)}] but {referenceLabel} has [{string.Join(", ", tensor.shape)}].");
            }

            if (expert.Count != reference.Count)
            {
                var extra = expert.Names.First(n => !reference.ContainsKey(n));
                throw new MergeException(extra, $"{self} has this tensor but {referenceLabel} does not.");
            }

            // Before any merging, as the checkpoint engine checks the headers (TensorGroup.Validate's rule).
            if (reference.FirstOrDefault(p => p.Value.is_floating_point() != expert[p.Key].is_floating_point()) is { Key: { } mixed } pair)
            {
                throw new MergeException(mixed, $"{self} has it as {expert[mixed].dtype} but {referenceLabel} as {pair.Value.dtype}; {DTypeNames.KindMismatchReason}");
            }
        }

        return reference.Names;
    }

    /// <summary>Checks that the task vectors (none null) have the same names and shapes, naming each
    /// "task vector k" in messages, and returns their deltas (the first one's names give the order).</summary>
    /// <param name="taskVectors">The task vectors.</param>
    /// <param name="paramName">The argument's name, for a null entry's message.</param>
    public static StateDict[] CheckTaskVectors(IReadOnlyList<TaskVector> taskVectors, string paramName)
    {
        if (taskVectors.Count == 0)
        {
            throw new ArgumentException("There are no task vectors.", paramName);
        }

        var deltas = taskVectors.Select((v, k) => v?.Deltas ?? throw new ArgumentException($"Task vector {k} is null.", paramName)).ToArray();
        CheckCompatible(null, deltas, requiresBase: false, k => $"task vector {k}");
        return deltas;
    }

    /// <summary>Throws a <see cref="MergeException"/> naming the first tensor of <paramref name="deltas"/>
    /// that <paramref name="baseModel"/> lacks or holds with another shape.</summary>
    /// <param name="baseModel">The model the deltas are added to.</param>
    /// <param name="deltas">The deltas, by tensor name.</param>
    /// <param name="holder">What holds the deltas, for the message ("the task vector").</param>
    public static void CheckCovers(StateDict baseModel, StateDict deltas, string holder)
    {
        if (FirstUncovered(deltas, baseModel) is var (name, b, delta))
        {
            throw b is null
                ? new MergeException(name, $"it is in {holder} but not in the base model.")
                : new MergeException(name,
                    $"it has shape [{string.Join(", ", delta.shape)}] in {holder} but [{string.Join(", ", b.shape)}] in the base model.");
        }
    }

    /// <summary>The first tensor of <paramref name="required"/> (in its order) that <paramref name="other"/>
    /// lacks (Other null) or holds with another shape; null when every one is there alike.</summary>
    private static (string Name, Tensor? Other, Tensor Tensor)? FirstUncovered(StateDict required, StateDict other)
    {
        foreach (var (name, tensor) in required)
        {
            if (!other.TryGetValue(name, out var found) || !found.shape.SequenceEqual(tensor.shape))
            {
                return (name, found, tensor);
            }
        }

        return null;
    }
}
