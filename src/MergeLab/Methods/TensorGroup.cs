using MergeLab.Config;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// The tensors of one parameter name that a merge combines: the base model's tensor (when the method
/// uses one) and each expert's tensor, all of one shape. This is the unit of streaming: a merge
/// method sees one group at a time and never the whole model.
/// </summary>
/// <param name="Name">The parameter name, e.g. <c>model.layers.3.mlp.up_proj.weight</c>.</param>
/// <param name="Base">The pretrained tensor, or <see langword="null"/> for base-free methods.</param>
/// <param name="Experts">One tensor per expert, in the order of the merge's expert list.</param>
/// <remarks>Immutable; it does not own its tensors, so several threads may read one group while
/// the caller keeps the tensors alive.</remarks>
public sealed record TensorGroup(string Name, Tensor? Base, IReadOnlyList<Tensor> Experts)
{
    /// <summary>The number of experts.</summary>
    public int ExpertCount => Experts.Count;

    /// <summary>The first tensor of the group: the base when present, otherwise the first expert.</summary>
    public Tensor Reference => Base ?? Experts[0];

    /// <summary>Checks the group: at least one expert, no null tensor, all shapes equal, and either every tensor
    /// floating-point (of any precision) or none (integer, boolean or complex tensors are copied from the
    /// <see cref="Reference"/>, not merged).</summary>
    /// <exception cref="MergeException">The group is malformed; the message names the tensor.</exception>
    public void Validate(bool requiresBase)
    {
        if (Experts is null || Experts.Count == 0)
        {
            throw new MergeException(Name, "no expert tensors were given; a merge needs at least one expert.");
        }

        if (requiresBase && Base is null)
        {
            throw new MergeException(Name, "this method needs the base model's tensor, and none was given.");
        }

        var shape = Reference.shape;
        bool floating = Reference.is_floating_point();
        string reference = Base is null ? "expert 0" : "the base";
        for (int k = 0; k < Experts.Count; k++)
        {
            var e = Experts[k] ?? throw new MergeException(Name, $"expert {k} has no tensor.");
            if (!e.shape.SequenceEqual(shape))
            {
                throw new MergeException(Name,
                    $"expert {k} has shape [{string.Join(", ", e.shape)}] but {reference} has [{string.Join(", ", shape)}].");
            }

            if (e.is_floating_point() != floating)
            {
                throw new MergeException(Name, $"expert {k} is {e.dtype} but {reference} is {Reference.dtype}; {DTypeNames.KindMismatchReason}");
            }
        }
    }

    /// <summary>Expert <paramref name="k"/>'s task vector τ_k = θ_k − θ_base in float32 (a new tensor).</summary>
    public Tensor TaskVector(int k)
    {
        if (Base is null)
        {
            throw new MergeException(Name, "a task vector needs the base model's tensor.");
        }

        // `to` may alias its input when the dtype already matches, so subtract out of place.
        using var e = Experts[k].to(ScalarType.Float32);
        using var b = Base.to(ScalarType.Float32);
        return e - b;
    }

    /// <summary>All task vectors stacked on a new leading dimension: shape [N, ...] in float32.</summary>
    public Tensor StackedTaskVectors()
    {
        using var scope = NewDisposeScope();
        var list = new Tensor[Experts.Count];
        for (int k = 0; k < list.Length; k++)
        {
            list[k] = TaskVector(k);
        }

        return stack(list).MoveToOuterDisposeScope();
    }
}
