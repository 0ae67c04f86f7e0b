using System.Runtime.CompilerServices;
using System.Numerics;
using System.Runtime.Intrinsics;
using MergeLab.Selection;
using MergeLab.Stages;
using static TorchSharp.torch;

namespace MergeLab.Methods;

/// <summary>
/// The CPU kernel of <see cref="TaskVectorPipeline"/> and <see cref="WeightAverageMerge"/>: every stage
/// fused into one pass over the inputs' memory, block by block, on all threads, writing the result in
/// its output dtype into pooled memory. Nothing of size N·n is materialized: τ_k = θ_k − θ_base is formed
/// in a small per-thread block, masked, weighted, elected and summed there.
/// </summary>
/// <remarks>
/// <para>Each float32 operation is the one the libtorch formulation performs, in the same order
/// (τ = e − b; τ·mask with mask 1 or 0; ·w_k; Σ over experts from +0 in expert order; sign; agreement;
/// division; ·λ; b + merged; round to the output dtype), so the result is the libtorch result. The only
/// freedom libtorch takes that this kernel does not is its summation order over the expert dimension:
/// on the CPU, <c>sum(dim: 0)</c> adds up to 17 experts in expert order except in the last few columns of
/// each of its thread chunks, where with four or more experts it pairs them (ILP-4), and from 18 experts
/// on it adds them in groups of 16 and then the groups' sums (its cascade sum); there the two can differ
/// in the last bit (in most entries from 18 experts on). The kernel always adds in expert order, so its
/// result never depends on the thread count.</para>
/// <para>Selections (top-k, k-th magnitude, Breadcrumbs windows) run first, exact, over the same memory
/// (<see cref="ExactSelector"/>, <see cref="RowSelector"/>). Methods fall back to libtorch off the CPU,
/// for unknown sparsifiers, for mergekit's L1 rescale of the per-row (Paper) Breadcrumbs mask, and beyond 64
/// experts.</para>
/// </remarks>
internal static unsafe class FusedPipeline
{
    /// <summary>Elements per block: the inputs' block and N float32 task-vector blocks stay in L2.</summary>
    public const int Block = 4096;

    /// <summary>The most experts the kernel handles (its per-thread scratch grows with N).</summary>
    public const int MaxExperts = 64;

    /// <summary>Whether the key-limit and key-range loops run on 512-bit vectors (where the CPU has them and
    /// <see cref="Vector{T}"/> is narrower); false forces <see cref="Vector{T}"/>, for tests.</summary>
    internal static bool UseWideLanes { get; set; } = Vector512.IsHardwareAccelerated && Vector<float>.Count < Vector512<float>.Count;

    /// <summary>Lets experts of weight 1 under a sign election take loops of their own (two:
    /// <c>Kernel.LimitPairRun</c>; three or four: <c>Kernel.LimitSmallRun</c>; more:
    /// <c>Kernel.LimitManyRun</c>); false sends them through the general one (for tests).</summary>
    internal static bool UnitWeightKernels { get; set; } = true;

    /// <summary>Whether DARE on task arithmetic and DARE-TIES take <c>Kernel.RandomRun</c> and
    /// <c>Kernel.RandomConsensusRun</c> (true, the default) or the general loop; for tests and benchmarks
    /// that compare the two.</summary>
    internal static bool RandomKernel { get; set; } = true;

    /// <summary>The expert count of <c>Kernel.LimitSmallRun</c>, fixed at compile time so that the JIT
    /// drops the fourth expert's code for three.</summary>
    private interface IExpertCount
    {
        /// <summary>Four experts (true) or three (false).</summary>
        static abstract bool Four { get; }
    }

    private readonly struct Three : IExpertCount
    {
        static bool IExpertCount.Four => false;
    }

    private readonly struct Four : IExpertCount
    {
        static bool IExpertCount.Four => true;
    }

    private enum RuleKind
    {
        KeepAll,
        DropAll,
        KeyAtLeast,
        Top,
        Window,
        RowWindow,
        Random,
    }

    /// <summary>Merges with the fused kernel, or returns null when it does not apply.</summary>
    public static Tensor? TryMerge(TaskVectorPipeline pipeline, TensorGroup group, PipelineStatistic? statistic, ScalarType outputType)
    {
        using var inputs = Inputs.Acquire(group, needsBase: true);
        if (inputs is null)
        {
            return null;
        }

        var rules = Plan(pipeline, group, inputs, statistic);
        if (rules is null)
        {
            return null;
        }

        var kernel = new Kernel(pipeline, inputs, rules);
        if (pipeline.Consensus is { } consensus)
        {
            kernel.Fill = consensus.ZeroRule == ZeroSignRule.Positive ? 1f
                : consensus.MajorityScope == SelectionScope.WholeModel
                    ? statistic?.MajoritySign ?? throw new InvalidOperationException("The whole-model majority sign was not computed.")
                    : Math.Sign(kernel.SignSum());
        }

        return kernel.Run(outputType, group.Reference.shape);
    }

    /// <summary>Σ of the elected signs before the zero rule (the TIES authors' majority), or null when
    /// the kernel does not apply.</summary>
    public static long? TrySignSum(TaskVectorPipeline pipeline, TensorGroup group, PipelineStatistic? statistic)
    {
        using var inputs = Inputs.Acquire(group, needsBase: true);
        if (inputs is null || pipeline.Consensus is null)
        {
            return null;
        }

        var rules = Plan(pipeline, group, inputs, statistic);
        return rules is null ? null : new Kernel(pipeline, inputs, rules).SignSum();
    }

    /// <summary>Weight averaging Σ_k w_k·θ_k (/ Σ_k w_k) as libtorch computes it (θ_0·w_0, then fused
    /// multiply-adds, as its vectorized <c>add_(x, alpha)</c> does), or null when the kernel does not apply.</summary>
    public static Tensor? TryAverage(TensorGroup group, double[] weights, bool normalize, ScalarType outputType)
    {
        using var inputs = Inputs.Acquire(group, needsBase: false);
        if (inputs is null)
        {
            return null;
        }

        var wf = weights.Select(w => (float)w).ToArray();
        var loop = new StreamLoop(null, inputs.Experts, wf, average: true)
        {
            Divisor = (float)weights.Sum(),
            Normalize = normalize,
        };
        return loop.Run(inputs.Length, group.Reference.shape, outputType);
    }

    /// <summary>τ_k = θ_k − θ_base (float32) as the rows of a pooled [N, n] tensor, or null when the
    /// kernels do not apply.</summary>
    public static Tensor? TryStackedTaskVectors(TensorGroup group)
    {
        using var inputs = Inputs.Acquire(group, needsBase: true);
        if (inputs is null)
        {
            return null;
        }

        long n = inputs.Length;
        int experts = group.ExpertCount;
        var result = NativeBufferPool.Empty([experts, n], ScalarType.Float32);
        var output = (float*)CpuTensors.Pointer(result);
        long blocks = CpuParallel.BlockCount(n, Block);
        CpuParallel.For(blocks, b =>
        {
            long start = b * Block;
            int count = (int)Math.Min(Block, n - start);
            var scratch = (float*)ThreadScratch.Get(2L * Block * 4);
            var bse = inputs.Base.Block(start, count, scratch);
            for (int k = 0; k < experts; k++)
            {
                Subtract(inputs.Experts[k].Block(start, count, scratch + Block), bse, output + k * n + start, count);
            }
        });

        return result;
    }

    /// <summary>Keys of |τ_k| read straight from the group's CPU memory (for the whole-model radix
    /// passes), or null when the kernels do not apply. Dispose after use.</summary>
    public static TaskVectorKeys? TryTaskVectorKeys(TensorGroup group)
    {
        var inputs = Inputs.Acquire(group, needsBase: true);
        return inputs is null ? null : new TaskVectorKeys(inputs);
    }

    /// <summary>The |τ_k| key sources of one tensor group; owns any converted copies of the inputs.</summary>
    internal sealed class TaskVectorKeys : IDisposable
    {
        private readonly Inputs _inputs;
        private readonly KeySource[] _keys;

        internal TaskVectorKeys(Inputs inputs)
        {
            _inputs = inputs;
            _keys = inputs.Experts.Select(e => (KeySource)new DifferenceMagnitudeKeys(e, inputs.Base)).ToArray();
        }

        public KeySource this[int expert] => _keys[expert];

        public void Dispose() => _inputs.Dispose();
    }

    // ---- Inputs ------------------------------------------------------------------------------------

    internal sealed class Inputs : IDisposable
    {
        private readonly List<FloatsLease> _leases = [];

        private Inputs(long length) => Length = length;

        public long Length { get; }

        public CpuFloats Base { get; private set; }

        public CpuFloats[] Experts { get; private set; } = [];

        public static Inputs? Acquire(TensorGroup group, bool needsBase)
        {
            if (!MagnitudeThreshold.CpuKernelsEnabled || group.ExpertCount > MaxExperts || (needsBase && group.Base is null))
            {
                return null;
            }

            long n = group.Reference.numel();
            if (n == 0 || n > ExactSelector.MaxLength)
            {
                return null;
            }

            var all = needsBase ? group.Experts.Prepend(group.Base!) : group.Experts;
            if (!all.All(t => CpuTensors.OnCpu(t) && t.is_floating_point()))
            {
                return null;
            }

            var inputs = new Inputs(n);
            try
            {
                if (needsBase)
                {
                    inputs.Base = inputs.Read(group.Base!);
                }

                inputs.Experts = group.Experts.Select(inputs.Read).ToArray();
                return inputs;
            }
            catch
            {
                inputs.Dispose();
                throw;
            }
        }

        private CpuFloats Read(Tensor t)
        {
            var floats = CpuTensors.Floats(t, out var lease);
            _leases.Add(lease);
            return floats;
        }

        public void Dispose()
        {
            foreach (var lease in _leases)
            {
                lease.Dispose();
            }
        }
    }

    // ---- Sparsifier plans --------------------------------------------------------------------------

    private sealed class Rule
    {
        public RuleKind Kind;
        public uint Key;
        public ulong Upper, Lower;
        public bool HasLower;
        public long Low, High, Width;
        public ulong[]? RowLower, RowUpper;
        public bool RowsPending;
        public long Stream;
        public uint Threshold;
        public RescaleNorm Rescale;
        public float Factor = 1f;
        public bool Divide;
        public SelectionQuery? UpperQuery, LowerQuery;

        public static Rule Of(RuleKind kind) => new() { Kind = kind };
    }

    private static Rule[]? Plan(TaskVectorPipeline pipeline, TensorGroup group, Inputs inputs, PipelineStatistic? statistic)
    {
        int experts = group.ExpertCount;
        long n = inputs.Length;
        var rules = new Rule[experts];
        var queries = new List<SelectionQuery>();
        for (int k = 0; k < experts; k++)
        {
            var sparsifier = pipeline.SparsifierFor(k, experts);
            KeySource Keys() => new DifferenceMagnitudeKeys(inputs.Experts[k], inputs.Base);
            switch (sparsifier)
            {
                case null:
                    rules[k] = Rule.Of(RuleKind.KeepAll);
                    break;
                case TopKMagnitude top:
                {
                    long keep = top.Density >= 1 ? n : (long)Math.Floor(n * top.Density);
                    if (keep >= n)
                    {
                        rules[k] = Rule.Of(RuleKind.KeepAll); // density 1: τ as it is, not rescaled
                        break;
                    }

                    if (keep <= 0)
                    {
                        rules[k] = Rule.Of(RuleKind.DropAll);
                    }
                    else
                    {
                        var q = new SelectionQuery(Keys(), n - keep, indexDescending: true);
                        queries.Add(q);
                        rules[k] = new Rule { Kind = RuleKind.Top, UpperQuery = q };
                    }

                    break;
                }

                case KthMagnitudeThreshold kth:
                {
                    if (kth.Scope == SelectionScope.WholeModel)
                    {
                        float? threshold = statistic?.Threshold(k);
                        rules[k] = threshold is { } t ? new Rule { Kind = RuleKind.KeyAtLeast, Key = FloatKeys.Magnitude(t) } : Rule.Of(RuleKind.KeepAll);
                        break;
                    }

                    long rank = kth.ThresholdRank(n);
                    if (rank == 0)
                    {
                        rules[k] = Rule.Of(RuleKind.KeepAll);
                        break;
                    }

                    var q = new SelectionQuery(Keys(), rank - 1);
                    queries.Add(q);
                    rules[k] = new Rule { Kind = RuleKind.KeyAtLeast, UpperQuery = q };
                    break;
                }

                case RandomDrop drop:
                {
                    if (drop.DropRate == 0)
                    {
                        rules[k] = Rule.Of(RuleKind.KeepAll);
                        break;
                    }

                    rules[k] = new Rule
                    {
                        Kind = RuleKind.Random,
                        Stream = DropMask.StreamSeed(drop.Seed, group.Name, k),
                        Threshold = DropMask.KeepThreshold(drop.DropRate),
                        Factor = drop.RescaleNorm == RescaleNorm.InverseKeepProbability ? (float)(1 - drop.DropRate) : 1f,
                        Divide = drop.RescaleNorm == RescaleNorm.InverseKeepProbability,
                    };
                    break;
                }

                case BreadcrumbsMask crumbs:
                {
                    var shape = group.Reference.shape;
                    if (crumbs.Variant == BreadcrumbsVariant.Paper)
                    {
                        if (crumbs.RescaleNorm != RescaleNorm.None)
                        {
                            return null; // the row windows are selected during the merge, after the factor is due
                        }

                        if (shape.Length == 0)
                        {
                            rules[k] = Rule.Of(RuleKind.KeepAll);
                            break;
                        }

                        long c = shape[^1];
                        long high = c - (long)Math.Floor(c * crumbs.Gamma);
                        long low = Math.Max(0, high - (long)Math.Floor(c * crumbs.Density));
                        rules[k] = WindowRule(low, high, c) ?? new Rule { Kind = RuleKind.RowWindow, Low = low, High = high, Width = c };
                        break;
                    }

                    if (crumbs.Density >= 1)
                    {
                        rules[k] = Rule.Of(RuleKind.KeepAll);
                        break;
                    }

                    long target = (long)Math.Floor(n * crumbs.Density);
                    long topCount = Math.Min((long)Math.Floor(n * crumbs.Gamma), n - target);
                    long hi = n - topCount;
                    long lo = hi - target;
                    var rule = WindowRule(lo, hi, n);
                    if (rule is null)
                    {
                        var source = Keys();
                        rule = new Rule { Kind = RuleKind.Window, UpperQuery = new SelectionQuery(source, hi - 1), HasLower = lo > 0 };
                        queries.Add(rule.UpperQuery);
                        if (lo > 0)
                        {
                            rule.LowerQuery = new SelectionQuery(source, lo - 1);
                            queries.Add(rule.LowerQuery);
                        }
                    }

                    rules[k] = rule;
                    break;
                }

                default:
                    return null;
            }

            // Read only by the L1 norms pass, which skips KeepAll rules.
            rules[k].Rescale = sparsifier?.RescaleNorm ?? RescaleNorm.None;
        }

        ExactSelector.Solve(queries);
        foreach (var rule in rules)
        {
            if (rule.UpperQuery is { } upper)
            {
                rule.Upper = upper.Composite;
                rule.Key = upper.Key;
            }

            if (rule.LowerQuery is { } lower)
            {
                rule.Lower = lower.Composite;
            }
        }

        SelectRowWindows(rules, inputs);
        ComputeL1Factors(rules, inputs);
        return rules;
    }

    /// <summary>The rule of a rank window that keeps all or nothing, or null for a real window.</summary>
    private static Rule? WindowRule(long low, long high, long width) =>
        high <= low ? Rule.Of(RuleKind.DropAll) : low == 0 && high == width ? Rule.Of(RuleKind.KeepAll) : null;

    /// <summary>Each row's window bounds for the Breadcrumbs paper variant: arrays for them, filled here
    /// for rows too long for the row selector; shorter rows are selected by the kernel, a block of rows
    /// at a time just before it merges them (<see cref="SelectRows"/>), so the rows are still in cache.</summary>
    private static void SelectRowWindows(Rule[] rules, Inputs inputs)
    {
        var rowRules = Enumerable.Range(0, rules.Length).Where(k => rules[k].Kind == RuleKind.RowWindow).ToArray();
        if (rowRules.Length == 0)
        {
            return;
        }

        long width = rules[rowRules[0]].Width;
        long rows = inputs.Length / width;
        foreach (int k in rowRules)
        {
            rules[k].RowLower = new ulong[rows];
            rules[k].RowUpper = new ulong[rows];
            rules[k].RowsPending = width <= RowWindow.MaxShortRow;
        }

        if (width > RowWindow.MaxShortRow)
        {
            // Few long rows: each row with the whole-buffer selector, which is itself multi-threaded.
            foreach (int k in rowRules)
            {
                var r = rules[k];
                for (long row = 0; row < rows; row++)
                {
                    var source = new DifferenceMagnitudeKeys(inputs.Experts[k].Slice(row * width, width), inputs.Base.Slice(row * width, width));
                    (r.RowLower![row], r.RowUpper![row]) = RowWindow.OfLongRow(source, r.Low, r.High);
                }
            }
        }
    }

    /// <summary>Each expert's <see cref="RowHint"/> on this thread, carried from row to row (and from one call
    /// to the next: a stale hint only costs a miss).</summary>
    [ThreadStatic]
    private static RowHint[]? _rowHints;

    /// <summary>The window bounds of rows [<paramref name="firstRow"/>, <paramref name="endRow"/>) for every
    /// rule still <see cref="Rule.RowsPending"/>, on the calling thread.</summary>
    private static void SelectRows(Rule[] rules, Inputs inputs, long firstRow, long endRow)
    {
        int w = 0;
        foreach (var r in rules)
        {
            if (r.RowsPending)
            {
                w = (int)r.Width;
            }
        }

        if (w == 0)
        {
            return;
        }

        RowWindow.ShortRowScratch(w, out var keys, out var floats, out var rowScratch);
        if (_rowHints is null || _rowHints.Length < rules.Length)
        {
            _rowHints = new RowHint[Math.Max(rules.Length, 8)];
        }

        var hints = _rowHints;
        for (int k = 0; k < rules.Length; k++)
        {
            if (rules[k].RowsPending && !ReferenceEquals(hints[k].Owner, rules[k]))
            {
                hints[k] = new RowHint { Owner = rules[k] };
            }
        }

        // bfloat16 experts' keys are read in halves, against the base row split by parity (after the
        // float32 base row in the staging floats).
        bool halves = false;
        if (RowSelector.ReadsHalves(w))
        {
            for (int k = 0; k < rules.Length; k++)
            {
                halves |= rules[k].RowsPending && inputs.Experts[k].IsBFloat16;
            }
        }

        float* splitBase = halves ? floats + w : null;
        for (long row = firstRow; row < endRow; row++)
        {
            // The base row in float32 once for every expert; each expert's keys |θ − θ_base| are computed
            // by the selection's own pass over the row.
            float* baseRow = inputs.Base.Block(row * w, w, floats);
            if (halves)
            {
                RowSelector.SplitByParity(baseRow, splitBase, w);
            }

            for (int k = 0; k < rules.Length; k++)
            {
                var r = rules[k];
                if (r.RowsPending)
                {
                    var expert = inputs.Experts[k].Slice(row * w, w);
                    (r.RowLower![row], r.RowUpper![row]) = expert.IsBFloat16
                        ? RowWindow.OfShortRow(new DifferenceRowKeys<BFloat16Row>(expert, baseRow, splitBase), keys, w, r.Low, r.High, rowScratch, ref hints[k])
                        : RowWindow.OfShortRow(new DifferenceRowKeys<Float32Row>(expert, baseRow), keys, w, r.Low, r.High, rowScratch, ref hints[k]);
                }
            }
        }
    }

    /// <summary>mergekit's L1 rescale (DARE, TIES, Breadcrumbs): ‖τ‖₁ / ‖masked τ‖₁ per expert, summed as
    /// the sparsifiers do on a materialized τ (float64, fixed blocks, block order).</summary>
    private static void ComputeL1Factors(Rule[] rules, Inputs inputs)
    {
        for (int k = 0; k < rules.Length; k++)
        {
            var r = rules[k];
            // KeepAll (density 1) is never rescaled: mergekit returns τ as it is there, and so does the kernel.
            if (r.Rescale != RescaleNorm.L1 || r.Kind == RuleKind.KeepAll)
            {
                continue;
            }

            long n = inputs.Length;
            var expert = inputs.Experts[k];
            long blocks = CpuParallel.BlockCount(n, DropMask.NormBlock);
            var norms = new (double Before, double After)[blocks];

            // Whole blocks eight at a time (DropMask.BlockNorms8: the same sums, side by side), the rest alone.
            const int lanes = DropMask.NormLanes;
            long full = n / DropMask.NormBlock;
            long groups = DropMask.SideBySideNorms ? full / lanes : 0;
            long singles = blocks - (groups * lanes);
            CpuParallel.For(groups + singles, g =>
            {
                const int block = DropMask.NormBlock;

                // Blocks a cache line more than a block apart: at a block apart, the eight lanes' entries would
                // all fall in one set of the first-level cache and evict each other.
                const int stride = block + 16;
                var scratch = (float*)ThreadScratch.Get(4L * ((2 * lanes * stride) + (2 * block)));
                var tau = scratch;
                var masked = scratch + (lanes * stride);
                var tmp = scratch + (2 * lanes * stride);
                long first = g < groups ? g * lanes : (groups * lanes) + (g - groups);
                int count = g < groups ? lanes : 1;
                int length = 0;
                for (int j = 0; j < count; j++)
                {
                    long start = (first + j) * block;
                    length = (int)Math.Min(block, n - start);
                    var e = expert.Block(start, length, tmp);
                    var bse = inputs.Base.Block(start, length, tmp + block);
                    Subtract(e, bse, tau + ((long)j * stride), length);
                    Buffer.MemoryCopy(tau + ((long)j * stride), masked + ((long)j * stride), length * 4L, length * 4L);
                    Kernel.Mask(r, masked + ((long)j * stride), start, length);
                }

                if (count == lanes)
                {
                    fixed ((double Before, double After)* at = &norms[first])
                    {
                        DropMask.BlockNorms8(tau, masked, stride, block, at);
                    }
                }
                else
                {
                    norms[first] = DropMask.BlockNorms(tau, masked, length); // one block, perhaps the short last one
                }
            });

            var (before, after) = DropMask.SumNorms(norms);
            r.Factor = DropMask.L1Factor(before, after);
            r.Divide = false;

            // Σ|θ − θ_base| over every entry, in float64 (which no sum of float32 magnitudes overflows): finite
            // only if the expert and the base were finite everywhere (FiniteWitness).
            if (double.IsFinite(before))
            {
                FiniteWitness.Vouch(expert);
                FiniteWitness.Vouch(inputs.Base);
            }
        }
    }

    // ---- The kernel ---------------------------------------------------------------------------------

    private sealed class Kernel
    {
        private const int Chunk = 1 << 15;
        private readonly Inputs _inputs;
        private readonly Rule[] _rules;
        private readonly float[] _weights;
        private readonly bool _unitWeights;
        private readonly SignConsensus? _consensus;
        private readonly Aggregation _aggregation;
        private readonly float _lambda;
        private readonly bool _scale;
        private readonly float _plainDivisor;
        private readonly bool _plainNormalize;
        private readonly bool _plain;
        private readonly bool _limitsOnly;
        private readonly bool _rangesOnly;
        private readonly bool _randomOnly;
        private readonly bool _randomConsensus;
        private readonly long _rowWidth;

        public Kernel(TaskVectorPipeline pipeline, Inputs inputs, Rule[] rules)
        {
            _inputs = inputs;
            _rules = rules;
            var weights = Options.Weights(pipeline.Weights, rules.Length);
            _weights = weights.Select(w => (float)w).ToArray();
            _unitWeights = _weights.All(x => x == 1f);
            _consensus = pipeline.Consensus;
            _aggregation = pipeline.Aggregation;
            _lambda = (float)pipeline.Lambda;
            _scale = pipeline.Lambda != 1.0;
            if (_consensus is null && _aggregation == Aggregation.WeightNormalized)
            {
                double divisor = weights.Sum();
                _plainDivisor = (float)(Options.SumsToZero(divisor) ? 1.0 : divisor);
                _plainNormalize = true;
            }

            _plain = _consensus is null && rules.All(r => r.Kind == RuleKind.KeepAll);
            _limitsOnly = _consensus is not null
                && rules.All(r => r.Kind is RuleKind.KeepAll or RuleKind.DropAll or RuleKind.KeyAtLeast or RuleKind.Top && r.Factor == 1f && !r.Divide);
            _rangesOnly = _consensus is null && !_plain
                && rules.All(r => r.Kind is not RuleKind.Random && r.Factor == 1f && !r.Divide);
            _randomOnly = _consensus is null && rules.All(r => r.Kind == RuleKind.Random);
            _randomConsensus = _consensus is not null && rules.All(r => r.Kind == RuleKind.Random);
            _rowWidth = rules.FirstOrDefault(r => r.Kind == RuleKind.RowWindow)?.Width ?? 0;
        }

        /// <summary>The sign a parameter takes when its election sums to 0.</summary>
        public float Fill { get; set; } = 1f;

        private int Experts => _rules.Length;

        public Tensor Run(ScalarType outputType, long[] shape)
        {
            if (_plain)
            {
                // Task arithmetic: every input streamed once, the sum kept in registers.
                var loop = new StreamLoop(_inputs.Base, _inputs.Experts, _weights, average: false)
                {
                    Divisor = _plainDivisor,
                    Normalize = _plainNormalize,
                    Lambda = _lambda,
                    Scale = _scale,
                };
                return loop.Run(_inputs.Length, shape, outputType);
            }

            return CpuTensors.WriteKernelResult(shape, outputType, (address, bf16) =>
            {
                var output = (void*)address;
                long n = _inputs.Length;
                long block = BlockLength;
                CpuParallel.For(CpuParallel.BlockCount(n, block), b =>
                {
                    long start = b * block;
                    long end = Math.Min(n, start + block);
                    ForRows(start, end, (s, e) => Chunked(s, e, output, bf16, null));
                });
                FinishPendingRows();
            });
        }

        /// <summary>Entries per parallel block: <see cref="Chunk"/>, or whole rows (about a chunk's worth)
        /// while row windows are still to be selected, so each block selects its own rows and merges them
        /// while they are in cache.</summary>
        private long BlockLength => _rules.Any(r => r.RowsPending) ? Math.Max(1, Chunk / _rowWidth) * _rowWidth : Chunk;

        /// <summary>Runs <paramref name="body"/> over entries [start, end): at once, or, while row windows
        /// are still to be selected, one row at a time right after selecting its windows, so the merge
        /// reads the row's inputs (base and every expert) from cache.</summary>
        private void ForRows(long start, long end, RangeBody body)
        {
            if (!_rules.Any(r => r.RowsPending))
            {
                body(start, end);
                return;
            }

            for (long row = start / _rowWidth; row < end / _rowWidth; row++)
            {
                SelectRows(_rules, _inputs, row, row + 1);
                body(row * _rowWidth, (row + 1) * _rowWidth);
            }
        }

        private delegate void RangeBody(long start, long end);

        /// <summary>After a pass over every row, all row windows are known.</summary>
        private void FinishPendingRows()
        {
            foreach (var r in _rules)
            {
                r.RowsPending = false;
            }
        }

        /// <summary>Σ over all entries of the elected sign before the zero rule.</summary>
        public long SignSum()
        {
            long n = _inputs.Length;
            long block = BlockLength;
            long blocks = CpuParallel.BlockCount(n, block);
            var sums = new long[blocks];
            CpuParallel.For(blocks, b =>
            {
                long start = b * block;
                long end = Math.Min(n, start + block);
                var sum = stackalloc long[1];
                sum[0] = 0;
                ForRows(start, end, (s, e) => Chunked(s, e, null, false, sum));
                sums[b] = sum[0];
            });
            FinishPendingRows();

            return sums.Sum();
        }

        /// <summary>Splits a chunk at row boundaries when a rule works per row, and runs each piece.</summary>
        private void Chunked(long start, long end, void* output, bool outBf16, long* signSum)
        {
            int experts = Experts;
            var pointers = stackalloc nint[experts];
            var narrow = stackalloc bool[experts];
            for (int k = 0; k < experts; k++)
            {
                pointers[k] = (nint)_inputs.Experts[k].Pointer;
                narrow[k] = _inputs.Experts[k].IsBFloat16;
            }

            var inputs = new Streams(pointers, narrow, (nint)_inputs.Base.Pointer, _inputs.Base.IsBFloat16);
            var tau = stackalloc Vector<float>[2 * experts];
            var weights = stackalloc Vector<float>[experts];
            for (int k = 0; k < experts; k++)
            {
                weights[k] = new Vector<float>(_weights[k]);
            }

            var setup = new Setup
            {
                Experts = experts,
                Weights = weights,
                Consensus = _consensus is not null,
                OnWeighted = _consensus?.ElectOnWeighted ?? false,
                BySum = _consensus?.Election != SignElection.Count,
                MeanOfAgreeing = _aggregation == Aggregation.MeanOfAgreeing,
                WeightNormalized = _aggregation == Aggregation.WeightNormalized,
                PlainNormalize = _plainNormalize,
                PlainDivisor = new Vector<float>(_plainDivisor),
                Scale = _scale,
                Lambda = new Vector<float>(_lambda),
                FillPositive = Fill > 0,
                UnitWeights = _unitWeights, // Chunked runs once per row while rows are selected
            };
            for (long i = start; i < end;)
            {
                long row = _rowWidth > 0 ? i / _rowWidth : 0;
                long pieceEnd = _rowWidth > 0 ? Math.Min(end, (row + 1) * _rowWidth) : end;
                Piece(&setup, inputs, i, pieceEnd, row, tau, output, outBf16, signSum);
                i = pieceEnd;
            }
        }

        /// <summary>Entries [start, end) (within one row when rules are per row), 2·lanes at a time; the
        /// last few go through a zero-padded copy so every entry takes the same vector code.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void Piece(Setup* setup, Streams inputs, long start, long end, long row, Vector<float>* tau, void* output, bool outBf16, long* signSum)
        {
            int w = Vector<float>.Count;
            int experts = setup->Experts;
            var rules = _rules;
            long i = start;
            var signs = Vector<float>.Zero;
            if (!setup->Consensus && signSum == null)
            {
                // No sign election: the weighted sum accumulates as each expert is read (DARE-linear,
                // Breadcrumbs, magnitude pruning), in expert order as in Merged.
                bool rangesOnly = _rangesOnly;
                if (_randomOnly && RandomKernel && (i & 1) == 0)
                {
                    i = UseWideLanes
                        ? RandomRun<Vector512Lanes, Vector512<float>>(setup, inputs, i, end, output, outBf16)
                        : RandomRun<VectorLanes, Vector<float>>(setup, inputs, i, end, output, outBf16);
                }

                if (rangesOnly)
                {
                    // Every mask is a key range (per lane in a block holding a window's or a top-k's tie
                    // index): the run takes every whole block of the piece.
                    i = UseWideLanes
                        ? RangeRun<Vector512Lanes, Vector512<float>>(setup, inputs, i, end, row, output, outBf16)
                        : RangeRun<VectorLanes, Vector<float>>(setup, inputs, i, end, row, output, outBf16);
                }

                for (; !rangesOnly && i + 2 * w <= end; i += 2 * w)
                {
                    Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                    Vector<float> acc0 = Vector<float>.Zero, acc1 = Vector<float>.Zero;
                    for (int k = 0; k < experts; k++)
                    {
                        TaskVectorAt<VectorLanes, Vector<float>>(inputs, k, i, b0, b1, out var t0, out var t1);
                        if (rules[k].Kind != RuleKind.KeepAll)
                        {
                            Sparsify(rules[k], ref t0, ref t1, i, row);
                        }

                        acc0 += t0 * setup->Weights[k];
                        acc1 += t1 * setup->Weights[k];
                    }

                    StreamLoop.Store(output, outBf16, i, b0 + Finish(setup, acc0), b1 + Finish(setup, acc1));
                }
            }

            if (_randomConsensus && RandomKernel && signSum == null && (i & 1) == 0)
            {
                i = UseWideLanes
                    ? RandomConsensusRun<Vector512Lanes, Vector512<float>>(setup, inputs, i, end, output, outBf16)
                    : RandomConsensusRun<VectorLanes, Vector<float>>(setup, inputs, i, end, output, outBf16);
            }

            bool limitsOnly = _limitsOnly;
            int unit = limitsOnly ? UnitRunExperts(setup, signSum) : 0;
            for (; i + 2 * w <= end; i += 2 * w)
            {
                if (limitsOnly)
                {
                    // Runs of blocks where every expert's mask is one key comparison; the one block where a
                    // Top rule's tie index falls goes through the general code below.
                    i = UseWideLanes
                        ? LimitRuns<Vector512Lanes, Vector512<float>>(unit, setup, inputs, i, end, output, outBf16, signSum)
                        : LimitRuns<VectorLanes, Vector<float>>(unit, setup, inputs, i, end, output, outBf16, signSum);
                    if (i + 2 * w > end)
                    {
                        break;
                    }
                }

                Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                for (int k = 0; k < experts; k++)
                {
                    TaskVectorAt<VectorLanes, Vector<float>>(inputs, k, i, b0, b1, out tau[2 * k], out tau[2 * k + 1]);
                    if (rules[k].Kind != RuleKind.KeepAll)
                    {
                        Sparsify(rules[k], ref tau[2 * k], ref tau[2 * k + 1], i, row);
                    }

                    if (setup->OnWeighted)
                    {
                        tau[2 * k] *= setup->Weights[k];
                        tau[2 * k + 1] *= setup->Weights[k];
                    }
                }

                if (signSum != null)
                {
                    signs += RawSign(setup, tau, 0) + RawSign(setup, tau, 1);
                    continue;
                }

                StreamLoop.Store(output, outBf16, i, b0 + Merged(setup, tau, 0), b1 + Merged(setup, tau, 1));
            }

            if (signSum != null)
            {
                *signSum += (long)Vector.Sum(signs); // at most Chunk per lane: exact in float32
            }

            if (i < end)
            {
                Tail(setup, inputs, i, (int)(end - i), row, tau, output, outBf16, signSum);
            }
        }

        /// <summary>
        /// Merges blocks of 2·lanes entries from <paramref name="start"/> while every expert's mask is
        /// "magnitude key ≥ limit" for the whole block (all rules are keep-all, drop-all, a key threshold,
        /// or a top-k whose tie index lies outside the block), and returns where it stopped: at
        /// <paramref name="end"/>'s last whole block, or at the block that holds a top-k tie index. Same
        /// operations in the same order as the general loop, so the same bits, at either lane width
        /// (<typeparamref name="TL"/>). With <paramref name="signSum"/>, adds the elected signs to it
        /// instead of writing the merge.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long LimitRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16, long* signSum)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            int experts = setup->Experts;
            long stop = WholeBlocksEnd(start, end, w);
            var limits = stackalloc TV[experts];
            var weights = stackalloc TV[experts];
            var tau = stackalloc TV[2 * experts];
            for (int k = 0; k < experts; k++)
            {
                limits[k] = Limit<TL, TV>(k, start, 2 * w, ref stop);
                weights[k] = TL.Broadcast(_weights[k]);
            }

            var zero = TL.Zero;
            var lambda = TL.Broadcast(_lambda);
            var signs = zero;
            bool onWeighted = setup->OnWeighted;
            bool bySum = setup->BySum;
            bool fillPositive = Fill > 0;
            var signBit = TL.Broadcast(-0f);
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                TV score0 = zero, score1 = zero;
                for (int k = 0; k < experts; k++)
                {
                    TaskVectorAt<TL, TV>(inputs, k, i, b0, b1, out var t0, out var t1);
                    t0 = Kept<TL, TV>(t0, limits[k]);
                    t1 = Kept<TL, TV>(t1, limits[k]);
                    if (onWeighted)
                    {
                        t0 = TL.Multiply(t0, weights[k]);
                        t1 = TL.Multiply(t1, weights[k]);
                    }

                    tau[2 * k] = t0;
                    tau[2 * k + 1] = t1;
                    score0 = TL.Add(score0, Vote<TL, TV>(t0, bySum));
                    score1 = TL.Add(score1, Vote<TL, TV>(t1, bySum));
                }

                if (signSum != null)
                {
                    signs = TL.Add(signs, TL.Add(SignOf<TL, TV>(score0), SignOf<TL, TV>(score1)));
                    continue;
                }

                TL.Store(output, outBf16, i,
                    TL.Add(b0, Agree<TL, TV>(setup, tau, 0, Elected<TL, TV>(score0, fillPositive, signBit), weights, lambda)),
                    TL.Add(b1, Agree<TL, TV>(setup, tau, 1, Elected<TL, TV>(score1, fillPositive, signBit), weights, lambda)));
            }

            if (signSum != null)
            {
                *signSum += (long)TL.Sum(signs); // at most Chunk per lane: exact in float32
            }

            return i;
        }

        /// <summary>Where the last whole block of 2·<paramref name="lanes"/> entries from <paramref name="start"/>
        /// before <paramref name="end"/> ends: the bound of every run loop.</summary>
        private static long WholeBlocksEnd(long start, long end, int lanes) => start + (end - start) / (2 * lanes) * (2 * lanes);

        /// <summary>The number of experts where <see cref="LimitPairRun"/> (2), <see cref="LimitSmallRun"/>
        /// (3, 4) or <see cref="LimitManyRun"/> (more) computes what <see cref="LimitRun"/> would: experts of
        /// weight 1, a sign election, and the mean of the agreeing entries (as a count, or as the weights'
        /// sum, which is the same count here); 0 otherwise.</summary>
        private static int UnitRunExperts(Setup* setup, long* signSum) =>
            UnitWeightKernels && signSum == null && setup->Experts >= 2 && setup->UnitWeights && setup->Consensus
            && (setup->MeanOfAgreeing || setup->WeightNormalized) ? setup->Experts : 0;

        /// <summary>
        /// <see cref="LimitRun"/> for two experts of weight 1 with the mean of the agreeing entries
        /// (TIES on a pair of models, the common case), with the same bits: both task vectors stay in
        /// registers, the general loop's flags are resolved before it, and <see cref="PairMean"/>
        /// takes three exact shortcuts. Always writes the merge (no sign sum).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long LimitPairRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            long stop = WholeBlocksEnd(start, end, w);
            var limit0 = Limit<TL, TV>(0, start, 2 * w, ref stop);
            var limit1 = Limit<TL, TV>(1, start, 2 * w, ref stop);
            var lambda = TL.Broadcast(_lambda);
            bool bySum = setup->BySum, scale = setup->Scale, fillPositive = Fill > 0;
            nint e0p = inputs.Experts[0], e1p = inputs.Experts[1];
            bool e0bf = inputs.ExpertIsBf16[0], e1bf = inputs.ExpertIsBf16[1];
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                TL.Load(e0p, e0bf, i, out var x0, out var x1);
                TL.Load(e1p, e1bf, i, out var y0, out var y1);
                var s0 = Kept<TL, TV>(TL.Subtract(x0, b0), limit0);
                var s1 = Kept<TL, TV>(TL.Subtract(x1, b1), limit0);
                var t0 = Kept<TL, TV>(TL.Subtract(y0, b0), limit1);
                var t1 = Kept<TL, TV>(TL.Subtract(y1, b1), limit1);
                TL.Store(output, outBf16, i,
                    TL.Add(b0, PairMean<TL, TV>(s0, t0, bySum, fillPositive, scale, lambda)),
                    TL.Add(b1, PairMean<TL, TV>(s1, t1, bySum, fillPositive, scale, lambda)));
            }

            return i;
        }

        /// <summary>
        /// <see cref="LimitRun"/> for three or four experts (<typeparamref name="TN"/>) of weight 1 with the
        /// mean of the agreeing entries, with the same bits: the task vectors stay in registers instead of a
        /// stack array, the loop over the experts is unrolled, and the general loop's flags are resolved
        /// before it. Unlike <see cref="LimitPairRun"/> it takes no shortcut in the arithmetic: the same
        /// operations in the same order as <see cref="LimitRun"/> and <see cref="Agree"/>, except the products
        /// by the unit weights, which are skipped (τ·1 is τ, bit for bit). Always writes the merge (no sign
        /// sum).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long LimitSmallRun<TL, TV, TN>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
            where TN : struct, IExpertCount
        {
            int w = TL.Count;
            long stop = WholeBlocksEnd(start, end, w);
            var limit0 = Limit<TL, TV>(0, start, 2 * w, ref stop);
            var limit1 = Limit<TL, TV>(1, start, 2 * w, ref stop);
            var limit2 = Limit<TL, TV>(2, start, 2 * w, ref stop);
            var limit3 = TN.Four ? Limit<TL, TV>(3, start, 2 * w, ref stop) : TL.Zero;
            var lambda = TL.Broadcast(_lambda);
            var signBit = TL.Broadcast(-0f);
            bool bySum = setup->BySum, scale = setup->Scale, fillPositive = Fill > 0;
            nint p0 = inputs.Experts[0], p1 = inputs.Experts[1], p2 = inputs.Experts[2], p3 = TN.Four ? inputs.Experts[3] : 0;
            bool bf0 = inputs.ExpertIsBf16[0], bf1 = inputs.ExpertIsBf16[1], bf2 = inputs.ExpertIsBf16[2];
            bool bf3 = TN.Four && inputs.ExpertIsBf16[3];
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                TL.Load(p0, bf0, i, out var x0, out var x1);
                var s0 = Kept<TL, TV>(TL.Subtract(x0, b0), limit0);
                var s1 = Kept<TL, TV>(TL.Subtract(x1, b1), limit0);
                TL.Load(p1, bf1, i, out x0, out x1);
                var t0 = Kept<TL, TV>(TL.Subtract(x0, b0), limit1);
                var t1 = Kept<TL, TV>(TL.Subtract(x1, b1), limit1);
                TL.Load(p2, bf2, i, out x0, out x1);
                var u0 = Kept<TL, TV>(TL.Subtract(x0, b0), limit2);
                var u1 = Kept<TL, TV>(TL.Subtract(x1, b1), limit2);
                TV v0 = TL.Zero, v1 = TL.Zero;
                if (TN.Four)
                {
                    TL.Load(p3, bf3, i, out x0, out x1);
                    v0 = Kept<TL, TV>(TL.Subtract(x0, b0), limit3);
                    v1 = Kept<TL, TV>(TL.Subtract(x1, b1), limit3);
                }

                TL.Store(output, outBf16, i,
                    TL.Add(b0, SmallMean<TL, TV, TN>(s0, t0, u0, v0, bySum, fillPositive, scale, lambda, signBit)),
                    TL.Add(b1, SmallMean<TL, TV, TN>(s1, t1, u1, v1, bySum, fillPositive, scale, lambda, signBit)));
            }

            return i;
        }

        /// <summary>The run loop for <paramref name="unit"/> experts of weight 1 (<see cref="UnitRunExperts"/>;
        /// 0 for the general loop) at lane width <typeparamref name="TL"/>; returns where it stopped.</summary>
        private long LimitRuns<TL, TV>(int unit, Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16, long* signSum)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged => unit switch
            {
                2 => LimitPairRun<TL, TV>(setup, inputs, start, end, output, outBf16),
                3 => LimitSmallRun<TL, TV, Three>(setup, inputs, start, end, output, outBf16),
                4 => LimitSmallRun<TL, TV, Four>(setup, inputs, start, end, output, outBf16),
                > 4 => LimitManyRun<TL, TV>(setup, inputs, start, end, output, outBf16),
                _ => LimitRun<TL, TV>(setup, inputs, start, end, output, outBf16, signSum),
            };

        /// <summary>
        /// <see cref="LimitRun"/> for five or more experts of weight 1 with the mean of the agreeing entries
        /// (TIES on many models), with the same bits: the general loop's flags are resolved before it, the
        /// experts' pointers are read from the inputs' own arrays, and the products by the unit weights are
        /// skipped (τ·1 is τ, bit for bit); otherwise the same operations in the same order as
        /// <see cref="LimitRun"/> and <see cref="Agree"/>. Always writes the merge (no sign sum).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long LimitManyRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            int experts = setup->Experts;
            long stop = WholeBlocksEnd(start, end, w);
            var limits = stackalloc TV[experts];
            var tau = stackalloc TV[2 * experts];
            for (int k = 0; k < experts; k++)
            {
                limits[k] = Limit<TL, TV>(k, start, 2 * w, ref stop);
            }

            var lambda = TL.Broadcast(_lambda);
            var signBit = TL.Broadcast(-0f);
            bool bySum = setup->BySum, scale = setup->Scale, fillPositive = Fill > 0;

            // The inputs' arrays in locals, read directly rather than through TaskVectorAt: with the helper
            // the JIT keeps them on the stack and reloads both in every expert's step (checked with
            // DOTNET_JitDisasm).
            nint* pointers = inputs.Experts;
            bool* bf16 = inputs.ExpertIsBf16;
            nint bse = inputs.Base;
            bool baseBf16 = inputs.BaseIsBf16;
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(bse, baseBf16, i, out var b0, out var b1);
                TV score0 = TL.Zero, score1 = TL.Zero;
                for (int k = 0; k < experts; k++)
                {
                    TL.Load(pointers[k], bf16[k], i, out var x0, out var x1);
                    var t0 = Kept<TL, TV>(TL.Subtract(x0, b0), limits[k]);
                    var t1 = Kept<TL, TV>(TL.Subtract(x1, b1), limits[k]);
                    tau[2 * k] = t0;
                    tau[(2 * k) + 1] = t1;
                    score0 = TL.Add(score0, Vote<TL, TV>(t0, bySum));
                    score1 = TL.Add(score1, Vote<TL, TV>(t1, bySum));
                }

                TL.Store(output, outBf16, i,
                    TL.Add(b0, ManyMean<TL, TV>(tau, experts, Elected<TL, TV>(score0, fillPositive, signBit), scale, lambda)),
                    TL.Add(b1, ManyMean<TL, TV>(tau + 1, experts, Elected<TL, TV>(score1, fillPositive, signBit), scale, lambda)));
            }

            return i;
        }

        /// <summary>The elected-sign mean of the masked task vectors at <paramref name="tau"/>,
        /// <paramref name="tau"/> + 2, … (<paramref name="experts"/> of them, weight 1), as <see cref="Agree"/>
        /// computes it: the agreeing count and sum from 0 up, the division by the count (at least 1), then λ.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV ManyMean<TL, TV>(TV* tau, int experts, TV positiveSign, bool scale, TV lambda)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            var merged = UnitAgreeingSum<TL, TV>(tau, experts, positiveSign, out var agreeing);
            merged = DivideByCount<TL, TV>(merged, agreeing);
            return scale ? TL.Multiply(merged, lambda) : merged;
        }

        /// <summary><paramref name="sum"/> / max(<paramref name="count"/>, 1): the mean of the agreeing entries,
        /// the sum itself (0 for finite inputs) where none agrees. For whole counts this is also the
        /// weight-normalised sum's divisor with unit weights (the count, or 1 where it is 0).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV DivideByCount<TL, TV>(TV sum, TV count)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            var one = TL.One;
            return TL.Divide(sum, TL.Select(TL.GreaterThan(count, one), count, one));
        }

        /// <summary>Σ_k τ_k·a_k and (into <paramref name="agreeing"/>) Σ_k a_k, each from 0 in expert order, of
        /// the masked task vectors of weight 1 at <paramref name="tau"/>, <paramref name="tau"/> + 2, …, where
        /// a_k is 1 where τ_k has the elected sign (<see cref="AgreeOne"/>) and 0 elsewhere.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV UnitAgreeingSum<TL, TV>(TV* tau, int experts, TV positiveSign, out TV agreeing)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            agreeing = TL.Zero;
            var merged = TL.Zero;
            for (int k = 0; k < experts; k++)
            {
                var s = tau[2 * k];
                var a = AgreeOne<TL, TV>(s, positiveSign);
                agreeing = TL.Add(agreeing, a);
                merged = TL.Add(merged, TL.Multiply(s, a));
            }

            return merged;
        }

        /// <summary>The elected-sign mean of three or four masked task vectors (<paramref name="v"/> unused
        /// for three), the operations of <see cref="LimitRun"/> and <see cref="Agree"/> for unit weights in
        /// their order: the score from 0 up, the agreeing count and sum from 0 up, the division by the
        /// count (at least 1), then λ.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV SmallMean<TL, TV, TN>(TV s, TV t, TV u, TV v, bool bySum, bool fillPositive, bool scale, TV lambda, TV signBit)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
            where TN : struct, IExpertCount
        {
            var zero = TL.Zero;
            var score = TL.Add(TL.Add(TL.Add(zero, Vote<TL, TV>(s, bySum)), Vote<TL, TV>(t, bySum)), Vote<TL, TV>(u, bySum));
            if (TN.Four)
            {
                score = TL.Add(score, Vote<TL, TV>(v, bySum));
            }

            var positiveSign = Elected<TL, TV>(score, fillPositive, signBit);
            var a = AgreeOne<TL, TV>(s, positiveSign);
            var b = AgreeOne<TL, TV>(t, positiveSign);
            var c = AgreeOne<TL, TV>(u, positiveSign);
            var agreeing = TL.Add(TL.Add(TL.Add(zero, a), b), c);
            var merged = TL.Add(TL.Add(TL.Add(zero, TL.Multiply(s, a)), TL.Multiply(t, b)), TL.Multiply(u, c));
            if (TN.Four)
            {
                var d = AgreeOne<TL, TV>(v, positiveSign);
                agreeing = TL.Add(agreeing, d);
                merged = TL.Add(merged, TL.Multiply(v, d));
            }

            merged = DivideByCount<TL, TV>(merged, agreeing);
            return scale ? TL.Multiply(merged, lambda) : merged;
        }

        /// <summary>An expert's term of the election score: τ itself (by sum) or its sign (by count).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Vote<TL, TV>(TV t, bool bySum)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged => bySum ? t : SignOf<TL, TV>(t);

        /// <summary>1 where τ has the elected sign, 0 otherwise. <paramref name="positiveSign"/> holds the
        /// sign bit where the elected sign is +1 (<see cref="Elected"/>):
        /// τ with its sign flipped there is below 0 exactly where τ &gt; 0 is elected +1 or τ &lt; 0 is
        /// elected −1 (a zero, of either sign, or a NaN is below 0 nowhere), so one compare decides.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV AgreeOne<TL, TV>(TV t, TV positiveSign)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged =>
            TL.Select(TL.LessThan(TL.FlipSign(t, positiveSign), TL.Zero), TL.One, TL.Zero);

        /// <summary>The sign bit (<paramref name="signBit"/>, −0's bits) where the elected sign is +1, 0 where
        /// it is −1: sign(score) with a zero (or NaN) score taking the fill's sign, read off the score with one
        /// comparison (the sign itself is never needed), in the form <see cref="AgreeOne"/> flips τ's sign by.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Elected<TL, TV>(TV score, bool fillPositive, TV signBit)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged =>
            fillPositive
                ? TL.Select(TL.LessThan(score, TL.Zero), TL.Zero, signBit)
                : TL.Select(TL.GreaterThan(score, TL.Zero), signBit, TL.Zero);

        /// <summary>τ masked by "magnitude key ≥ limit": the mask of every run loop with limits.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Kept<TL, TV>(TV t, TV limit)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged => Masked<TL, TV>(t, TL.MagnitudeAtLeast(t, limit));

        /// <summary>The elected-sign mean of two masked task vectors, as <see cref="LimitRun"/> and
        /// <see cref="Agree"/> compute it for two experts of weight 1, with three exact shortcuts:
        /// <list type="bullet">
        /// <item>the elected sign is only ever compared with 0, so "sign &gt; 0" is read off the score
        /// (with the fill for a zero or NaN score) instead of computing sign(score);</item>
        /// <item>a leading +0 in a sum only turns −0 into +0, which no comparison with 0 and no later
        /// count can see (it is kept in the merged sum, whose zero's sign reaches the output);</item>
        /// <item>the divisor is 1 or 2, and x/2 and x·0.5 are the same correctly rounded value.</item>
        /// </list></summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV PairMean<TL, TV>(TV s, TV t, bool bySum, bool fillPositive, bool scale, TV lambda)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            var zero = TL.Zero;
            var one = TL.One;
            var score = TL.Add(Vote<TL, TV>(s, bySum), Vote<TL, TV>(t, bySum));
            TV a, b;
            if (fillPositive)
            {
                // Elected positive unless the score is negative.
                var negative = TL.LessThan(score, zero);
                a = TL.Select(negative, TL.LessThan(s, zero), TL.GreaterThan(s, zero));
                b = TL.Select(negative, TL.LessThan(t, zero), TL.GreaterThan(t, zero));
            }
            else
            {
                // Elected positive only where the score is positive (the fill is −1 or 0).
                var positive = TL.GreaterThan(score, zero);
                a = TL.Select(positive, TL.GreaterThan(s, zero), TL.LessThan(s, zero));
                b = TL.Select(positive, TL.GreaterThan(t, zero), TL.LessThan(t, zero));
            }

            var merged = TL.Add(TL.Add(zero, TL.Multiply(s, TL.Select(a, one, zero))), TL.Multiply(t, TL.Select(b, one, zero)));
            // Both agree ⟺ the count is 2 (the mean of agreeing and the weight-normalised sum alike).
            merged = TL.Multiply(merged, TL.Select(a, TL.Select(b, TL.Broadcast(0.5f), one), one));
            return scale ? TL.Multiply(merged, lambda) : merged;
        }

        /// <summary>
        /// The weighted sum without sign election over the blocks of 2·lanes entries from
        /// <paramref name="start"/> to <paramref name="end"/>'s last whole block, where every expert's mask is
        /// "lo ≤ magnitude key &lt; hi": keep-all, drop-all, a key threshold, a top-k or a (row) rank window.
        /// Each expert's range holds for whole blocks up to the block holding one of its tie indices; that
        /// block takes a range per lane for the experts whose tie it holds (the range changes after the tie),
        /// and then their ranges are taken again. Returns the end of the last whole block. Same operations in
        /// the same order as the general loop, at either lane width (<typeparamref name="TL"/>).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long RangeRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, long row, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            int experts = setup->Experts;
            long last = WholeBlocksEnd(start, end, w);
            var lows = stackalloc TV[experts];
            var spans = stackalloc TV[experts];
            var stops = stackalloc long[experts];
            var weights = stackalloc TV[experts];
            var tieLows = stackalloc TV[2 * experts];
            var tieSpans = stackalloc TV[2 * experts];
            var laneLows = stackalloc uint[2 * w];
            var laneSpans = stackalloc uint[2 * w];
            long stop = last;
            for (int k = 0; k < experts; k++)
            {
                stop = Math.Min(stop, ExpertRange<TL, TV>(k, start, row, last, lows, spans, stops));
                weights[k] = TL.Broadcast(_weights[k]);
            }

            var zero = TL.Zero;
            var divisor = TL.Broadcast(_plainDivisor);
            var lambda = TL.Broadcast(_lambda);
            long i = start;
            while (true)
            {
                for (; i < stop; i += 2 * w)
                {
                    RangeBlock<TL, TV>(setup, inputs, i, lows, lows, spans, spans, 1, weights, zero, divisor, lambda, output, outBf16);
                }

                if (i >= last)
                {
                    return i;
                }

                // The block holds a tie index of some experts: their ranges per lane, the others' as they are.
                for (int k = 0; k < experts; k++)
                {
                    if (stops[k] == i)
                    {
                        LaneRanges(_rules[k], i, row, 2 * w, laneLows, laneSpans);
                        tieLows[2 * k] = TL.Read((float*)laneLows);
                        tieLows[(2 * k) + 1] = TL.Read((float*)laneLows + w);
                        tieSpans[2 * k] = TL.Read((float*)laneSpans);
                        tieSpans[(2 * k) + 1] = TL.Read((float*)laneSpans + w);
                    }
                    else
                    {
                        tieLows[2 * k] = tieLows[(2 * k) + 1] = lows[k];
                        tieSpans[2 * k] = tieSpans[(2 * k) + 1] = spans[k];
                    }
                }

                RangeBlock<TL, TV>(setup, inputs, i, tieLows, tieLows + 1, tieSpans, tieSpans + 1, 2, weights, zero, divisor, lambda, output, outBf16);
                long tie = i;
                i += 2 * w;
                stop = last;
                for (int k = 0; k < experts; k++)
                {
                    stop = Math.Min(stop, stops[k] == tie ? ExpertRange<TL, TV>(k, i, row, last, lows, spans, stops) : stops[k]);
                }
            }
        }

        /// <summary>One block of <see cref="RangeRun"/>: expert k's range is <paramref name="lows0"/>[k·stride] and
        /// <paramref name="spans0"/>[k·stride] for the block's first vector, the same at <paramref name="lows1"/> and
        /// <paramref name="spans1"/> for its second.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void RangeBlock<TL, TV>(Setup* setup, Streams inputs, long i, TV* lows0, TV* lows1, TV* spans0, TV* spans1, int stride, TV* weights,
            TV zero, TV divisor, TV lambda, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
            TV acc0 = zero, acc1 = zero;
            for (int k = 0; k < setup->Experts; k++)
            {
                TaskVectorAt<TL, TV>(inputs, k, i, b0, b1, out var t0, out var t1);
                TV weight = weights[k];
                t0 = Masked<TL, TV>(t0, TL.MagnitudeInRange(t0, lows0[k * stride], spans0[k * stride]));
                t1 = Masked<TL, TV>(t1, TL.MagnitudeInRange(t1, lows1[k * stride], spans1[k * stride]));
                acc0 = TL.Add(acc0, TL.Multiply(t0, weight));
                acc1 = TL.Add(acc1, TL.Multiply(t1, weight));
            }

            TL.Store(output, outBf16, i,
                TL.Add(b0, Finish<TL, TV>(setup, acc0, divisor, lambda)), TL.Add(b1, Finish<TL, TV>(setup, acc1, divisor, lambda)));
        }

        /// <summary>Expert <paramref name="k"/>'s key range for the blocks from <paramref name="start"/> into
        /// <paramref name="lows"/>[k] and <paramref name="spans"/>[k], and into <paramref name="stops"/>[k] (and the
        /// result) the block where it changes, or <paramref name="last"/>.</summary>
        private long ExpertRange<TL, TV>(int k, long start, long row, long last, TV* lows, TV* spans, long* stops)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            stops[k] = last;
            var (low, high) = KeyRange(_rules[k], start, row, 2 * TL.Count, ref stops[k]);
            lows[k] = TL.BroadcastBits(low);
            spans[k] = TL.BroadcastBits(high > low ? high - low : 0);
            return stops[k];
        }

        /// <summary>The key range of each of the <paramref name="count"/> entries from <paramref name="start"/> under
        /// rule <paramref name="r"/> (lowest key and span, as <see cref="KeyRange"/> gives them one entry at a time).
        /// A range holds up to and including the entry holding the next tie index, so it is taken at most once more
        /// per tie.</summary>
        private static void LaneRanges(Rule r, long start, long row, int count, uint* lows, uint* spans)
        {
            int j = 0;
            while (j < count)
            {
                long tie = start + count;
                var (low, high) = KeyRange(r, start + j, row, 1, ref tie);
                uint span = high > low ? high - low : 0;
                for (long through = Math.Min(tie - start, count - 1); j <= through; j++)
                {
                    lows[j] = low;
                    spans[j] = span;
                }
            }
        }

        /// <summary>
        /// The weighted sum without sign election when every expert's mask is DARE's random one (DARE on
        /// task arithmetic), over the blocks of 2·lanes entries from <paramref name="start"/> (even) to
        /// <paramref name="end"/>'s last whole block; returns where it stopped. Block by block, every expert
        /// in turn, as task arithmetic's loop goes: the sums stay in registers, and each expert's generator
        /// states are its first block's moved on by one running offset (the states are linear in the index),
        /// so besides the inputs and the output a block reads only each expert's constants (a few vectors on
        /// the stack, in the first-level cache) and writes nothing else. Each entry sums the experts
        /// in their order with the general loop's operations, so the bits are the same.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long RandomRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            int experts = setup->Experts;
            long stop = WholeBlocksEnd(start, end, w);
            var drops = stackalloc Drop<TL, TV>[experts];
            var weights = stackalloc TV[experts];
            DropConstants(start, experts, drops, weights);

            var zero = TL.Zero;
            var divisor = TL.Broadcast(_plainDivisor);
            var lambda = TL.Broadcast(_lambda);
            var step = TL.BroadcastWord(DropMask.StateStep(2 * w));
            var moved = zero; // the states' offset from the first block's: (blocks so far)·step, mod 2⁶⁴
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                TV acc0 = zero, acc1 = zero;
                for (int k = 0; k < experts; k++)
                {
                    DroppedAt(inputs, k, i, b0, b1, drops[k], moved, out var t0, out var t1);
                    acc0 = TL.Add(acc0, TL.Multiply(t0, weights[k]));
                    acc1 = TL.Add(acc1, TL.Multiply(t1, weights[k]));
                }

                moved = TL.AdvanceStates(moved, step);
                TL.Store(output, outBf16, i,
                    TL.Add(b0, Finish<TL, TV>(setup, acc0, divisor, lambda)), TL.Add(b1, Finish<TL, TV>(setup, acc1, divisor, lambda)));
            }

            return i;
        }

        /// <summary>Each expert's random rule from flat index <paramref name="start"/> and its broadcast weight,
        /// for the random loops.</summary>
        private void DropConstants<TL, TV>(long start, int experts, Drop<TL, TV>* drops, TV* weights)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            for (int k = 0; k < experts; k++)
            {
                drops[k] = new Drop<TL, TV>(_rules[k], start);
                weights[k] = TL.Broadcast(_weights[k]);
            }
        }

        /// <summary>Expert <paramref name="k"/>'s task vector at the block at <paramref name="i"/>, masked by
        /// its rule's generator states moved on by <paramref name="moved"/> and rescaled.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void DroppedAt<TL, TV>(Streams inputs, int k, long i, TV b0, TV b1, in Drop<TL, TV> drop, TV moved, out TV t0, out TV t1)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            TaskVectorAt<TL, TV>(inputs, k, i, b0, b1, out t0, out t1);
            t0 = Dropped<TL, TV>(t0, TL.AdvanceStates(drop.Low, moved), drop.Threshold, drop.Factor, drop.Divide, drop.Rescale);
            t1 = Dropped<TL, TV>(t1, TL.AdvanceStates(drop.High, moved), drop.Threshold, drop.Factor, drop.Divide, drop.Rescale);
        }

        /// <summary>One expert's random rule at lane width <typeparamref name="TL"/>, from flat index
        /// <c>i</c> (even): the generator states of the first 2·lanes entries (low and high half), the keep
        /// threshold and the rescale.</summary>
        private readonly struct Drop<TL, TV>
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            public Drop(Rule r, long i)
            {
                ulong first = DropMask.FirstState(r.Stream, i);
                Low = TL.RandomStates(first);
                High = TL.RandomStates(first + DropMask.StateStep(TL.Count));
                Threshold = TL.BroadcastBits(r.Threshold);
                Factor = TL.Broadcast(r.Factor);
                Divide = r.Divide;
                Rescale = r.Divide || r.Factor != 1f;
            }

            public TV Low { get; }

            public TV High { get; }

            public TV Threshold { get; }

            public TV Factor { get; }

            public bool Divide { get; }

            /// <summary>Whether survivors are divided or multiplied by <see cref="Factor"/> at all.</summary>
            public bool Rescale { get; }
        }

        /// <summary>τ times DARE's keep mask for <paramref name="states"/>, then the rescale: the general
        /// loop's <c>Sparsify</c> for a random rule, at lane width <typeparamref name="TL"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Dropped<TL, TV>(TV t, TV states, TV threshold, TV factor, bool divide, bool rescale)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            t = Masked<TL, TV>(t, TL.RandomKeep(states, threshold));
            return !rescale ? t : divide ? TL.Divide(t, factor) : TL.Multiply(t, factor);
        }

        /// <summary>
        /// DARE-TIES: every expert's mask is DARE's random one, followed by a sign election, over the blocks
        /// of 2·lanes entries from <paramref name="start"/> (even) to <paramref name="end"/>'s last whole
        /// block; returns where it stopped. Block by block, as <see cref="RandomRun"/> goes: each expert's
        /// masked, rescaled (and, when the election is on weighted values, weighted) task vector goes into a
        /// block buffer of 2·N vectors as its vote is counted, then the block's election and disjoint
        /// aggregation run as in <see cref="LimitRun"/>, at either lane width. Same operations per entry as
        /// the general loop, so the same bits. Always writes the merge (no sign sum). With
        /// <see cref="MaxExperts"/> experts its stack buffers take about 29 KiB at 512 bits.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private long RandomConsensusRun<TL, TV>(Setup* setup, Streams inputs, long start, long end, void* output, bool outBf16)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            int w = TL.Count;
            int experts = setup->Experts;
            long stop = WholeBlocksEnd(start, end, w);
            var block = stackalloc TV[2 * experts];
            var drops = stackalloc Drop<TL, TV>[experts];
            var weights = stackalloc TV[experts];
            DropConstants(start, experts, drops, weights);

            var zero = TL.Zero;
            var lambda = TL.Broadcast(_lambda);
            var step = TL.BroadcastWord(DropMask.StateStep(2 * w));
            var moved = zero; // the states' offset from the first block's: (blocks so far)·step, mod 2⁶⁴
            var signBit = TL.Broadcast(-0f);
            bool onWeighted = setup->OnWeighted;
            bool bySum = setup->BySum;
            bool fillPositive = Fill > 0;
            long i = start;
            for (; i < stop; i += 2 * w)
            {
                TL.Load(inputs.Base, inputs.BaseIsBf16, i, out var b0, out var b1);
                TV score0 = zero, score1 = zero;
                for (int k = 0; k < experts; k++)
                {
                    DroppedAt(inputs, k, i, b0, b1, drops[k], moved, out var t0, out var t1);
                    if (onWeighted)
                    {
                        t0 = TL.Multiply(t0, weights[k]);
                        t1 = TL.Multiply(t1, weights[k]);
                    }

                    block[2 * k] = t0;
                    block[(2 * k) + 1] = t1;
                    score0 = TL.Add(score0, Vote<TL, TV>(t0, bySum));
                    score1 = TL.Add(score1, Vote<TL, TV>(t1, bySum));
                }

                moved = TL.AdvanceStates(moved, step);
                TL.Store(output, outBf16, i,
                    TL.Add(b0, Agree<TL, TV>(setup, block, 0, Elected<TL, TV>(score0, fillPositive, signBit), weights, lambda)),
                    TL.Add(b1, Agree<TL, TV>(setup, block, 1, Elected<TL, TV>(score1, fillPositive, signBit), weights, lambda)));
            }

            return i;
        }

        /// <summary>The broadcast key limit of expert <paramref name="k"/>'s rule (a key threshold, keep-all,
        /// or a top-k away from its tie index) from <paramref name="start"/>: its range [low, 2^31) as
        /// "key ≥ low", or, for drop-all (an empty range), a limit above every key.</summary>
        private TV Limit<TL, TV>(int k, long start, int block, ref long stop)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            var (low, high) = KeyRange(_rules[k], start, 0, block, ref stop);
            return TL.BroadcastBits(high == 0 ? uint.MaxValue : low);
        }

        /// <summary>
        /// The key range [lo, hi) that rule <paramref name="r"/> keeps throughout the block of
        /// <paramref name="block"/> entries at flat index <paramref name="start"/>, with <paramref name="stop"/>
        /// lowered to the first later block in which that range changes (the block holding a tie index).
        /// </summary>
        private static (uint Low, uint High) KeyRange(Rule r, long start, long row, int block, ref long stop)
        {
            const uint all = 1u << 31; // above every magnitude key
            switch (r.Kind)
            {
                case RuleKind.KeepAll:
                    return (0, all);
                case RuleKind.DropAll:
                    return (0, 0);
                case RuleKind.KeyAtLeast:
                    return (r.Key, all);
                case RuleKind.Top:
                {
                    // Kept: key > K, or key = K at an index ≤ last.
                    uint key = (uint)(r.Upper >> 32);
                    return (Before(uint.MaxValue - (uint)r.Upper, start, start, block, ref stop) ? key : key + 1, all);
                }

                default:
                {
                    // Window and RowWindow: lower < (key, index) ≤ upper, indices within the row for the latter.
                    bool perRow = r.Kind == RuleKind.RowWindow;
                    long first = perRow ? start - row * r.Width : start;
                    ulong upper = perRow ? r.RowUpper![row] : r.Upper;
                    ulong lower = perRow ? r.RowLower![row] : r.Lower;
                    bool hasLower = perRow ? r.Low > 0 : r.HasLower;
                    uint upperKey = (uint)(upper >> 32);
                    uint high = Before((uint)upper, first, start, block, ref stop) ? upperKey + 1 : upperKey;
                    uint low = 0;
                    if (hasLower)
                    {
                        uint lowerKey = (uint)(lower >> 32);
                        low = Before((uint)lower, first, start, block, ref stop) ? lowerKey + 1 : lowerKey;
                    }

                    return (low, high);
                }
            }
        }

        /// <summary>Whether the block at rule index <paramref name="first"/> (flat index
        /// <paramref name="start"/>) lies at or before tie index <paramref name="tie"/>; if so, <paramref name="stop"/>
        /// is lowered to the flat start of the block that holds the tie.</summary>
        private static bool Before(long tie, long first, long start, int block, ref long stop)
        {
            if (first > tie)
            {
                return false;
            }

            stop = Math.Min(stop, start + (tie - first) / block * block);
            return true;
        }

        /// <summary>The last entries of a piece, copied into zero-padded float32 blocks of 2·lanes.</summary>
        private void Tail(Setup* setup, Streams inputs, long start, int count, long row, Vector<float>* tau, void* output, bool outBf16, long* signSum)
        {
            int w = Vector<float>.Count;
            int experts = Experts;
            var padded = stackalloc float[2 * w * (experts + 2)];
            new Span<float>(padded, 2 * w * (experts + 2)).Clear();
            var pointers = stackalloc nint[experts];
            var narrow = stackalloc bool[experts];
            for (int j = 0; j < count; j++)
            {
                padded[j] = At(inputs.Base, inputs.BaseIsBf16, start + j);
            }

            for (int k = 0; k < experts; k++)
            {
                var e = padded + 2 * w * (k + 1);
                for (int j = 0; j < count; j++)
                {
                    e[j] = At(inputs.Experts[k], inputs.ExpertIsBf16[k], start + j);
                }

                // Pointers offset so that entry `start` is read from the padded block.
                pointers[k] = (nint)(e - start);
            }

            var basePointer = (nint)(padded - start);
            Load(basePointer, false, start, out var b0, out var b1);
            for (int k = 0; k < experts; k++)
            {
                Load(pointers[k], false, start, out var e0, out var e1);
                tau[2 * k] = e0 - b0;
                tau[2 * k + 1] = e1 - b1;
                Sparsify(_rules[k], ref tau[2 * k], ref tau[2 * k + 1], start, row);
                if (setup->OnWeighted)
                {
                    tau[2 * k] *= setup->Weights[k];
                    tau[2 * k + 1] *= setup->Weights[k];
                }
            }

            if (signSum != null)
            {
                var raw = stackalloc float[2 * w];
                Vector.Store(RawSign(setup, tau, 0), raw);
                Vector.Store(RawSign(setup, tau, 1), raw + w);
                for (int j = 0; j < count; j++)
                {
                    *signSum += (long)raw[j];
                }

                return;
            }

            var result = padded + 2 * w * (experts + 1);
            Vector.Store(b0 + Merged(setup, tau, 0), result);
            Vector.Store(b1 + Merged(setup, tau, 1), result + w);
            for (int j = 0; j < count; j++)
            {
                if (outBf16)
                {
                    ((ushort*)output)[start + j] = Kernels.ToBFloat16(result[j]);
                }
                else
                {
                    ((float*)output)[start + j] = result[j];
                }
            }
        }

        /// <summary>τ·mask of <paramref name="r"/> (a rule of one tensor, random or not, not a row window and
        /// not yet rescaled) over the <paramref name="count"/> entries from flat index <paramref name="start"/> at
        /// <paramref name="values"/>, in place, 2·lanes at a time: the buffer must have room up to the next
        /// multiple of 2·lanes.</summary>
        public static void Mask(Rule r, float* values, long start, int count)
        {
            int w = Vector<float>.Count;
            for (int i = 0; i < count; i += 2 * w)
            {
                var t0 = Vector.Load(values + i);
                var t1 = Vector.Load(values + i + w);
                Sparsify(r, ref t0, ref t1, start + i, 0);
                Vector.Store(t0, values + i);
                Vector.Store(t1, values + i + w);
            }
        }

        /// <summary>τ·mask for 2·lanes entries starting at flat index <paramref name="index"/>, then the rescale.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Sparsify(Rule r, ref Vector<float> t0, ref Vector<float> t1, long index, long row)
        {
            int w = Vector<float>.Count;
            Vector<uint> keep0, keep1;
            switch (r.Kind)
            {
                case RuleKind.KeepAll:
                    return;
                case RuleKind.DropAll:
                    // τ·0, then any L1 factor: NaN where τ held a NaN or ∞, as the sparsifiers' rescale gives.
                    keep0 = keep1 = Vector<uint>.Zero;
                    break;
                case RuleKind.KeyAtLeast:
                {
                    var limit = new Vector<uint>(r.Key);
                    keep0 = Vector.GreaterThanOrEqual(Magnitude(t0), limit);
                    keep1 = Vector.GreaterThanOrEqual(Magnitude(t1), limit);
                    break;
                }

                case RuleKind.Top:
                {
                    // Kept: key > K, or key = K at an index ≤ last. Away from `last` that is key ≥ K (before
                    // it) or key ≥ K + 1 (after it; K is a magnitude, below 2^31, so K + 1 does not wrap).
                    uint k = (uint)(r.Upper >> 32);
                    long lastIndex = uint.MaxValue - (uint)r.Upper;
                    if (index + 2 * w - 1 <= lastIndex || index > lastIndex)
                    {
                        var limit = new Vector<uint>(index > lastIndex ? k + 1 : k);
                        keep0 = Vector.GreaterThanOrEqual(Magnitude(t0), limit);
                        keep1 = Vector.GreaterThanOrEqual(Magnitude(t1), limit);
                        break;
                    }

                    var key = new Vector<uint>(k);
                    var last = new Vector<uint>(uint.MaxValue - (uint)r.Upper);
                    var i0 = new Vector<uint>((uint)index) + Vector<uint>.Indices;
                    var i1 = i0 + new Vector<uint>((uint)w);
                    var k0 = Magnitude(t0);
                    var k1 = Magnitude(t1);
                    keep0 = Vector.GreaterThan(k0, key) | (Vector.Equals(k0, key) & Vector.LessThanOrEqual(i0, last));
                    keep1 = Vector.GreaterThan(k1, key) | (Vector.Equals(k1, key) & Vector.LessThanOrEqual(i1, last));
                    break;
                }

                case RuleKind.Window:
                case RuleKind.RowWindow:
                {
                    bool perRow = r.Kind == RuleKind.RowWindow;
                    ulong upper = perRow ? r.RowUpper![row] : r.Upper;
                    ulong lower = perRow ? r.RowLower![row] : r.Lower;
                    bool hasLower = perRow ? r.Low > 0 : r.HasLower;
                    uint first = (uint)(perRow ? index - row * r.Width : index);
                    var i0 = new Vector<uint>(first) + Vector<uint>.Indices;
                    var i1 = i0 + new Vector<uint>((uint)w);
                    keep0 = InWindow(Magnitude(t0), i0, upper, hasLower, lower);
                    keep1 = InWindow(Magnitude(t1), i1, upper, hasLower, lower);
                    break;
                }

                case RuleKind.Random:
                    (keep0, keep1) = DropMask.KeepMasks(r.Stream, r.Threshold, index);
                    break;
                default:
                    throw new InvalidOperationException($"Unknown rule {r.Kind}.");
            }

            t0 = Masked(t0, keep0);
            t1 = Masked(t1, keep1);
            if (r.Divide)
            {
                var f = new Vector<float>(r.Factor);
                t0 /= f;
                t1 /= f;
            }
            else if (r.Factor != 1f)
            {
                var f = new Vector<float>(r.Factor);
                t0 *= f;
                t1 *= f;
            }
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<uint> Magnitude(Vector<float> t) => Vector.AsVectorUInt32(t) & new Vector<uint>(FloatKeys.MagnitudeMask);

        /// <summary>τ·mask as libtorch computes it: kept lanes times 1, dropped ones times 0 (so a dropped
        /// NaN or ∞ still gives NaN, and a dropped negative −0).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<float> Masked(Vector<float> t, Vector<uint> keep) =>
            Masked<VectorLanes, Vector<float>>(t, Vector.AsVectorSingle(keep));

        /// <summary><see cref="Masked(Vector{float}, Vector{uint})"/> at lane width <typeparamref name="TL"/>,
        /// <paramref name="keep"/> all ones or zero per lane.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Masked<TL, TV>(TV t, TV keep)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged => TL.Multiply(t, TL.Select(keep, TL.One, TL.Zero));

        /// <summary>τ = θ_k − θ_base for the 2·lanes entries of expert <paramref name="k"/> from
        /// <paramref name="i"/>, given the base's (<paramref name="b0"/>, <paramref name="b1"/>), at lane
        /// width <typeparamref name="TL"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void TaskVectorAt<TL, TV>(Streams inputs, int k, long i, TV b0, TV b1, out TV t0, out TV t1)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            TL.Load(inputs.Experts[k], inputs.ExpertIsBf16[k], i, out var e0, out var e1);
            t0 = TL.Subtract(e0, b0);
            t1 = TL.Subtract(e1, b1);
        }

        /// <summary>lower &lt; (key, index) ≤ upper, composites compared as (key, index) pairs.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<uint> InWindow(Vector<uint> key, Vector<uint> index, ulong upper, bool hasLower, ulong lower)
        {
            var uKey = new Vector<uint>((uint)(upper >> 32));
            var keep = Vector.LessThan(key, uKey) | (Vector.Equals(key, uKey) & Vector.LessThanOrEqual(index, new Vector<uint>((uint)upper)));
            if (hasLower)
            {
                var lKey = new Vector<uint>((uint)(lower >> 32));
                keep &= Vector.GreaterThan(key, lKey) | (Vector.Equals(key, lKey) & Vector.GreaterThan(index, new Vector<uint>((uint)lower)));
            }

            return keep;
        }

        /// <summary>The elected sign before the zero rule, for half <paramref name="half"/> of the entries.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<float> RawSign(Setup* setup, Vector<float>* tau, int half) =>
            SignOf<VectorLanes, Vector<float>>(Score(setup, tau, half));

        /// <summary>The election score (Σ τ or Σ sign τ over the experts) of half <paramref name="half"/> of the entries.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<float> Score(Setup* setup, Vector<float>* tau, int half)
        {
            var score = Vector<float>.Zero;
            for (int k = 0; k < setup->Experts; k++)
            {
                // With an election on weighted task vectors, tau already holds τ·w.
                var elect = tau[2 * k + half];
                score += Vote<VectorLanes, Vector<float>>(elect, setup->BySum);
            }

            return score;
        }

        /// <summary>The plain weighted sum's divisor and λ.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<float> Finish(Setup* setup, Vector<float> merged) =>
            Finish<VectorLanes, Vector<float>>(setup, merged, setup->PlainDivisor, setup->Lambda);

        /// <summary><see cref="Finish(Setup*, Vector{float})"/> at lane width <typeparamref name="TL"/>, with
        /// the divisor and λ broadcast to it.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Finish<TL, TV>(Setup* setup, TV merged, TV divisor, TV lambda)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            if (setup->PlainNormalize)
            {
                merged = TL.Divide(merged, divisor);
            }

            return setup->Scale ? TL.Multiply(merged, lambda) : merged;
        }

        /// <summary>Weights, sign consensus and aggregation, then λ: the merged task vector for half
        /// <paramref name="half"/> of 2·lanes entries.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector<float> Merged(Setup* setup, Vector<float>* tau, int half)
        {
            var merged = Vector<float>.Zero;
            int experts = setup->Experts;
            if (!setup->Consensus)
            {
                for (int k = 0; k < experts; k++)
                {
                    merged += tau[2 * k + half] * setup->Weights[k];
                }

                if (setup->PlainNormalize)
                {
                    merged /= setup->PlainDivisor;
                }
            }
            else
            {
                var positiveSign = Elected<VectorLanes, Vector<float>>(Score(setup, tau, half), setup->FillPositive, new Vector<float>(-0f));
                return Agree<VectorLanes, Vector<float>>(setup, tau, half, positiveSign, setup->Weights, setup->Lambda);
            }

            if (setup->Scale)
            {
                merged *= setup->Lambda;
            }

            return merged;
        }

        /// <summary>The disjoint aggregation of the entries that agree with the elected sign, +1 where
        /// <paramref name="positiveSign"/> holds the sign bit and −1 elsewhere (<see cref="Elected"/>), then λ,
        /// at lane width <typeparamref name="TL"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static TV Agree<TL, TV>(Setup* setup, TV* tau, int half, TV positiveSign, TV* weights, TV lambda)
            where TL : struct, ISimdLanes<TV>
            where TV : unmanaged
        {
            var zero = TL.Zero;
            var divisor = zero; // Σ w·a, for weight normalisation with weights other than 1
            bool unit = setup->UnitWeights; // s·1 = s and Σ 1·a = Σ a exactly: the products are skipped
            TV merged, agreeing;
            if (unit)
            {
                merged = UnitAgreeingSum<TL, TV>(tau + half, setup->Experts, positiveSign, out agreeing);
            }
            else
            {
                merged = agreeing = zero;
                bool onWeighted = setup->OnWeighted;
                for (int k = 0; k < setup->Experts; k++)
                {
                    var s = tau[2 * k + half];
                    var a = AgreeOne<TL, TV>(s, positiveSign);
                    agreeing = TL.Add(agreeing, a);
                    var w = weights[k];
                    var weighted = onWeighted ? s : TL.Multiply(s, w);
                    merged = TL.Add(merged, TL.Multiply(weighted, a));
                    divisor = TL.Add(divisor, TL.Multiply(w, a));
                }
            }

            if (setup->MeanOfAgreeing || (unit && setup->WeightNormalized))
            {
                merged = DivideByCount<TL, TV>(merged, agreeing); // unit weights: their sum is the count
            }
            else if (setup->WeightNormalized)
            {
                merged = TL.Divide(merged, TL.Select(TL.EqualTo(divisor, zero), TL.One, divisor));
            }

            return setup->Scale ? TL.Multiply(merged, lambda) : merged;
        }
    }

    /// <summary>What one kernel call needs in the inner loop, hoisted out of the pipeline's objects.</summary>
    private struct Setup
    {
        public int Experts;
        public Vector<float>* Weights;
        public bool Consensus, OnWeighted, BySum, MeanOfAgreeing, WeightNormalized, PlainNormalize, Scale;

        /// <summary>Every expert's weight is exactly 1.</summary>
        public bool UnitWeights;
        public Vector<float> PlainDivisor, Lambda;

        /// <summary>A zero (or NaN) election score elects + (<c>Kernel.Elected</c>'s fill).</summary>
        public bool FillPositive;
    }

    /// <summary>The raw input pointers of one kernel call: the base and each expert, float32 or bfloat16.</summary>
    private readonly struct Streams(nint* experts, bool* expertIsBf16, nint bse, bool baseIsBf16)
    {
        public nint* Experts { get; } = experts;

        public bool* ExpertIsBf16 { get; } = expertIsBf16;

        public nint Base { get; } = bse;

        public bool BaseIsBf16 { get; } = baseIsBf16;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Load(nint p, bool bf16, long i, out Vector<float> low, out Vector<float> high) =>
        VectorLanes.Load(p, bf16, i, out low, out high);

    private static float At(nint p, bool bf16, long i) =>
        bf16 ? BitConverter.UInt32BitsToSingle((uint)((ushort*)p)[i] << 16) : ((float*)p)[i];

    /// <summary>torch.sign: 1, −1, or 0 (for ±0 and NaN).</summary>
    private static float Sign(float x) => (x > 0 ? 1f : 0f) - (x < 0 ? 1f : 0f);

    /// <summary>torch.sign at lane width <typeparamref name="TL"/>: 1, −1, or 0 (for ±0 and NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static TV SignOf<TL, TV>(TV x)
        where TL : struct, ISimdLanes<TV>
        where TV : unmanaged =>
        TL.Subtract(TL.Select(TL.GreaterThan(x, TL.Zero), TL.One, TL.Zero), TL.Select(TL.LessThan(x, TL.Zero), TL.One, TL.Zero));

    /// <summary>
    /// Task arithmetic (Σ_k (θ_k − θ_base)·w_k, ÷ divisor, ·λ, + θ_base) and weight averaging (θ_0·w_0,
    /// then fused multiply-adds of θ_k·w_k, ÷ divisor) as one streaming pass: each input is read once,
    /// 16 entries at a time, the sum stays in registers, and the result is stored in the output dtype.
    /// </summary>
    private sealed class StreamLoop(CpuFloats? bse, CpuFloats[] experts, float[] weights, bool average)
    {
        private const int Chunk = 1 << 16;

        public float Divisor { get; init; } = 1f;

        public bool Normalize { get; init; }

        public float Lambda { get; init; } = 1f;

        public bool Scale { get; init; }

        /// <remarks>Every input takes part in every result, multiplied by a finite coefficient and summed, so a
        /// NaN or ±∞ anywhere in the inputs makes that result NaN or ±∞. A loop whose results are all finite
        /// (in float32, before any rounding to the output's dtype) has therefore read only finite inputs, and
        /// vouches for them (<see cref="FiniteWitness"/>).</remarks>
        public Tensor Run(long n, long[] shape, ScalarType outputType)
        {
            int count = experts.Length;
            var pointers = experts.Select(e => (nint)e.Pointer).ToArray();
            var narrow = experts.Select(e => e.IsBFloat16).ToArray();
            int nonFinite = 0;
            var result = CpuTensors.WriteKernelResult(shape, outputType, (address, bf16) =>
            {
                var output = (void*)address;
                CpuParallel.For(CpuParallel.BlockCount(n, Chunk), b =>
                {
                    long start = b * Chunk;
                    long end = Math.Min(n, start + Chunk);
                    fixed (nint* p = pointers)
                    fixed (bool* isBf16 = narrow)
                    fixed (float* w = weights)
                    {
                        if (Loop(p, isBf16, w, count, start, end, output, bf16) >= FloatKeys.NonFiniteMagnitude)
                        {
                            Volatile.Write(ref nonFinite, 1);
                        }
                    }
                });
            });

            if (nonFinite == 0 && FiniteWitness.Listening)
            {
                foreach (var x in bse is { } b ? experts.Append(b) : experts)
                {
                    FiniteWitness.Vouch(x);
                }
            }

            return result;
        }

        /// <summary>Entries [start, end); returns the largest magnitude key of the float32 results.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private uint Loop(nint* p, bool* isBf16, float* w, int count, long start, long end, void* output, bool outBf16)
        {
            var top = Vector<uint>.Zero;
            var magnitude = new Vector<uint>(FloatKeys.MagnitudeMask);
            int width = Vector<float>.Count;
            var divisor = new Vector<float>(Divisor);
            var lambda = new Vector<float>(Lambda);
            bool hasBase = bse is not null;
            var b = bse.GetValueOrDefault();
            long i = start;
            for (; i + 2 * width <= end; i += 2 * width)
            {
                Vector<float> b0 = default, b1 = default, acc0, acc1;
                if (hasBase)
                {
                    Load((nint)b.Pointer, b.IsBFloat16, i, out b0, out b1);
                }

                if (average)
                {
                    Load(p[0], isBf16[0], i, out var e0, out var e1);
                    var w0 = new Vector<float>(w[0]);
                    acc0 = e0 * w0;
                    acc1 = e1 * w0;
                    for (int k = 1; k < count; k++)
                    {
                        Load(p[k], isBf16[k], i, out e0, out e1);
                        var wk = new Vector<float>(w[k]);
                        acc0 = Vector.FusedMultiplyAdd(e0, wk, acc0);
                        acc1 = Vector.FusedMultiplyAdd(e1, wk, acc1);
                    }
                }
                else
                {
                    acc0 = acc1 = Vector<float>.Zero;
                    for (int k = 0; k < count; k++)
                    {
                        Load(p[k], isBf16[k], i, out var e0, out var e1);
                        var wk = new Vector<float>(w[k]);
                        acc0 += (e0 - b0) * wk;
                        acc1 += (e1 - b1) * wk;
                    }
                }

                if (Normalize)
                {
                    acc0 /= divisor;
                    acc1 /= divisor;
                }

                if (Scale)
                {
                    acc0 *= lambda;
                    acc1 *= lambda;
                }

                if (hasBase)
                {
                    acc0 = b0 + acc0;
                    acc1 = b1 + acc1;
                }

                top = Vector.Max(top, Vector.Max(Vector.AsVectorUInt32(acc0) & magnitude, Vector.AsVectorUInt32(acc1) & magnitude));
                Store(output, outBf16, i, acc0, acc1);
            }

            uint largest = Kernels.Largest(top);

            for (; i < end; i++)
            {
                float bi = hasBase ? b.At(i) : 0f, acc;
                if (average)
                {
                    acc = At(p[0], isBf16[0], i) * w[0];
                    for (int k = 1; k < count; k++)
                    {
                        acc = MathF.FusedMultiplyAdd(At(p[k], isBf16[k], i), w[k], acc);
                    }
                }
                else
                {
                    acc = 0f;
                    for (int k = 0; k < count; k++)
                    {
                        acc += (At(p[k], isBf16[k], i) - bi) * w[k];
                    }
                }

                if (Normalize)
                {
                    acc /= Divisor;
                }

                if (Scale)
                {
                    acc *= Lambda;
                }

                if (hasBase)
                {
                    acc = bi + acc;
                }

                largest = Math.Max(largest, FloatKeys.Magnitude(acc));
                if (outBf16)
                {
                    ((ushort*)output)[i] = Kernels.ToBFloat16(acc);
                }
                else
                {
                    ((float*)output)[i] = acc;
                }
            }

            return largest;
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Store(void* output, bool bf16, long i, Vector<float> low, Vector<float> high) =>
            VectorLanes.Store(output, bf16, i, low, high);
    }

    // ---- Element loops ----------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Subtract(float* a, float* b, float* result, int count)
    {
        int i = 0;
        for (; i <= count - Vector<float>.Count; i += Vector<float>.Count)
        {
            Vector.Store(Vector.Load(a + i) - Vector.Load(b + i), result + i);
        }

        for (; i < count; i++)
        {
            result[i] = a[i] - b[i];
        }
    }

}
