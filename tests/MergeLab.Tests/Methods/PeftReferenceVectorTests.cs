using MergeLab.Methods;
using MergeLab.Stages;
using NUnit.Framework;
using static MergeLab.Tests.ReferenceTaskVectors;

namespace MergeLab.Tests.Methods;

/// <summary>
/// The reference vector of the foundation issue (<see cref="ReferenceTaskVectors"/>), checked against PEFT's
/// own code: density .5 (so 3 of 6 entries kept per task).
/// </summary>
public class PeftReferenceVectorTests
{
    [Test]
    public void Ties_total_matches_peft()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = .5, Weights = Weights });
        using var merged = T.MergeDeltas(ties, Tau1, Tau2, Tau3);
        T.Near(merged, [.5, -1, -1.8, -4, 2.2, 0]);
    }

    [Test]
    public void Ties_frequency_matches_peft()
    {
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = .5, Weights = Weights, Election = SignElection.Count });
        using var merged = T.MergeDeltas(ties, Tau1, Tau2, Tau3);
        T.Near(merged, [.5, -1, -1.8, .5, 2.2, 0]);
    }

    [Test]
    public void Task_arithmetic_matches_peft()
    {
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Weights = Weights });
        using var merged = T.MergeDeltas(ta, Tau1, Tau2, Tau3);
        T.Near(merged, [1.5, -1, -1.45, -3.5, 3.65, -.035]);
    }

    [Test]
    public void Magnitude_prune_matches_peft()
    {
        // PEFT's magnitude_prune: exact top-k trim of each τ, then the weighted sum.
        var prune = new PipelineMerge("magnitude_prune", new TaskVectorPipeline
        {
            Sparsifiers = [new TopKMagnitude(.5)],
            Weights = Weights,
        });
        using var merged = T.MergeDeltas(prune, Tau1, Tau2, Tau3);
        T.Near(merged, [.5, -2, -1.8, -3.5, 3.65, 0]);
    }

    [Test]
    public void Mergekit_ties_divides_by_the_agreeing_weights()
    {
        // Trimmed as PEFT; weighted: w·τ1 = [.5,−1,0,0,3,0], w·τ2 = [0,−1,0,.5,−.75,0], w·τ3 = [0,0,−1.8,−4,1.4,0].
        // Elected on weighted sums [.5,−2,−1.8,−3.5,3.65,0] → signs [+,−,−,−,+,+].
        // pos1: (−1 − 1)/(1 + .5); pos3: −4/2; pos4: (3 + 1.4)/(1 + 2).
        var ties = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = .5, Weights = Weights });
        using var merged = T.MergeDeltas(ties, Tau1, Tau2, Tau3);
        T.Near(merged, [.5, -2 / 1.5, -.9, -2, 4.4 / 3, 0]);
    }
}
