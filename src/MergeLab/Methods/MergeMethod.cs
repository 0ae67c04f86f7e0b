using MergeLab.Config;
using MergeLab.Tensors;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// A model-merging method. Every method works per tensor (<see cref="MergeTensor"/>), so a streaming
/// engine can merge a checkpoint one parameter name at a time, and on whole state dicts
/// (<see cref="Merge"/>).
/// </summary>
/// <remarks>
/// <para>Arithmetic is done in float32 whatever the input dtype; the result is cast to the requested
/// output dtype (by default the dtype of the base tensor, or of the first expert for base-free
/// methods) and stays on the inputs' device. Integer and boolean tensors (buffers such as position
/// ids) are not merged: the base's tensor (or the first expert's) is copied.</para>
/// <para>Methods whose scope is the whole model (such as the TIES paper's global top-k) return a
/// <see cref="ModelStatistic"/> from <see cref="CreateStatistic"/>; the caller runs its passes over
/// all tensor groups before merging any tensor and passes it to <see cref="MergeTensor"/>.</para>
/// <para>Method objects are immutable and thread-safe: one instance may merge many tensors at once.</para>
/// </remarks>
public abstract class MergeMethod
{
    /// <summary>The method's name as used in configs and the README (e.g. <c>ties</c>).</summary>
    public abstract string Name { get; }

    /// <summary>Whether the method needs the base (pretrained) model. Default: true.</summary>
    public virtual bool RequiresBase => true;

    /// <summary>Creates the whole-model statistic this method needs before merging, or returns
    /// <see langword="null"/> when every tensor can be merged on its own.</summary>
    /// <param name="expertCount">The number of experts that will be merged.</param>
    public virtual ModelStatistic? CreateStatistic(int expertCount) => null;

    /// <summary>Merges one parameter's tensors.</summary>
    /// <param name="group">The base tensor (if any) and one tensor per expert, all of one shape.</param>
    /// <param name="statistic">The completed whole-model statistic, for methods that declare one.</param>
    /// <param name="outputType">The result's dtype; default the base's (or first expert's) dtype.</param>
    /// <returns>A new tensor the caller owns, on the inputs' device.</returns>
    /// <exception cref="MergeException">The group is inconsistent, or the method needs a whole-model
    /// statistic that was not given, or the statistic was created for another number of experts.</exception>
    /// <exception cref="ArgumentException"><paramref name="outputType"/> is not a floating-point dtype, or a
    /// per-expert option (<c>Weights</c>, <c>Densities</c>, <c>DropRates</c>, Breadcrumbs' <c>PerExpert</c>) has
    /// another length than the group's experts.</exception>
    public Tensor MergeTensor(TensorGroup group, ModelStatistic? statistic = null, ScalarType? outputType = null)
    {
        ArgumentNullException.ThrowIfNull(group);
        DTypeNames.RequireFloating(outputType, nameof(outputType));
        group.Validate(RequiresBase);
        var reference = group.Reference;
        if (!reference.is_floating_point())
        {
            return reference.clone();
        }

        if (statistic is { IsComplete: false })
        {
            throw new MergeException(group.Name, $"the whole-model statistic of '{Name}' has not completed its passes.");
        }

        statistic?.CheckExperts(group);
        var type = outputType ?? reference.dtype;
        if (reference.numel() == 0)
        {
            return empty_like(reference, dtype: type); // nothing to merge (selection ops reject empty inputs)
        }

        using var scope = NewDisposeScope();
        var direct = MergeDirect(group, statistic, type);
        if (direct is not null)
        {
            return direct.MoveToOuterDisposeScope();
        }

        var merged = MergeFloat32(group, statistic);
        return merged.to(type).MoveToOuterDisposeScope();
    }

    /// <summary>Whether this method's CPU kernels may read every input value of a tensor and vouch that all
    /// are finite (<see cref="Selection.FiniteWitness"/>), so the checkpoint engine checks inputs for NaN and
    /// ±∞ after the merge, and only those nobody vouched for, instead of reading every input once more
    /// before it. Default false.</summary>
    internal virtual bool MayVouchForFiniteInputs => false;

    /// <summary>Merges straight into <paramref name="outputType"/> with a fused CPU kernel, or returns
    /// null to take <see cref="MergeFloat32"/>. The result must equal that path's, cast.</summary>
    private protected virtual Tensor? MergeDirect(TensorGroup group, ModelStatistic? statistic, ScalarType outputType) => null;

    /// <summary>Computes the merged tensor in float32 on the inputs' device. Temporaries may be left
    /// to the caller's dispose scope.</summary>
    protected abstract Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic);

    /// <summary>
    /// Merges whole state dicts in memory: checks that every expert has the same tensor names and
    /// shapes as the base, runs the whole-model statistic passes if the method has any, then merges
    /// tensor by tensor in the base's name order. Inputs are not checked for NaN or ±∞, which the
    /// arithmetic and the top-k selections propagate into the result; the checkpoint engine checks
    /// them (<see cref="Engine.NonFiniteInputs"/>); here, check with <c>torch.isfinite(t).all()</c>
    /// first if the inputs may hold them.
    /// </summary>
    /// <param name="baseModel">The pretrained model; may be null only for base-free methods.</param>
    /// <param name="experts">The fine-tuned models, at least one.</param>
    /// <param name="outputType">The dtype of every floating-point result; default each base tensor's.</param>
    /// <param name="progress">Receives the number of tensors merged so far and the total.</param>
    /// <param name="cancellationToken">Checked between tensors.</param>
    /// <returns>A new state dict the caller owns.</returns>
    /// <exception cref="MergeException">Missing names, shape mismatches, a tensor floating-point in one model
    /// and not in another, or no experts; the message names the tensor and the expert.</exception>
    /// <exception cref="ArgumentException"><paramref name="outputType"/> is not a floating-point dtype, or a
    /// per-expert option (<c>Weights</c>, <c>Densities</c>, <c>DropRates</c>, Breadcrumbs' <c>PerExpert</c>) has
    /// another length than <paramref name="experts"/>.</exception>
    /// <exception cref="ObjectDisposedException">The base or an expert has been disposed.</exception>
    public StateDict Merge(StateDict? baseModel, IReadOnlyList<StateDict> experts, ScalarType? outputType = null,
        IProgress<MergeProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        DTypeNames.RequireFloating(outputType, nameof(outputType));
        var names = StateDictChecks.CheckCompatible(baseModel, experts, RequiresBase);
        var statistic = CreateStatistic(experts.Count);
        while (statistic is { IsComplete: false })
        {
            foreach (var name in names)
            {
                cancellationToken.ThrowIfCancellationRequested();
                statistic.Observe(Group(name));
            }

            statistic.EndPass();
        }

        var result = new StateDict();
        try
        {
            for (int i = 0; i < names.Count; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                result.Add(names[i], MergeTensor(Group(names[i]), statistic, outputType));
                progress?.Report(new MergeProgress(i + 1, names.Count));
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;

        // A base-free method still gets the base when there is one: it sets the result's dtype and gives the
        // integer tensors, as in the checkpoint engine.
        TensorGroup Group(string name) => new(name, baseModel?[name], experts.Select(e => e[name]).ToArray());
    }

    /// <inheritdoc />
    public override string ToString() => Name;
}

/// <summary>Progress of a merge: tensors done of the total.</summary>
/// <param name="TensorsDone">Tensors merged so far.</param>
/// <param name="TensorCount">Tensors in the model.</param>
public readonly record struct MergeProgress(int TensorsDone, int TensorCount);
