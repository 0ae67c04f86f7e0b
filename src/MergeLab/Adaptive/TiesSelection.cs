using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using static TorchSharp.torch;

namespace MergeLab.Adaptive;

/// <summary>
/// The task vectors AdaMerging++ learns coefficients for: TIES-Merging's trim and sign election applied
/// to each τ_t, each task keeping only its entries that survive the trim and agree with the elected
/// sign (the AdaMerging authors' <c>ties_merging_split</c> / <c>disjoint_merge_split</c> in
/// <c>src/ties_merging_utils.py</c>, K = 20). Their sum is TIES's <c>dis-sum</c> merged task vector.
/// </summary>
public static class TiesSelection
{
    /// <summary>
    /// Trims each task vector to its top <paramref name="density"/> magnitudes over the whole model
    /// (the TIES paper's rule, <see cref="TiesPreset.Paper"/>), elects a sign per entry from the sum of
    /// the trimmed vectors (a zero sum takes the model-wide majority sign), and zeroes each task's
    /// entries that disagree with it.
    /// </summary>
    /// <param name="taskVectors">τ_t per task, all with the same names and shapes; not modified.</param>
    /// <param name="density">Fraction of each task vector kept by the trim, in [0, 1]. Default 0.2
    /// (the reference's K = 20).</param>
    /// <returns>New task vectors, one per task, in the same order and dtypes, holding each kept entry's own
    /// value and 0 elsewhere (the trim and the election compute in float32); the caller owns them.</returns>
    /// <exception cref="MergeException">The task vectors disagree in names or shapes.</exception>
    /// <exception cref="ArgumentException">The list is empty or holds null.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="density"/> is outside [0, 1].</exception>
    public static IReadOnlyList<TaskVector> Select(IReadOnlyList<TaskVector> taskVectors, double density = 0.2)
    {
        ArgumentNullException.ThrowIfNull(taskVectors);
        MergeLab.Options.RequireInRange(density, nameof(density), 0, 1);
        var deltas = StateDictChecks.CheckTaskVectors(taskVectors, nameof(taskVectors));
        var names = deltas[0].Names;
        var ties = new TiesMerge(new TiesOptions { Density = density, Aggregation = Aggregation.Sum });
        var pipeline = ties.Pipeline;
        var consensus = pipeline.Consensus!;
        var statistic = ties.CreateStatistic(taskVectors.Count) as PipelineStatistic;
        while (statistic is { IsComplete: false })
        {
            foreach (var name in names)
            {
                using var zero = zeros_like(deltas[0][name]);
                statistic.Observe(new TensorGroup(name, zero, deltas.Select(d => d[name]).ToArray()));
            }

            statistic.EndPass();
        }

        var selected = taskVectors.Select(_ => new StateDict()).ToArray();
        try
        {
            foreach (var name in names)
            {
                using var scope = NewDisposeScope();
                var zero = zeros_like(deltas[0][name]);
                var group = new TensorGroup(name, zero, deltas.Select(d => d[name]).ToArray());
                var trimmed = pipeline.SparseTaskVectors(group, statistic);
                var sign = consensus.ResolveZeros(consensus.RawSign(trimmed), statistic?.MajoritySign);
                var disagree = SignConsensus.Agreement(trimmed, sign).logical_not_(); // a fresh mask: negated in place
                for (int t = 0; t < selected.Length; t++)
                {
                    // The kept entries are τ's own values, in τ's dtype (the selection itself works in float32).
                    var original = deltas[t][name];
                    selected[t].Add(name, original.masked_fill(disagree[t], ScalarArgs.Zero).MoveToOuterDisposeScope());
                }
            }
        }
        catch
        {
            foreach (var s in selected)
            {
                s.Dispose();
            }

            throw;
        }

        return selected.Select(TaskVector.FromDeltas).ToArray();
    }
}
