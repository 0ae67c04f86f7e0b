using MergeLab.Selection;
using MergeLab.Stages;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// The whole-model statistics of a <see cref="TaskVectorPipeline"/>, computed exactly in streaming
/// passes: each expert's global magnitude threshold (two radix-select passes over its task vector),
/// then, when the consensus needs it, the global majority sign (one pass that trims, elects and sums
/// the elected signs of every parameter, as the TIES authors' <c>resolve_zero_signs</c>).
/// </summary>
internal sealed class PipelineStatistic : ModelStatistic
{
    private readonly TaskVectorPipeline _pipeline;
    private readonly RadixSelect?[] _selects;
    private readonly float?[] _thresholds;
    private Phase _phase;
    private long _entries;
    private double _signSum;

    public PipelineStatistic(TaskVectorPipeline pipeline, int expertCount)
    {
        _pipeline = pipeline;
        _selects = new RadixSelect?[expertCount];
        _thresholds = new float?[expertCount];
        for (int k = 0; k < expertCount; k++)
        {
            if (pipeline.SparsifierFor(k, expertCount) is { NeedsWholeModelThreshold: true })
            {
                _selects[k] = new RadixSelect();
            }
        }

        _phase = _selects.Any(s => s is not null) ? Phase.Coarse
            : pipeline.Consensus is { NeedsWholeModelMajority: true } ? Phase.Majority : Phase.Done;
    }

    private enum Phase
    {
        Coarse,
        Fine,
        Majority,
        Done,
    }

    public override bool IsComplete => _phase == Phase.Done;

    internal override int? ExpertCount => _selects.Length;

    /// <summary>Expert k's global threshold; null when it keeps everything or has no global scope.</summary>
    public float? Threshold(int k) => _thresholds[k];

    /// <summary>The sign of the sum of all elected signs over the model.</summary>
    public float? MajoritySign { get; private set; }

    public override void Observe(TensorGroup group)
    {
        ArgumentNullException.ThrowIfNull(group);
        CheckExperts(group);
        if (!group.Reference.is_floating_point())
        {
            return;
        }

        using var scope = NewDisposeScope();
        using var keys = _phase is Phase.Coarse or Phase.Fine ? FusedPipeline.TryTaskVectorKeys(group) : null;
        switch (_phase)
        {
            case Phase.Coarse:
                _entries += group.Reference.numel();
                for (int k = 0; k < _selects.Length; k++)
                {
                    if (_selects[k] is { } select)
                    {
                        if (keys is not null)
                        {
                            select.ObserveCoarse(keys[k]);
                        }
                        else
                        {
                            select.ObserveCoarse(group.TaskVector(k));
                        }
                    }
                }

                break;
            case Phase.Fine:
                for (int k = 0; k < _selects.Length; k++)
                {
                    if (_selects[k] is { InFinePass: true } select)
                    {
                        if (keys is not null)
                        {
                            select.ObserveFine(keys[k]);
                        }
                        else
                        {
                            select.ObserveFine(group.TaskVector(k));
                        }
                    }
                }

                break;
            case Phase.Majority:
                if (FusedPipeline.TrySignSum(_pipeline, group, this) is long sum)
                {
                    _signSum += sum;
                    break;
                }

                var consensus = _pipeline.Consensus!;
                var stacked = _pipeline.SparseTaskVectors(group, this);
                var electorate = consensus.ElectOnWeighted ? stacked * _pipeline.WeightTensor(stacked) : stacked;
                _signSum += consensus.RawSign(electorate).sum().to(ScalarType.Float64).item<double>();
                break;
            default:
                throw new InvalidOperationException("The statistic is complete.");
        }
    }

    protected override void CompletePass()
    {
        switch (_phase)
        {
            case Phase.Coarse:
                bool anyFine = false;
                for (int k = 0; k < _selects.Length; k++)
                {
                    if (_selects[k] is not { } select)
                    {
                        continue;
                    }

                    var trim = (KthMagnitudeThreshold)_pipeline.SparsifierFor(k, _selects.Length)!;
                    long rank = _entries == 0 ? 0 : trim.ThresholdRank(_entries);
                    if (rank > 0)
                    {
                        select.EndCoarse([rank]);
                        anyFine = true;
                    }
                }

                _phase = anyFine ? Phase.Fine : AfterThresholds();
                break;
            case Phase.Fine:
                for (int k = 0; k < _selects.Length; k++)
                {
                    if (_selects[k] is { InFinePass: true } select)
                    {
                        _thresholds[k] = select.EndFine()[0];
                    }
                }

                _phase = AfterThresholds();
                break;
            case Phase.Majority:
                MajoritySign = Math.Sign(_signSum);
                _phase = Phase.Done;
                break;
        }
    }

    private Phase AfterThresholds() =>
        _pipeline.Consensus is { NeedsWholeModelMajority: true } ? Phase.Majority : Phase.Done;
}
