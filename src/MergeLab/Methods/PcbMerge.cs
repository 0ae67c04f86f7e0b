using MergeLab.Selection;
using MergeLab.Stages;
using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>Options of <see cref="PcbMerge"/>.</summary>
public sealed record PcbOptions
{
    /// <summary>The fraction of each task's parameters kept by score, in (0, 1]. Default 0.1 (the
    /// reference's <c>pcb_ratio</c>).</summary>
    public double Ratio
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Ratio), 0, 1, minInclusive: false);
            field = value;
        }
    } = 0.1;

    /// <summary>The low quantile |τ| is clamped to, in [0, 0.5). Default 1e-4 (the reference's main file;
    /// its NLP and vision scripts use 0.01).</summary>
    public double ClampLow
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(ClampLow), 0, 0.5, maxInclusive: false);
            field = value;
        }
    } = 1e-4;

    /// <summary>The fraction above the high quantile |τ| is clamped to, in [0, 0.5). Default 1e-4.</summary>
    public double ClampHigh
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(ClampHigh), 0, 0.5, maxInclusive: false);
            field = value;
        }
    } = 1e-4;

    /// <summary>λ: θ = θ_base + λ·merged. Default 1 (the reference sweeps it on validation data).</summary>
    public double Lambda
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(Lambda));
            field = value;
        }
    } = 1.0;

    /// <summary>Whether quantiles and score thresholds are taken per tensor or over the whole model
    /// (the reference, default).</summary>
    public SelectionScope Scope { get; init => field = MergeLab.Options.Defined(value, nameof(Scope)); } = SelectionScope.WholeModel;
}

/// <summary>
/// PCB-Merging (Du et al., 2024, "Parameter Competition Balancing for Model Merging"), following the
/// authors' <c>pcb-merging.py</c> (<c>PCB_merge</c>, <c>normalize</c>, <c>clamp</c>). With n tasks and
/// each task's d entries as one row:
/// <list type="number">
/// <item>|τ̂_i| = |τ_i| clamped to its sorted entries at ⌊d·low⌋ and ⌊d·(1 − high) − 1⌋; τ̂_i = sign(τ_i)·|τ̂_i|;</item>
/// <item>intra-balancing: exp(n·minmax(|τ̂_i|)²); inter-balancing: tanh(τ_i ⊙ Σ_j τ_j);</item>
/// <item>score s_i = intra ⊙ inter, clamped below at its sorted entry ⌊d·(1 − ratio)⌋ and min-max
/// rescaled, so about the top <c>ratio</c> keep a weight in (0, 1] and the rest 0;</item>
/// <item>merged = Σ_i τ̂_i·s_i / max(Σ_i s_i, 1e-12); θ = θ_base + λ·merged.</item>
/// </list>
/// A constant row, where the reference divides 0 by 0, min-max rescales to 0 instead of NaN.
/// On the CPU (float32 or bfloat16 inputs) a fused kernel computes the same formulation in three passes;
/// its exp and tanh are its own (about 1 ulp, as libtorch's), so its scores can differ from libtorch's in
/// the last bit, and the merge by about an ulp. Other devices run the libtorch operations.
/// </summary>
public sealed class PcbMerge : MergeMethod
{
    /// <summary>Creates the method; default options are the reference's (ratio 0.1, clamp 1e-4, whole model).</summary>
    public PcbMerge(PcbOptions? options = null) => Options = options ?? new PcbOptions();

    /// <summary>The options this method was created with.</summary>
    public PcbOptions Options { get; }

    /// <inheritdoc />
    public override string Name => "pcb";

    /// <inheritdoc />
    public override ModelStatistic? CreateStatistic(int expertCount) =>
        Options.Scope == SelectionScope.WholeModel ? new PcbStatistic(this, expertCount) : null;

    /// <summary>Per tensor, the clamp quantiles' selection reads every value of each expert and of the base.</summary>
    internal override bool MayVouchForFiniteInputs => Options.Scope == SelectionScope.PerTensor;

    /// <inheritdoc />
    private protected override Tensor? MergeDirect(TensorGroup group, ModelStatistic? statistic, ScalarType outputType)
    {
        bool wholeModel = Options.Scope == SelectionScope.WholeModel;
        var whole = wholeModel ? statistic as PcbStatistic : null;
        return wholeModel && whole is null ? null : PcbKernel.TryMerge(this, group, whole, outputType); // null: MergeFloat32 says what is missing
    }

    /// <inheritdoc />
    protected override Tensor MergeFloat32(TensorGroup group, ModelStatistic? statistic)
    {
        // Every n×d intermediate lives in a pooled workspace and is updated in place; the libtorch
        // operations are the reference's own, so the values are the same as out-of-place.
        var x = StackedTaskVectors(group);
        long d = x.shape[1];
        Tensor low, high, threshold, top;
        Tensor? score = null;
        if (Options.Scope == SelectionScope.WholeModel)
        {
            var whole = statistic as PcbStatistic ?? throw new MergeException(group.Name,
                "PCB with whole-model scope needs its statistic: merge whole state dicts with Merge or the checkpoint engine, or use SelectionScope.PerTensor.");
            (low, high, threshold, top) = whole.Bounds(x.device);
        }
        else
        {
            low = RowKthSmallest(x, LowRank(d), magnitudes: true);
            high = RowKthSmallest(x, HighRank(d), magnitudes: true);
            score = Score(x, low, high);
            threshold = RowKthSmallest(score, ThresholdRank(d), magnitudes: false);
            top = score.amax([1], keepdim: true);
        }

        score ??= Score(x, low, high);
        var clamped = Workspace(x).copy_(x).abs_().clamp_(low, high).mul_(x.sign_());
        var s = MinMaxInPlace(score.clamp_(threshold, top), threshold, top);
        using var tiny = 1e-12.ToScalar();
        var merged = clamped.mul_(s).sum(dim: 0).div_(s.sum(dim: 0).clamp_min(tiny));
        if (Options.Lambda != 1.0)
        {
            using var lambda = Options.Lambda.ToScalar();
            merged.mul_(lambda);
        }

        using var base32 = group.Base!.to(ScalarType.Float32);
        return base32 + merged.view(group.Base.shape);
    }

    /// <summary>The task vectors as rows [n, d] in float32, in pooled memory on the CPU.</summary>
    internal static Tensor StackedTaskVectors(TensorGroup group) =>
        FusedPipeline.TryStackedTaskVectors(group) ?? group.StackedTaskVectors().view(group.ExpertCount, -1);

    /// <summary>intra ⊙ inter for rows x [n, d] given each row's clamp bounds [n, 1] (a new workspace).</summary>
    internal static Tensor Score(Tensor x, Tensor low, Tensor high)
    {
        long n = x.shape[0];
        using var two = 2.ToScalar();
        using var count = n.ToScalar();
        var intra = MinMaxInPlace(Workspace(x).copy_(x).abs_().clamp_(low, high), low, high).pow_(two).mul_(count).exp_();
        using var total = x.sum(dim: 0, keepdim: true);
        using var inter = Workspace(x).copy_(x).mul_(total).tanh_();
        return intra.mul_(inter);
    }

    /// <summary>Each row's k-th smallest value (or magnitude) as an [n, 1] column, by the exact CPU
    /// selection (all rows in one pass) or libtorch's <c>kthvalue</c>.</summary>
    internal static Tensor RowKthSmallest(Tensor rows, long k, bool magnitudes)
    {
        long n = rows.shape[0], d = rows.shape[1];
        if (MagnitudeThreshold.UseCpuKernels(rows) && rows.is_contiguous() && rows.dtype == ScalarType.Float32)
        {
            var floats = CpuTensors.Floats(rows, out var lease);
            using var rowsRead = lease;
            var queries = new SelectionQuery[n];
            for (long i = 0; i < n; i++)
            {
                var row = floats.Slice(i * d, d);
                queries[i] = new SelectionQuery(magnitudes ? new MagnitudeKeys(row) : new SignedKeys(row), k - 1);
            }

            ExactSelector.Solve(queries);
            var values = queries.Select(q => FloatKeys.Value(q.Key, signed: !magnitudes)).ToArray();
            return tensor(values, ScalarType.Float32, rows.device).view(-1, 1);
        }

        using var source = magnitudes ? rows.abs() : rows.alias();
        return source.kthvalue(k, 1, true).values;
    }

    /// <summary>(x − min)/(max − min) in place with the row's known min and max; a constant row gives 0.</summary>
    private static Tensor MinMaxInPlace(Tensor x, Tensor min, Tensor max)
    {
        using var scope = NewDisposeScope();
        var range = max - min;
        var constant = range.eq(ScalarArgs.Zero);
        var safe = where(constant, ones_like(range), range);
        return x.sub_(min).div_(safe).masked_fill_(constant.expand_as(x), ScalarArgs.Zero);
    }

    /// <summary>An uninitialized tensor like <paramref name="x"/>, from the buffer pool on the CPU.</summary>
    private static Tensor Workspace(Tensor x) =>
        CpuTensors.OnCpu(x) ? NativeBufferPool.Empty(x.shape, x.dtype) : empty_like(x);

    // The reference's indices into an ascending sort (Python int() truncates toward zero), as 1-based ranks.
    internal long LowRank(long d) => (long)(d * Options.ClampLow) + 1;

    internal long HighRank(long d) => Math.Max((long)(d * (1 - Options.ClampHigh) - 1), 0) + 1;

    internal long ThresholdRank(long d) => Math.Min((long)(d * (1 - Options.Ratio)), d - 1) + 1;
}

/// <summary>
/// The whole-model bounds of <see cref="PcbMerge"/> in four streaming passes: the clamp quantiles of
/// each task's |τ| (two radix passes), then each task's score threshold and maximum (two more, over the
/// signed scores, which depend on the first two).
/// </summary>
internal sealed class PcbStatistic(PcbMerge method, int expertCount) : ModelStatistic
{
    private readonly RadixSelect[] _magnitudes = NewSelects(expertCount, signed: false);
    private readonly RadixSelect[] _scores = NewSelects(expertCount, signed: true);
    private float[] _low = [], _high = [], _threshold = [], _top = [];
    private long _entries;
    private int _pass;

    public override bool IsComplete => _pass == 4;

    internal override int? ExpertCount => expertCount;

    /// <summary>Each task's (low, high, threshold, top).</summary>
    public (float[] Low, float[] High, float[] Threshold, float[] Top) Values => (_low, _high, _threshold, _top);

    /// <summary>Each task's (low, high, threshold, top) as [n, 1] tensors on <paramref name="device"/>.</summary>
    public (Tensor Low, Tensor High, Tensor Threshold, Tensor Top) Bounds(Device device) =>
        (Column(_low, device), Column(_high, device), Column(_threshold, device), Column(_top, device));

    public override void Observe(TensorGroup group)
    {
        ArgumentNullException.ThrowIfNull(group);
        CheckExperts(group);
        if (!group.Reference.is_floating_point())
        {
            return;
        }

        using var scope = NewDisposeScope();
        if (_pass == 0)
        {
            _entries += group.Reference.numel();
        }

        if (_pass < 2 && FusedPipeline.TryTaskVectorKeys(group) is { } keys)
        {
            // The clamp quantiles are over |τ_i|: read it straight from the inputs' memory.
            using (keys)
            {
                for (int i = 0; i < _magnitudes.Length; i++)
                {
                    if (_pass == 0)
                    {
                        _magnitudes[i].ObserveCoarse(keys[i]);
                    }
                    else
                    {
                        _magnitudes[i].ObserveFine(keys[i]);
                    }
                }
            }

            return;
        }

        // The scores come from the kernel the merge will use, so the thresholds are those of its scores;
        // it computes them block by block as they are counted.
        if (_pass >= 2 && PcbKernel.TryScoreRows(group, _low, _high, out var inputs) is { } rows)
        {
            using (inputs)
            {
                if (_pass == 2)
                {
                    RadixSelect.ObserveCoarse(_scores, rows);
                }
                else
                {
                    RadixSelect.ObserveFine(_scores, rows);
                }
            }

            return;
        }

        var x = PcbMerge.StackedTaskVectors(group);
        var source = _pass < 2 ? x : PcbMerge.Score(x, Column(_low, x.device), Column(_high, x.device));

        var selects = _pass < 2 ? _magnitudes : _scores;
        for (int i = 0; i < selects.Length; i++)
        {
            if (_pass % 2 == 0)
            {
                selects[i].ObserveCoarse(source[i]);
            }
            else
            {
                selects[i].ObserveFine(source[i]);
            }
        }
    }

    protected override void CompletePass()
    {
        if (_entries == 0)
        {
            _pass = 4; // no floating-point entries (none, or only empty tensors): nothing to bound
            return;
        }

        long d = _entries;
        switch (_pass)
        {
            case 0:
                foreach (var s in _magnitudes)
                {
                    s.EndCoarse([method.LowRank(d), method.HighRank(d)]);
                }

                break;
            case 1:
                var bounds = _magnitudes.Select(s => s.EndFine()).ToArray();
                (_low, _high) = (bounds.Select(b => b[0]).ToArray(), bounds.Select(b => b[1]).ToArray());
                break;
            case 2:
                foreach (var s in _scores)
                {
                    s.EndCoarse([method.ThresholdRank(d), d]);
                }

                break;
            case 3:
                var scores = _scores.Select(s => s.EndFine()).ToArray();
                (_threshold, _top) = (scores.Select(b => b[0]).ToArray(), scores.Select(b => b[1]).ToArray());
                break;
        }

        _pass++;
    }

    private static RadixSelect[] NewSelects(int n, bool signed) =>
        Enumerable.Range(0, n).Select(_ => new RadixSelect(signed)).ToArray();

    private static Tensor Column(float[] values, Device device) =>
        tensor(values, ScalarType.Float32, device).view(-1, 1);
}
