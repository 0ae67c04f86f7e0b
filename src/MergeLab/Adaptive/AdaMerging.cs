using MergeLab.Selection;
using MergeLab.Tensors;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MergeLab.Adaptive;

/// <summary>Whether AdaMerging learns one coefficient per task or one per task per layer.</summary>
public enum AdaMergingGranularity
{
    /// <summary>One λ_t per task for every parameter (the paper's task-wise AdaMerging, Eq. 4).</summary>
    TaskWise,

    /// <summary>One λ_{t,l} per task per layer (the paper's layer-wise AdaMerging, Eq. 5), where a
    /// layer is a group of parameter names (<see cref="AdaMergingOptions.LayerOf"/>).</summary>
    LayerWise,
}

/// <summary>Options of <see cref="AdaMerging"/>. The defaults are the paper's and its reference code's
/// (<c>EnnengYang/AdaMerging</c>, <c>src/main_layer_wise_adamerging.py</c>).</summary>
public sealed record AdaMergingOptions
{
    /// <summary>Task-wise or layer-wise. Default <see cref="AdaMergingGranularity.LayerWise"/> (the
    /// paper's better variant).</summary>
    public AdaMergingGranularity Granularity { get; init => field = MergeLab.Options.Defined(value, nameof(Granularity)); } = AdaMergingGranularity.LayerWise;

    /// <summary>The initial λ of every task and layer (the reference's <c>prior</c>). Default 0.3; finite,
    /// and within [<see cref="ClampMin"/>, <see cref="ClampMax"/>] (checked when <see cref="AdaMerging"/> is created).</summary>
    public double InitialCoefficient
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(InitialCoefficient));
            field = value;
        }
    } = 0.3;

    /// <summary>Adam's learning rate. Default 1e-3; in (0, ∞).</summary>
    public double LearningRate
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(LearningRate), 0, double.MaxValue, minInclusive: false);
            field = value;
        }
    } = 1e-3;

    /// <summary>Adam's β₁. Default 0.9; in [0, 1).</summary>
    public double Beta1
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Beta1), 0, 1, maxInclusive: false);
            field = value;
        }
    } = 0.9;

    /// <summary>Adam's β₂. Default 0.999; in [0, 1).</summary>
    public double Beta2
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Beta2), 0, 1, maxInclusive: false);
            field = value;
        }
    } = 0.999;

    /// <summary>Adam's ε. Default 1e-8 (PyTorch's); in (0, 1].</summary>
    public double Epsilon
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Epsilon), 0, 1, minInclusive: false);
            field = value;
        }
    } = 1e-8;

    /// <summary>The number of Adam steps. Default 500 (the paper); ≥ 0. Each step takes one batch of
    /// every task.</summary>
    public int Steps
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(Steps), 0, int.MaxValue);
            field = value;
        }
    } = 500;

    /// <summary>The lower bound λ is clamped to in the forward pass. Default 0.</summary>
    public double ClampMin
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(ClampMin));
            field = value;
        }
    }

    /// <summary>The upper bound λ is clamped to in the forward pass. Default 1; at least
    /// <see cref="ClampMin"/>.</summary>
    public double ClampMax
    {
        get;
        init
        {
            MergeLab.Options.RequireFinite(value, nameof(ClampMax));
            field = value;
        }
    } = 1.0;

    /// <summary>For layer-wise merging: the layer of a parameter name. Null (default):
    /// <see cref="ParameterLayers.ModulePrefix"/>, so a module's weight and bias share one λ (the
    /// reference has one λ per parameter tensor; pass <c>name =&gt; name</c> for that).</summary>
    public Func<string, string>? LayerOf { get; init; }

    /// <summary>
    /// The weight w of a class-balance term, an extension beyond the paper: each task's loss becomes
    /// mean_i H(p_i) − w·H(mean_i p_i) over its batch, the information-maximisation objective of SHOT
    /// (Liang et al., ICML 2020), so predictions are pushed to be confident and, across the batch, spread
    /// over the classes. Default 0: the paper's loss, entropy alone. Entropy alone can be lowered by
    /// predicting few classes confidently and wrongly; a positive weight resists that, and assumes the
    /// classes of a batch are roughly balanced. The batch mean needs batches of many examples per class:
    /// with a batch of one, H(mean) = H(p) and the loss is (1 − w)·H, which for w &gt; 1 pushes predictions
    /// towards uniform. Since H(mean) ≥ mean H, the loss (and so <see cref="AdaMergingResult.EntropyHistory"/>)
    /// is at most 0 from w = 1 on. Needs logits of rank 2, [batch, classes]. Finite and at least 0.
    /// </summary>
    public double DiversityWeight
    {
        get;
        init
        {
            MergeLab.Options.RequireInRange(value, nameof(DiversityWeight), 0, double.MaxValue);
            field = value;
        }
    }

    /// <summary>Seeds the order in which each task's batches are visited (reshuffled after each pass,
    /// as the reference's shuffled loader). Default 0. Results are identical for identical inputs, seed
    /// and thread count.</summary>
    public int Seed { get; init; }
}

/// <summary>Progress of <see cref="AdaMerging.Learn"/>: the step just finished and the loss it
/// measured (before its update).</summary>
/// <param name="Step">Steps done, 1-based.</param>
/// <param name="Steps">Steps in all.</param>
/// <param name="Entropy">The loss at this step: Σ_t mean entropy of task t's predictions (less
/// <see cref="AdaMergingOptions.DiversityWeight"/> times Σ_t the entropy of their batch mean, when it is set).</param>
public readonly record struct AdaMergingProgress(int Step, int Steps, double Entropy);

/// <summary>What <see cref="AdaMerging.Learn"/> returns: the coefficients, the merged weights and the
/// loss at every step. Owns <see cref="Merged"/>; dispose it.</summary>
public sealed class AdaMergingResult : IDisposable
{
    internal AdaMergingResult(LayerCoefficients coefficients, LayerCoefficients initial, StateDict merged, IReadOnlyList<double> entropy)
    {
        Coefficients = coefficients;
        InitialCoefficients = initial;
        Merged = merged;
        EntropyHistory = entropy;
    }

    /// <summary>The learned λ as used in the forward pass (clamped to [ClampMin, ClampMax]).</summary>
    public LayerCoefficients Coefficients { get; }

    /// <summary>The coefficients the optimisation started from.</summary>
    public LayerCoefficients InitialCoefficients { get; }

    /// <summary>The module's full state dict with the merged parameters θ0 + Σ_t λ_t·τ_t (every
    /// tensor the task vectors do not cover is the module's own).</summary>
    public StateDict Merged { get; }

    /// <summary>The loss at each step, measured before that step's update: Σ_t mean entropy (less
    /// <see cref="AdaMergingOptions.DiversityWeight"/> times Σ_t the entropy of the batch-mean prediction,
    /// when it is set).</summary>
    public IReadOnlyList<double> EntropyHistory { get; }

    /// <summary>Disposes <see cref="Merged"/>.</summary>
    public void Dispose() => Merged.Dispose();
}

/// <summary>
/// AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"):
/// learns the task-arithmetic coefficients of θ = θ0 + Σ_t λ_t·τ_t, task-wise or layer-wise, by
/// minimising the Shannon entropy of the merged model's predictions on unlabeled test batches, with
/// Adam. AdaMerging++ is the same over TIES-selected task vectors (<see cref="TiesSelection"/>).
/// </summary>
/// <remarks>
/// <para>Follows the reference code: λ starts at 0.3, is clamped to [0, 1] in the forward pass only
/// (the raw value is what Adam updates, and a raw value outside the bounds gets no gradient, as
/// <c>torch.clamp</c>'s backward), the loss is Σ_t mean_batch H(softmax(logits_t)) with each task's own
/// head, Adam(lr 1e-3, β = (0.9, 0.999)), 500 steps. The reference takes two batches of 16 per task per
/// step; here each step takes the next of the caller's batches for every task, so the batch size is
/// the caller's.</para>
/// <para>Beyond the paper, <see cref="AdaMergingOptions.DiversityWeight"/> adds a class-balance term
/// (off by default): on models whose entropy falls as their predictions become confidently wrong, it
/// keeps each task's batch from collapsing onto a few classes.</para>
/// <para>No functional rewrite of the module is needed: the merged parameters are linear in λ, so
/// ∂L/∂λ_{t,l} = Σ_{p ∈ l} ⟨∂L/∂θ_p, τ_{t,p}⟩. Each step copies θ(λ) into the module's parameters,
/// runs the forward and backward passes for the parameter gradients, and takes those inner products.
/// Adam runs in double precision on the coefficients (PyTorch's update rule).</para>
/// </remarks>
public sealed class AdaMerging
{
    /// <summary>The layer name used for the single coefficient column of task-wise merging.</summary>
    public const string AllParametersLayer = "*";

    /// <summary>Creates the method; default options are the paper's (layer-wise).</summary>
    /// <exception cref="ArgumentException">ClampMin exceeds ClampMax, or InitialCoefficient lies outside
    /// [ClampMin, ClampMax] (where the clamp passes no gradient, so the coefficients could never move).</exception>
    public AdaMerging(AdaMergingOptions? options = null)
    {
        Options = options ?? new AdaMergingOptions();
        if (Options.ClampMin > Options.ClampMax)
        {
            throw new ArgumentException(
                $"ClampMin ({MergeLab.Options.Format(Options.ClampMin)}) exceeds ClampMax ({MergeLab.Options.Format(Options.ClampMax)}).", nameof(options));
        }

        if (Options.InitialCoefficient < Options.ClampMin || Options.InitialCoefficient > Options.ClampMax)
        {
            throw new ArgumentException(
                $"InitialCoefficient ({MergeLab.Options.Format(Options.InitialCoefficient)}) lies outside [ClampMin, ClampMax] = " +
                $"[{MergeLab.Options.Format(Options.ClampMin)}, {MergeLab.Options.Format(Options.ClampMax)}]: " +
                "the clamp passes no gradient there, so the coefficients would never move.", nameof(options));
        }
    }

    /// <summary>The options this instance was created with.</summary>
    public AdaMergingOptions Options { get; }

    /// <summary>
    /// Learns the coefficients. The module must hold the pretrained weights θ0 when called; it is put
    /// in evaluation mode for the run and left with its original weights, the training mode of each of
    /// its submodules and its <c>requires_grad</c> flags afterwards. Gradients are enabled for the run,
    /// also when the caller is inside <c>torch.no_grad()</c>.
    /// </summary>
    /// <param name="module">The model whose parameters are merged (e.g. a shared backbone). Every name in
    /// the task vectors must be one of its parameters or floating-point buffers (buffers are merged with
    /// their layer's λ but give no gradient).</param>
    /// <param name="taskVectors">τ_t = θ_t − θ0 per task, all with the same names and shapes.</param>
    /// <param name="unlabeledBatches">For each task, its unlabeled input batches (on the module's
    /// device). Each step uses the next batch of every task; each pass over a task's batches visits them
    /// in a freshly seeded order.</param>
    /// <param name="taskLogits">Maps the module's output for a batch of task t to task t's logits
    /// [batch, classes] (e.g. applies task t's classification head). Its own parameters are not learned.</param>
    /// <param name="progress">Receives each finished step and its entropy.</param>
    /// <param name="cancellationToken">Checked before each step.</param>
    /// <returns>The learned coefficients and the merged state dict.</returns>
    /// <exception cref="ArgumentException">The counts disagree, a task vector is null, a task has no batches,
    /// a task-vector name is not a parameter or buffer of the module (the message names it) or its shape differs
    /// from the module's tensor of that name, the task
    /// vectors name no parameter at all (buffers alone give no gradient), a task's loss does not depend on
    /// the module's merged parameters (e.g. <paramref name="taskLogits"/> detaches the output), or the loss
    /// is not finite because a task vector, a batch used or the module's own weights hold NaN or ∞ (the
    /// message names the tensor and the step).</exception>
    /// <exception cref="MergeException">The task vectors disagree in names or shapes.</exception>
    /// <exception cref="InvalidOperationException">The loss or its gradient became NaN or ∞ with finite
    /// inputs (the coefficients diverged, or the module produces non-finite logits); the message names the step.</exception>
    public AdaMergingResult Learn(nn.Module<Tensor, Tensor> module, IReadOnlyList<TaskVector> taskVectors,
        IReadOnlyList<IReadOnlyList<Tensor>> unlabeledBatches, Func<Tensor, int, Tensor> taskLogits,
        IProgress<AdaMergingProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(taskVectors);
        ArgumentNullException.ThrowIfNull(unlabeledBatches);
        ArgumentNullException.ThrowIfNull(taskLogits);
        int taskCount = taskVectors.Count;
        if (taskCount == 0)
        {
            throw new ArgumentException("AdaMerging needs at least one task vector.", nameof(taskVectors));
        }

        if (unlabeledBatches.Count != taskCount)
        {
            throw new ArgumentException($"There are {taskCount} task vectors but batches for {unlabeledBatches.Count} tasks.", nameof(unlabeledBatches));
        }

        for (int t = 0; t < taskCount; t++)
        {
            if (unlabeledBatches[t] is not { Count: > 0 })
            {
                throw new ArgumentException($"Task {t} has no unlabeled batches.", nameof(unlabeledBatches));
            }
        }

        StateDictChecks.CheckTaskVectors(taskVectors, nameof(taskVectors));
        var names = taskVectors[0].Names;
        if (names.Count == 0)
        {
            throw new ArgumentException("The task vectors have no tensors.", nameof(taskVectors));
        }

        Func<string, string> layerOf = Options.Granularity == AdaMergingGranularity.TaskWise
            ? _ => AllParametersLayer
            : Options.LayerOf ?? ParameterLayers.ModulePrefix;
        var (layers, layerOfName) = ParameterLayers.Group(names, layerOf);

        using var run = new Run(module, taskVectors, names);
        var raw = new double[taskCount, layers.Count];
        for (int t = 0; t < taskCount; t++)
        {
            for (int l = 0; l < layers.Count; l++)
            {
                raw[t, l] = Options.InitialCoefficient;
            }
        }

        var initial = new LayerCoefficients(layers, raw, layerOf);
        var adam = new AdamState(raw.Length);
        var order = new BatchOrder(unlabeledBatches, Options.Seed);
        var history = new List<double>(Math.Min(Options.Steps, 1024)); // Steps may be int.MaxValue, "until cancelled"
        for (int step = 0; step < Options.Steps; step++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var clamped = Clamp(raw);
            run.Load(clamped, layerOfName);
            var (entropy, grad) = run.EntropyAndGradient(order, taskLogits, layerOfName, layers.Count, Options.DiversityWeight);
            if (!double.IsFinite(entropy) || !IsAllFinite(grad))
            {
                throw run.NonFinite(step + 1, entropy, taskVectors, order);
            }
            for (int t = 0; t < taskCount; t++)
            {
                for (int l = 0; l < layers.Count; l++)
                {
                    // torch.clamp's backward passes the gradient only where min <= x <= max.
                    if (raw[t, l] < Options.ClampMin || raw[t, l] > Options.ClampMax)
                    {
                        grad[t, l] = 0;
                    }
                }
            }

            adam.Step(raw, grad, Options);
            history.Add(entropy);
            progress?.Report(new AdaMergingProgress(step + 1, Options.Steps, entropy));
        }

        var learned = new LayerCoefficients(layers, Clamp(raw), layerOf);
        var merged = run.MergedStateDict(learned, taskVectors);
        return new AdaMergingResult(learned, initial, merged, history);
    }

    /// <summary>
    /// The loss and its gradient at given coefficients, for one batch per task: Σ_t mean entropy (less
    /// <paramref name="diversityWeight"/> times Σ_t the batch-mean prediction's entropy) and
    /// ∂/∂λ[t, layer] (before any clamp mask). The module is restored afterwards. For tests, which may
    /// also shrink the inner products' chunk (parameter entries per float64 chunk).
    /// </summary>
    internal static (double Entropy, double[,] Gradient) EntropyAndGradient(nn.Module<Tensor, Tensor> module,
        IReadOnlyList<TaskVector> taskVectors, IReadOnlyList<Tensor> batches, Func<Tensor, int, Tensor> taskLogits,
        LayerCoefficients coefficients, long innerProductChunk = Run.DefaultInnerProductChunk, double diversityWeight = 0)
    {
        var names = taskVectors[0].Names;
        var (layers, layerOfName) = ParameterLayers.Group(names, coefficients.LayerOf);
        if (!layers.SequenceEqual(coefficients.Layers))
        {
            throw new ArgumentException("The coefficients' layers are not the names' layers in order of appearance.", nameof(coefficients));
        }

        using var run = new Run(module, taskVectors, names, innerProductChunk);
        run.Load(coefficients.ToArray(), layerOfName);
        var order = new BatchOrder(batches.Select(b => (IReadOnlyList<Tensor>)[b]).ToArray(), 0);
        return run.EntropyAndGradient(order, taskLogits, layerOfName, layers.Count, diversityWeight);
    }

    /// <summary>Mean over the batch of the Shannon entropy of softmax(<paramref name="logits"/>) over
    /// the last dimension: mean_i −Σ_c p_ic·log p_ic (the reference's <c>softmax_entropy(x).mean(0)</c>).</summary>
    public static Tensor MeanEntropy(Tensor logits)
    {
        ArgumentNullException.ThrowIfNull(logits);
        using var scope = NewDisposeScope();
        return MeanEntropyOf(nn.functional.log_softmax(logits, -1)).MoveToOuterDisposeScope();
    }

    /// <summary>The Shannon entropy of the batch's mean prediction, H(mean_i softmax(logits_i)), over the
    /// last dimension of [batch, classes] logits. The mean's logarithm is taken as a log-sum-exp of the
    /// log-probabilities, so a class whose probability underflows to 0 in every example adds 0, not NaN.</summary>
    internal static Tensor MarginalEntropy(Tensor logits)
    {
        CheckBatchOfClasses(logits);
        using var scope = NewDisposeScope();
        return MarginalEntropyOf(nn.functional.log_softmax(logits, -1)).MoveToOuterDisposeScope();
    }

    /// <summary>One task's loss: its mean entropy, less <paramref name="diversityWeight"/> times its
    /// batch-mean prediction's entropy when that weight is not 0 (both from one log-softmax).</summary>
    internal static Tensor TaskLoss(Tensor logits, double diversityWeight)
    {
        if (diversityWeight == 0)
        {
            return MeanEntropy(logits);
        }

        CheckBatchOfClasses(logits);
        using var scope = NewDisposeScope();
        using var weight = diversityWeight.ToScalar();
        var logp = nn.functional.log_softmax(logits, -1);
        return (MeanEntropyOf(logp) - MarginalEntropyOf(logp).mul(weight)).MoveToOuterDisposeScope();
    }

    /// <summary><see cref="MeanEntropy"/> from the log-probabilities (in the caller's dispose scope).</summary>
    private static Tensor MeanEntropyOf(Tensor logp) => (-(logp.exp() * logp).sum(-1)).mean();

    /// <summary><see cref="MarginalEntropy"/> from [batch, classes] log-probabilities (in the caller's dispose scope).</summary>
    private static Tensor MarginalEntropyOf(Tensor logp)
    {
        using var logCount = Math.Log(logp.shape[0]).ToScalar();
        var logMean = logp.logsumexp(0).sub(logCount);
        return -(logMean.exp() * logMean).sum();
    }

    private static void CheckBatchOfClasses(Tensor logits)
    {
        ArgumentNullException.ThrowIfNull(logits);
        if (logits.dim() != 2)
        {
            throw new ArgumentException(
                $"The class-balance term needs task logits of shape [batch, classes]; they have shape [{string.Join(", ", logits.shape)}].", nameof(logits));
        }
    }

    /// <summary>Whether every value is finite (a rectangular array's foreach indexes it: nothing is boxed).</summary>
    private static bool IsAllFinite(double[,] values)
    {
        foreach (double v in values)
        {
            if (!double.IsFinite(v))
            {
                return false;
            }
        }

        return true;
    }

    private double[,] Clamp(double[,] raw)
    {
        var c = (double[,])raw.Clone();
        for (int t = 0; t < c.GetLength(0); t++)
        {
            for (int l = 0; l < c.GetLength(1); l++)
            {
                c[t, l] = Math.Clamp(c[t, l], Options.ClampMin, Options.ClampMax);
            }
        }

        return c;
    }

    /// <summary>The module, its original state and the stacked task vectors for one run.</summary>
    private sealed class Run : IDisposable
    {
        /// <summary>Parameter entries per float64 inner-product chunk by default (T × 8 MiB of float64).</summary>
        public const long DefaultInnerProductChunk = 1 << 20;

        private readonly long _innerProductChunk;

        private readonly nn.Module<Tensor, Tensor> _module;
        private readonly IReadOnlyList<string> _names;
        private readonly Tensor[] _targets;        // the module's parameter or buffer per name
        private readonly bool[] _isParameter;
        private readonly Tensor[] _base;           // θ0 per name, float32 (or float64)
        private readonly bool[] _ownsBase;         // false where _base is the tensor of _originalState
        private readonly int[] _parameterIndex;    // the names that are parameters (buffers give no gradient)
        private readonly Tensor[] _parameters;     // their module tensors, the inputs of autograd.grad
        private readonly Tensor[] _stacked;        // [T, numel] float32 per name
        private readonly bool[] _requiredGrad;
        private readonly (nn.Module Module, bool Training)[] _wasTraining; // the module, then its submodules by depth
        private readonly StateDict _originalState;

        public Run(nn.Module<Tensor, Tensor> module, IReadOnlyList<TaskVector> taskVectors, IReadOnlyList<string> names,
            long innerProductChunk = DefaultInnerProductChunk)
        {
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(innerProductChunk);
            _module = module;
            _innerProductChunk = innerProductChunk;
            _names = names;
            var parameters = module.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter, StringComparer.Ordinal);
            var buffers = module.named_buffers().ToDictionary(b => b.name, b => b.buffer, StringComparer.Ordinal);
            int n = names.Count;
            _targets = new Tensor[n];
            _isParameter = new bool[n];
            _base = new Tensor[n];
            _ownsBase = new bool[n];
            _stacked = new Tensor[n];
            _requiredGrad = new bool[n];
            for (int i = 0; i < n; i++)
            {
                var name = names[i];
                if (parameters.TryGetValue(name, out var p))
                {
                    _targets[i] = p;
                    _isParameter[i] = true;
                }
                else if (buffers.TryGetValue(name, out var b) && b.is_floating_point())
                {
                    _targets[i] = b;
                }
                else
                {
                    throw new ArgumentException($"The task vectors have a tensor '{name}' that is not a parameter or floating-point buffer of the module.", nameof(taskVectors));
                }

                if (!_targets[i].shape.SequenceEqual(taskVectors[0][name].shape))
                {
                    throw new ArgumentException(
                        $"The task vectors' '{name}' has shape [{string.Join(", ", taskVectors[0][name].shape)}] but the module's has [{string.Join(", ", _targets[i].shape)}].",
                        nameof(taskVectors));
                }
            }

            _parameterIndex = Enumerable.Range(0, n).Where(i => _isParameter[i]).ToArray();
            if (_parameterIndex.Length == 0)
            {
                throw new ArgumentException(
                    $"The task vectors name only buffers of the module ('{string.Join("', '", names.Take(3))}'{(n > 3 ? ", …" : "")}); " +
                    "AdaMerging learns from the gradients of parameters, so at least one name must be a parameter.", nameof(taskVectors));
            }

            _parameters = _parameterIndex.Select(i => _targets[i]).ToArray();
            // train(bool) sets a module and all its submodules, so restoring a module before its descendants
            // (by depth of name) gives each one back its own mode.
            _wasTraining = module.named_modules()
                .Where(m => m.name.Length > 0)
                .Select(m => (Depth: m.name.Count(c => c == '.'), m.module))
                .OrderBy(m => m.Depth)
                .Select(m => (m.module, m.module.training))
                .Prepend(((nn.Module)module, module.training))
                .ToArray();
            _originalState = StateDict.FromModule(module);
            try
            {
                StackTaskVectors(taskVectors, names);
            }
            catch
            {
                DisposeTensors();
                throw;
            }

            module.eval();
            for (int i = 0; i < n; i++)
            {
                if (_isParameter[i])
                {
                    _targets[i].requires_grad_(true);
                }
            }
        }

        private void StackTaskVectors(IReadOnlyList<TaskVector> taskVectors, IReadOnlyList<string> names)
        {
            for (int i = 0; i < names.Count; i++)
            {
                var device = _targets[i].device;
                // Float32 arithmetic, or float64 for a float64 module.
                var dtype = _targets[i].dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
                if (_originalState.TryGetValue(names[i], out var original) && original.dtype == dtype)
                {
                    _base[i] = original; // the saved copy already is θ0 in the arithmetic's dtype
                }
                else
                {
                    using var detached = _targets[i].detach();
                    _base[i] = detached.to(dtype, copy: true).DetachFromDisposeScope();
                    _ownsBase[i] = true;
                }

                using var scope = NewDisposeScope();
                _stacked[i] = stack(taskVectors.Select(v => v[names[i]].to(device).to(dtype).flatten()).ToArray())
                    .MoveToOuterDisposeScope().DetachFromDisposeScope();
                _requiredGrad[i] = _targets[i].requires_grad;
            }
        }

        /// <summary>Copies θ0 + λ·τ into the module (no autograd history). The coefficients go to each
        /// device once, as one [T, layers] tensor, so a GPU module is not waited on once per tensor.</summary>
        public void Load(double[,] coefficients, int[] layerOfName)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            var onHost = tensor(coefficients, ScalarType.Float64);
            var onDevice = new Dictionary<(DeviceType, int), Tensor>();
            for (int i = 0; i < _names.Count; i++)
            {
                var device = _stacked[i].device;
                if (!onDevice.TryGetValue((device.type, device.index), out var all))
                {
                    all = onHost.to(device);
                    onDevice.Add((device.type, device.index), all);
                }

                // Contiguous, as the vector of one layer's coefficients was before they travelled together.
                var l = all.select(1, layerOfName[i]).to(_stacked[i].dtype).contiguous();
                var merged = _base[i] + l.matmul(_stacked[i]).view(_base[i].shape);
                _targets[i].copy_(merged);
            }
        }

        /// <summary>Runs every task's next batch; returns the loss (<see cref="TaskLoss"/> summed over
        /// the tasks) and ∂/∂λ[t, layer].</summary>
        public (double Entropy, double[,] Gradient) EntropyAndGradient(BatchOrder order, Func<Tensor, int, Tensor> taskLogits,
            int[] layerOfName, int layerCount, double diversityWeight)
        {
            int taskCount = (int)_stacked[0].shape[0];
            var total = new Tensor?[_parameterIndex.Length];
            using var gradMode = enable_grad(); // also under a caller's no_grad()
            using var scope = NewDisposeScope();
            // The loss and the gradient add up on the device, in the order and float64 arithmetic the host
            // would use (a sum starting at 0, one term at a time), and come back once per step: on a GPU,
            // reading each term back would wait for the device once per task and per parameter chunk.
            var device = _stacked[_parameterIndex[0]].device; // the constructor refuses a module with none
            var entropy = zeros(1, ScalarType.Float64, device);
            var gradient = zeros([taskCount, layerCount], ScalarType.Float64, device);
            for (int t = 0; t < taskCount; t++)
            {
                using var taskScope = NewDisposeScope();
                var batch = order.Next(t);
                var output = _module.call(batch);
                var h = TaskLoss(taskLogits(output, t), diversityWeight);
                // libtorch's error for a loss without a graph ends the process instead of throwing, so check first.
                if (!h.requires_grad)
                {
                    throw DoesNotDepend(t);
                }

                var grads = autograd.grad([h], _parameters, allow_unused: true);
                bool any = false;
                for (int j = 0; j < grads.Count; j++)
                {
                    var g = grads[j];
                    if (g is null || g.IsInvalid)
                    {
                        continue;
                    }

                    any = true;
                    if (total[j] is null)
                    {
                        total[j] = g.detach().clone().MoveToOuterDisposeScope();
                    }
                    else
                    {
                        total[j]!.add_(g);
                    }
                }

                if (!any)
                {
                    throw DoesNotDepend(t);
                }

                entropy.add_(h.detach().to(ScalarType.Float64).view(1).to(device));
            }

            for (int j = 0; j < _parameterIndex.Length; j++)
            {
                if (total[j] is not { } g)
                {
                    continue;
                }

                int i = _parameterIndex[j];
                var column = gradient.select(1, layerOfName[i]);
                // ⟨∂L/∂θ_p, τ_{t,p}⟩ for every task at once: [T, n] @ [n] in float64, over column chunks
                // so that the float64 copy of τ stays small however large the parameter is.
                var flat = g.flatten();
                long n = flat.shape[0];
                for (long start = 0; start < n; start += _innerProductChunk)
                {
                    using var chunkScope = NewDisposeScope();
                    long length = Math.Min(_innerProductChunk, n - start);
                    var inner = _stacked[i].narrow(1, start, length).to(ScalarType.Float64)
                        .matmul(flat.narrow(0, start, length).to(ScalarType.Float64));
                    column.add_(inner.to(device));
                }
            }

            var values = cat([entropy, gradient.flatten()]).cpu().data<double>().ToArray();
            var result = new double[taskCount, layerCount];
            Buffer.BlockCopy(values, sizeof(double), result, 0, taskCount * layerCount * sizeof(double)); // row-major, as flattened

            return (values[0], result);
        }

        private static ArgumentException DoesNotDepend(int task) => InputError(
            $"Task {task}'s loss does not depend on the module's merged parameters: taskLogits must compute the logits " +
            "from the module's output without detaching it.", "taskLogits");

        /// <summary>An error about one of <see cref="Learn"/>'s arguments, named by <paramref name="parameter"/>
        /// (these helpers are not <see cref="Learn"/>, so naming its parameters directly would trip CA2208).</summary>
        private static ArgumentException InputError(string message, string parameter) => new(message, parameter);

        /// <summary>The error for a loss or gradient that is not finite at <paramref name="step"/>, naming the
        /// first input that holds NaN or ∞: a task vector, a batch the step used, or the module's own weights.</summary>
        public Exception NonFinite(int step, double loss, IReadOnlyList<TaskVector> taskVectors, BatchOrder order)
        {
            for (int t = 0; t < taskVectors.Count; t++)
            {
                foreach (var name in _names)
                {
                    if (!FiniteValues.IsAllFinite(taskVectors[t][name]))
                    {
                        return new ArgumentException(
                            $"Task vector {t}'s '{name}' holds NaN or ∞, so the merged model's loss is not finite (step {step}).", nameof(taskVectors));
                    }
                }
            }

            for (int t = 0; t < taskVectors.Count; t++)
            {
                var (batch, index) = order.Last(t);
                if (!FiniteValues.IsAllFinite(batch))
                {
                    return InputError($"Task {t}'s unlabeled batch {index} holds NaN or ∞, so the loss is not finite (step {step}).", "unlabeledBatches");
                }
            }

            foreach (var (name, weight) in _originalState)
            {
                if (!FiniteValues.IsAllFinite(weight))
                {
                    return InputError($"The module's own '{name}' holds NaN or ∞, so the loss is not finite (step {step}).", "module");
                }
            }

            return new InvalidOperationException(
                $"At step {step} the loss ({MergeLab.Options.Format(loss)}) or its gradient is not finite although the task vectors, the batches " +
                "and the module's state dict are: the coefficients diverged (lower LearningRate) or the module or taskLogits produce NaN or ∞.");
        }

        /// <summary>The module's state dict with the merged tensors replaced, in state-dict order.</summary>
        public StateDict MergedStateDict(LayerCoefficients coefficients, IReadOnlyList<TaskVector> taskVectors) =>
            coefficients.ApplyTo(_originalState, taskVectors); // ApplyTo copies; the original stays as it is

        public void Dispose()
        {
            using (no_grad())
            {
                for (int i = 0; i < _names.Count; i++)
                {
                    _targets[i].copy_(_originalState.TryGetValue(_names[i], out var o) ? o : _base[i]);
                    if (_isParameter[i])
                    {
                        _targets[i].requires_grad_(_requiredGrad[i]);
                    }
                }
            }

            foreach (var (module, training) in _wasTraining)
            {
                module.train(training);
            }

            DisposeTensors();
        }

        private void DisposeTensors()
        {
            foreach (var t in _base.Where((_, i) => _ownsBase[i]).Concat(_stacked))
            {
                t?.Dispose();
            }

            _originalState.Dispose();
        }
    }

    /// <summary>Which batch each task uses next: passes over each task's batches in seeded orders.</summary>
    private sealed class BatchOrder
    {
        private readonly IReadOnlyList<IReadOnlyList<Tensor>> _batches;
        private readonly Random[] _random;
        private readonly int[][] _order;
        private readonly int[] _position;

        public BatchOrder(IReadOnlyList<IReadOnlyList<Tensor>> batches, int seed)
        {
            _batches = batches;
            _random = new Random[batches.Count];
            _order = new int[batches.Count][];
            _position = new int[batches.Count];
            for (int t = 0; t < batches.Count; t++)
            {
#pragma warning disable CA5394 // Reproducible shuffling, not security.
                // Not HashCode.Combine: it is randomised per process, and the order must not be.
                _random[t] = new Random((int)(((uint)seed * 2654435761u) ^ (uint)(t * 40503)) & int.MaxValue);
#pragma warning restore CA5394
                _order[t] = Enumerable.Range(0, batches[t].Count).ToArray();
                Shuffle(t);
            }
        }

        public Tensor Next(int task)
        {
            if (_position[task] == _order[task].Length)
            {
                Shuffle(task);
            }

            return _batches[task][_order[task][_position[task]++]];
        }

        /// <summary>The batch <see cref="Next"/> last returned for <paramref name="task"/>, and its index.</summary>
        public (Tensor Batch, int Index) Last(int task)
        {
            int index = _order[task][_position[task] - 1];
            return (_batches[task][index], index);
        }

        private void Shuffle(int task)
        {
#pragma warning disable CA5394
            _random[task].Shuffle(_order[task]);
#pragma warning restore CA5394
            _position[task] = 0;
        }
    }

    /// <summary>Adam on a flat array of doubles, as <c>torch.optim.Adam</c> (no weight decay, no amsgrad).</summary>
    private sealed class AdamState(int size)
    {
        private readonly double[] _m = new double[size];
        private readonly double[] _v = new double[size];
        private int _step;

        public void Step(double[,] parameters, double[,] gradient, AdaMergingOptions o)
        {
            _step++;
            double bias1 = 1 - Math.Pow(o.Beta1, _step);
            double bias2 = 1 - Math.Pow(o.Beta2, _step);
            double stepSize = o.LearningRate / bias1;
            double sqrtBias2 = Math.Sqrt(bias2);
            int cols = parameters.GetLength(1);
            for (int k = 0; k < _m.Length; k++)
            {
                int r = k / cols, c = k % cols;
                double g = gradient[r, c];
                _m[k] = o.Beta1 * _m[k] + (1 - o.Beta1) * g;
                _v[k] = o.Beta2 * _v[k] + (1 - o.Beta2) * g * g;
                double denom = Math.Sqrt(_v[k]) / sqrtBias2 + o.Epsilon;
                parameters[r, c] -= stepSize * _m[k] / denom;
            }
        }
    }
}
