namespace MergeLab.Methods;

/// <summary>
/// A statistic over the whole model that a method needs before it can merge any tensor, such as the
/// global top-k magnitude threshold of the TIES paper. It is computed by one or more passes over all
/// tensor groups, streaming: the driver (the in-memory <see cref="MergeMethod.Merge"/> or the
/// checkpoint engine) calls <see cref="Observe"/> for every group, then <see cref="EndPass"/>, and
/// repeats while <see cref="IsComplete"/> is false. Each pass holds only a bounded summary (a
/// histogram, counters), never the tensors themselves.
/// </summary>
/// <remarks>Not thread-safe: one statistic is fed by one merge, one tensor group at a time.</remarks>
public abstract class ModelStatistic
{
    /// <summary>True when no further pass is needed.</summary>
    public abstract bool IsComplete { get; }

    /// <summary>Number of passes completed so far.</summary>
    public int PassesDone { get; private set; }

    /// <summary>The number of experts the statistic was created for, when it depends on it (every group it
    /// observes or helps merge must have that many).</summary>
    internal virtual int? ExpertCount => null;

    /// <summary>Throws when <paramref name="group"/> has another number of experts than the statistic was
    /// created for.</summary>
    /// <exception cref="MergeException">The counts differ.</exception>
    internal void CheckExperts(TensorGroup group)
    {
        if (ExpertCount is int n && group.Experts.Count != n)
        {
            throw new MergeException(group.Name,
                $"the whole-model statistic was created for {n} expert(s), but this group has {group.Experts.Count}; create it with CreateStatistic({group.Experts.Count}).");
        }
    }

    /// <summary>Accumulates one tensor group into the current pass.</summary>
    public abstract void Observe(TensorGroup group);

    /// <summary>Finishes the current pass (all groups observed).</summary>
    public void EndPass()
    {
        CompletePass();
        PassesDone++;
    }

    /// <summary>Derives what the pass found; may start a further pass.</summary>
    protected abstract void CompletePass();
}
