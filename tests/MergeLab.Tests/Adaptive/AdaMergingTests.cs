using MergeLab.Adaptive;
using MergeLab.Tensors;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MergeLab.Tests.Adaptive;

public class AdaMergingTests
{
    /// <summary>A 4 → 5 → 3 MLP whose parameters are named like a real backbone's.</summary>
    private sealed class TinyNet : nn.Module<Tensor, Tensor>
    {
        private readonly Linear first;
        private readonly Linear second;

        public TinyNet(long seed, ScalarType dtype = ScalarType.Float32)
            : base(nameof(TinyNet))
        {
            manual_seed(seed);
            first = nn.Linear(4, 5);
            second = nn.Linear(5, 3);
            RegisterComponents();
            this.to(dtype);
        }

        public override Tensor forward(Tensor input)
        {
            using var hidden = nn.functional.tanh(first.call(input));
            return second.call(hidden);
        }
    }

    private sealed record Problem(TinyNet Net, TaskVector[] Vectors, Tensor[][] Batches, Linear[] Heads) : IDisposable
    {
        public Tensor Logits(Tensor output, int task) => Heads[task].call(output);

        public void Dispose()
        {
            Net.Dispose();
            foreach (var v in Vectors)
            {
                v.Dispose();
            }

            foreach (var b in Batches.SelectMany(b => b))
            {
                b.Dispose();
            }

            foreach (var h in Heads)
            {
                h.Dispose();
            }
        }
    }

    /// <summary>Two tasks: random task vectors of the net's shapes, random batches, per-task heads.</summary>
    private static Problem MakeProblem(ScalarType dtype = ScalarType.Float32, int batchesPerTask = 2)
    {
        var net = new TinyNet(1, dtype);
        using var g = new Generator(7);
        var vectors = new TaskVector[2];
        for (int t = 0; t < 2; t++)
        {
            var deltas = new StateDict();
            foreach (var (name, p) in net.named_parameters())
            {
                deltas.Add(name, (randn(p.shape, generator: g) * 0.5).to(dtype));
            }

            vectors[t] = TaskVector.FromDeltas(deltas);
        }

        var batches = Enumerable.Range(0, 2)
            .Select(_ => Enumerable.Range(0, batchesPerTask).Select(_ => randn([6, 4], generator: g).to(dtype)).ToArray())
            .ToArray();
        manual_seed(3);
        var heads = Enumerable.Range(0, 2).Select(t => nn.Linear(3, t == 0 ? 3 : 2)).ToArray();
        foreach (var h in heads)
        {
            h.to(dtype);
        }

        return new Problem(net, vectors, batches, heads);
    }

    /// <summary>Σ_t mean entropy of the net loaded with <paramref name="coefficients"/>, less
    /// <paramref name="diversityWeight"/> times Σ_t the entropy of the batch-mean prediction, computed directly.</summary>
    private static double DirectEntropy(Problem p, LayerCoefficients coefficients, int batch = 0, double diversityWeight = 0)
    {
        using var scope = NewDisposeScope();
        using var baseModel = new StateDict();
        foreach (var (name, value) in p.Net.state_dict())
        {
            baseModel.Add(name, value.detach().clone());
        }

        using var merged = coefficients.ApplyTo(baseModel, p.Vectors);
        using var copy = new TinyNet(1, merged[merged.Names[0]].dtype);
        using (no_grad())
        {
            foreach (var (name, value) in copy.state_dict())
            {
                value.copy_(merged[name]);
            }
        }

        double total = 0;
        for (int t = 0; t < 2; t++)
        {
            var logits = p.Logits(copy.call(p.Batches[t][batch]), t);
            total += AdaMerging.MeanEntropy(logits).to(ScalarType.Float64).item<double>();
            var mean = nn.functional.softmax(logits.to(ScalarType.Float64), -1).mean([0]).data<double>().ToArray();
            total += diversityWeight * mean.Sum(q => q * Math.Log(q));
        }

        return total;
    }

    [Test]
    public void MeanEntropy_matches_the_formula()
    {
        using var logits = tensor(new float[] { 0, 0, 0, 0, 1, 2 }, [2, 3]);
        var p = new[] { Math.Exp(0), Math.Exp(1), Math.Exp(2) };
        double z = p.Sum();
        double h2 = -p.Select(v => v / z * Math.Log(v / z)).Sum();
        double expected = (Math.Log(3) + h2) / 2;
        using var h = AdaMerging.MeanEntropy(logits);
        Assert.That(h.item<float>(), Is.EqualTo(expected).Within(1e-6));
    }

    [Test]
    public void MarginalEntropy_is_the_entropy_of_the_mean_prediction()
    {
        using var logits = tensor(new float[] { 0, 0, 0, 0, 1, 2 }, [2, 3]);
        var e = new[] { Math.Exp(0), Math.Exp(1), Math.Exp(2) };
        var mean = e.Select(v => (1.0 / 3 + v / e.Sum()) / 2).ToArray();
        using var h = AdaMerging.MarginalEntropy(logits);
        Assert.That(h.item<float>(), Is.EqualTo(-mean.Sum(q => q * Math.Log(q))).Within(1e-6));

        // Two confident examples of the same class: the mean is that class, entropy 0, and the class no
        // example weighs (softmax 0 in float32) gives 0·log 0 = 0, not NaN.
        using var collapsed = tensor(new float[] { 200, 0, 200, 0 }, [2, 2]);
        using var h0 = AdaMerging.MarginalEntropy(collapsed);
        Assert.That(h0.item<float>(), Is.EqualTo(0).Within(1e-6));
        using var balanced = tensor(new float[] { 200, 0, 0, 200 }, [2, 2]);
        using var h1 = AdaMerging.MarginalEntropy(balanced);
        Assert.That(h1.item<float>(), Is.EqualTo(Math.Log(2)).Within(1e-6));

        // The batch mean needs [batch, classes]; other ranks are refused, not summed over.
        using var threeD = zeros(2, 2, 3);
        var ex = Assert.Throws<ArgumentException>(() => AdaMerging.MarginalEntropy(threeD).Dispose());
        Assert.That(ex!.Message, Does.Contain("[2, 2, 3]"));
    }

    [TestCase(AdaMergingGranularity.LayerWise, 0.0)]
    [TestCase(AdaMergingGranularity.TaskWise, 0.0)]
    [TestCase(AdaMergingGranularity.LayerWise, 2.0)]
    public void Coefficient_gradient_equals_central_finite_differences(AdaMergingGranularity granularity, double diversity)
    {
        using var p = MakeProblem(ScalarType.Float64);
        Func<string, string> layerOf = granularity == AdaMergingGranularity.TaskWise ? _ => AdaMerging.AllParametersLayer : ParameterLayers.ModulePrefix;
        var (layers, _) = ParameterLayers.Group(p.Vectors[0].Names, layerOf);
        Assert.That(layers, Is.EqualTo(granularity == AdaMergingGranularity.TaskWise ? new[] { "*" } : new[] { "first", "second" }));
        var values = new double[2, layers.Count];
        for (int t = 0; t < 2; t++)
        {
            for (int l = 0; l < layers.Count; l++)
            {
                values[t, l] = 0.2 + 0.15 * t + 0.1 * l;
            }
        }

        var at = new LayerCoefficients(layers, values, layerOf);
        var (entropy, gradient) = AdaMerging.EntropyAndGradient(p.Net, p.Vectors, [p.Batches[0][0], p.Batches[1][0]], p.Logits, at,
            diversityWeight: diversity);
        Assert.That(entropy, Is.EqualTo(DirectEntropy(p, at, diversityWeight: diversity)).Within(1e-12), "the loss at the coefficients");
        if (diversity != 0)
        {
            Assert.That(entropy, Is.LessThan(DirectEntropy(p, at) - 0.1), "the diversity term is subtracted");
        }

        // The inner products ⟨∂L/∂θ, τ⟩ summed over chunks of a parameter (as for parameters of more
        // than a million entries) give the same gradient up to float64 rounding.
        var (_, chunked) = AdaMerging.EntropyAndGradient(p.Net, p.Vectors, [p.Batches[0][0], p.Batches[1][0]], p.Logits, at,
            innerProductChunk: 7, diversityWeight: diversity);
        for (int t = 0; t < 2; t++)
        {
            for (int l = 0; l < layers.Count; l++)
            {
                Assert.That(chunked[t, l], Is.EqualTo(gradient[t, l]).Within(1e-12 * Math.Max(1, Math.Abs(gradient[t, l]))), "chunked inner products");
            }
        }

        const double h = 1e-5;
        for (int t = 0; t < 2; t++)
        {
            for (int l = 0; l < layers.Count; l++)
            {
                var plus = (double[,])values.Clone();
                var minus = (double[,])values.Clone();
                plus[t, l] += h;
                minus[t, l] -= h;
                double numeric = (DirectEntropy(p, new LayerCoefficients(layers, plus, layerOf), diversityWeight: diversity)
                    - DirectEntropy(p, new LayerCoefficients(layers, minus, layerOf), diversityWeight: diversity)) / (2 * h);
                Assert.That(gradient[t, l], Is.EqualTo(numeric).Within(1e-7 + 1e-6 * Math.Abs(numeric)), $"∂/∂λ[{t}, {layers[l]}]");
            }
        }
    }

    [Test]
    public void Learn_lowers_the_entropy_and_moves_the_coefficients()
    {
        using var p = MakeProblem(batchesPerTask: 1);
        var ada = new AdaMerging(new AdaMergingOptions { Steps = 40, LearningRate = 1e-2 });
        var reports = new List<AdaMergingProgress>();
        using var result = ada.Learn(p.Net, p.Vectors, p.Batches, p.Logits, new SynchronousProgress<AdaMergingProgress>(reports.Add));

        Assert.That(result.EntropyHistory, Has.Count.EqualTo(40));
        Assert.That(reports.Select(r => r.Step), Is.EqualTo(Enumerable.Range(1, 40)));
        // One batch per task, so every step measures the same loss.
        Assert.That(result.EntropyHistory[^1], Is.LessThan(result.EntropyHistory[0] - 0.01));
        var learned = result.Coefficients.ToArray().Cast<double>().ToArray();
        Assert.That(result.InitialCoefficients.ToArray().Cast<double>(), Is.All.EqualTo(0.3));
        Assert.That(learned.Max(v => Math.Abs(v - 0.3)), Is.GreaterThan(0.05), "the coefficients moved");
        Assert.That(learned, Is.All.InRange(0.0, 1.0), "clamped to [0, 1]");
        Assert.That(result.Coefficients.Layers, Is.EqualTo(new[] { "first", "second" }));
    }

    [Test]
    public void Learn_minimises_the_loss_with_the_diversity_term_when_it_is_weighted()
    {
        using var p = MakeProblem(batchesPerTask: 1);
        var options = new AdaMergingOptions { Steps = 30, LearningRate = 1e-2 };
        using var plain = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        using var diverse = new AdaMerging(options with { DiversityWeight = 1.5 }).Learn(p.Net, p.Vectors, p.Batches, p.Logits);

        // The first step measures the loss at the initial coefficients: entropy less 1.5 × the marginal entropy.
        var initial = plain.InitialCoefficients;
        Assert.That(plain.EntropyHistory[0], Is.EqualTo(DirectEntropy(p, initial)).Within(1e-5));
        Assert.That(diverse.EntropyHistory[0], Is.EqualTo(DirectEntropy(p, initial, diversityWeight: 1.5)).Within(1e-5));
        Assert.That(diverse.EntropyHistory[^1], Is.LessThan(diverse.EntropyHistory[0]));
        Assert.That(diverse.Coefficients.ToArray(), Is.Not.EqualTo(plain.Coefficients.ToArray()), "a different loss, different coefficients");
    }

    /// <summary>
    /// One Adam step moves each coefficient by the learning rate against its gradient's sign: after the
    /// bias corrections m̂ = g and v̂ = g², so λ₁ = λ₀ − lr·g/(|g| + ε). Also from λ₀ = ClampMin, where
    /// torch.clamp's backward still passes the gradient, so the coefficients with g &lt; 0 rise.
    /// </summary>
    [TestCase(0.3)]
    [TestCase(0.0)]
    public void One_adam_step_moves_each_coefficient_by_the_learning_rate(double initial)
    {
        using var p = MakeProblem(batchesPerTask: 1);
        const double lr = 1e-2;
        var options = new AdaMergingOptions { Steps = 1, LearningRate = lr, InitialCoefficient = initial };
        using var result = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        var at = result.InitialCoefficients;
        var (_, gradient) = AdaMerging.EntropyAndGradient(p.Net, p.Vectors, [p.Batches[0][0], p.Batches[1][0]], p.Logits, at);
        int rising = 0;
        for (int t = 0; t < at.TaskCount; t++)
        {
            for (int l = 0; l < at.Layers.Count; l++)
            {
                double g = gradient[t, l];
                double expected = Math.Clamp(initial - (lr * g / (Math.Abs(g) + options.Epsilon)), options.ClampMin, options.ClampMax);
                Assert.That(result.Coefficients[t, l], Is.EqualTo(expected).Within(1e-9), $"task {t}, layer {l}, gradient {g}");
                rising += g < 0 ? 1 : 0;
            }
        }

        Assert.That(rising, Is.GreaterThan(0), "some coefficient must rise, or the clamp case shows nothing");
    }

    [Test]
    public void Learn_returns_the_merge_of_its_coefficients_and_restores_the_module()
    {
        using var p = MakeProblem();
        var before = p.Net.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        p.Net.train();
        p.Net.named_parameters().First().parameter.requires_grad_(false);
        using var result = new AdaMerging(new AdaMergingOptions { Steps = 5, LearningRate = 0.05 })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits);

        foreach (var (name, value) in p.Net.state_dict())
        {
            T.BitEqual(value.detach(), before[name]);
        }

        Assert.That(p.Net.training, Is.True, "training mode restored");
        Assert.That(p.Net.named_parameters().First().parameter.requires_grad, Is.False, "requires_grad restored");

        using var baseModel = new StateDict(before);
        using var expected = result.Coefficients.ApplyTo(baseModel, p.Vectors);
        Assert.That(result.Merged.Names, Is.EqualTo(expected.Names));
        foreach (var name in expected.Names)
        {
            T.BitEqual(result.Merged[name], expected[name]);
        }

        // θ = θ0 + Σ_t λ_t τ_t by hand for one tensor.
        var w = before["second.weight"].clone();
        for (int t = 0; t < 2; t++)
        {
            w.add_(p.Vectors[t]["second.weight"], alpha: result.Coefficients.For(t, "second.weight"));
        }

        T.Near(result.Merged["second.weight"], w, 1e-6);
    }

    [Test]
    public void Learn_is_deterministic_for_a_seed()
    {
        using var p = MakeProblem(batchesPerTask: 3);
        var options = new AdaMergingOptions { Steps = 12, LearningRate = 0.02, Seed = 5 };
        using var a = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        using var b = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        Assert.That(b.Coefficients.ToArray(), Is.EqualTo(a.Coefficients.ToArray()));
        Assert.That(b.EntropyHistory, Is.EqualTo(a.EntropyHistory));
    }

    [Test]
    public void Task_wise_learns_one_coefficient_per_task_and_a_custom_grouping_is_honoured()
    {
        using var p = MakeProblem();
        using var taskWise = new AdaMerging(new AdaMergingOptions { Granularity = AdaMergingGranularity.TaskWise, Steps = 3 })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        Assert.That(taskWise.Coefficients.Layers, Is.EqualTo(new[] { AdaMerging.AllParametersLayer }));
        Assert.That(taskWise.Coefficients.TaskCount, Is.EqualTo(2));

        using var perTensor = new AdaMerging(new AdaMergingOptions { LayerOf = name => name, Steps = 3 })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        Assert.That(perTensor.Coefficients.Layers, Is.EqualTo(new[] { "first.weight", "first.bias", "second.weight", "second.bias" }));
    }

    [Test]
    public void Zero_steps_merge_with_the_initial_coefficient()
    {
        using var p = MakeProblem();
        using var result = new AdaMerging(new AdaMergingOptions { Steps = 0, InitialCoefficient = 0.5 })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        Assert.That(result.EntropyHistory, Is.Empty);
        var expected = p.Net.state_dict()["first.bias"].detach() + 0.5 * (p.Vectors[0]["first.bias"] + p.Vectors[1]["first.bias"]);
        T.Near(result.Merged["first.bias"], expected, 1e-6);
    }

    [Test]
    public void Clamping_stops_a_coefficient_at_its_bound()
    {
        using var p = MakeProblem();
        // A huge learning rate throws some raw λ outside [0, 1]; the merge uses the clamped value, and a
        // raw value outside gets no gradient (torch.clamp's backward), so it stays there.
        using var result = new AdaMerging(new AdaMergingOptions { Steps = 10, LearningRate = 5 })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        var values = result.Coefficients.ToArray().Cast<double>().ToArray();
        Assert.That(values, Is.All.InRange(0.0, 1.0));
        Assert.That(values.Any(v => v is 0.0 or 1.0), Is.True, $"some coefficient at a bound: [{string.Join(", ", values)}]");
    }

    [Test]
    public void Unknown_names_and_mismatched_counts_are_rejected()
    {
        using var p = MakeProblem();
        var ada = new AdaMerging(new AdaMergingOptions { Steps = 1 });
        using var stray = TaskVector.FromDeltas(new StateDict { { "third.weight", zeros(2) } });
        var ex = Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, [stray], [p.Batches[0]], p.Logits));
        Assert.That(ex!.Message, Does.Contain("third.weight"));
        using var shortVector = TaskVector.FromDeltas(new StateDict { { "first.weight", zeros(5, 4) } });
        Assert.Throws<MergeException>(() => ada.Learn(p.Net, [p.Vectors[0], shortVector], p.Batches, p.Logits));
        Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, p.Vectors, [p.Batches[0]], p.Logits));
        Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, p.Vectors, [p.Batches[0], []], p.Logits));
        Assert.Throws<ArgumentException>(() => _ = new AdaMerging(new AdaMergingOptions { ClampMin = 1, ClampMax = 0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new AdaMergingOptions { LearningRate = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new AdaMergingOptions { InitialCoefficient = double.NaN });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new AdaMergingOptions { DiversityWeight = -0.1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new AdaMergingOptions { DiversityWeight = double.PositiveInfinity });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new AdaMergingOptions { DiversityWeight = double.NaN });
    }

    [Test]
    public void Cancellation_is_honoured_between_steps()
    {
        using var p = MakeProblem();
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        Assert.Throws<OperationCanceledException>(() =>
            new AdaMerging(new AdaMergingOptions { Steps = 3 }).Learn(p.Net, p.Vectors, p.Batches, p.Logits, cancellationToken: cts.Token));
    }

    [Test]
    public void Learn_enables_gradients_under_a_callers_no_grad()
    {
        using var p = MakeProblem();
        var options = new AdaMergingOptions { Steps = 4, LearningRate = 0.05 };
        using var plain = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        AdaMergingResult underNoGrad;
        using (no_grad())
        {
            underNoGrad = new AdaMerging(options).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        }

        using (underNoGrad)
        {
            Assert.That(underNoGrad.Coefficients.ToArray(), Is.EqualTo(plain.Coefficients.ToArray()));
            Assert.That(underNoGrad.EntropyHistory, Is.EqualTo(plain.EntropyHistory));
        }
    }

    [Test]
    public void A_loss_without_a_path_to_the_merged_parameters_is_refused_and_the_module_restored()
    {
        // libtorch's own error here ends the process; Learn must throw a .NET exception instead.
        using var p = MakeProblem();
        using var scope = NewDisposeScope();
        var before = p.Net.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var ada = new AdaMerging(new AdaMergingOptions { Steps = 2 });

        // Logits with no graph at all (the output detached, no head), and a graph through the heads only:
        // no gradient for any coefficient either way.
        foreach (var (label, logits) in new (string, Func<Tensor, int, Tensor>)[] { ("detached", (o, _) => o.detach()), ("through the heads only", (o, t) => p.Logits(o.detach(), t)) })
        {
            var ex = Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, p.Vectors, p.Batches, logits), label);
            Assert.That(ex!.ParamName, Is.EqualTo("taskLogits"), label);
            Assert.That(ex.Message, Does.Contain("Task 0's loss does not depend on the module's merged parameters"), label);
        }
        foreach (var (name, value) in p.Net.state_dict())
        {
            T.BitEqual(value.detach(), before[name]);
        }
    }

    [Test]
    public void Task_vectors_of_buffers_only_are_refused()
    {
        using var net = nn.Sequential(("bn", nn.BatchNorm1d(4)), ("fc", nn.Linear(4, 3)));
        using var vector = TaskVector.FromDeltas(new StateDict { { "bn.running_mean", ones(4) } });
        using var batch = randn(6, 4);
        var ex = Assert.Throws<ArgumentException>(() => new AdaMerging(new AdaMergingOptions { Steps = 1 })
            .Learn(net, [vector], [[batch]], (o, _) => o));
        Assert.That(ex!.Message, Does.Contain("only buffers").And.Contain("bn.running_mean"));
    }

    [Test]
    public void Each_submodules_training_mode_is_restored()
    {
        using var p = MakeProblem();
        p.Net.train();
        var first = p.Net.named_children().Single(c => c.name == "first").module;
        first.eval();
        using var result = new AdaMerging(new AdaMergingOptions { Steps = 1 }).Learn(p.Net, p.Vectors, p.Batches, p.Logits);
        Assert.That(p.Net.training, Is.True);
        Assert.That(first.training, Is.False);
        Assert.That(p.Net.named_children().Single(c => c.name == "second").module.training, Is.True);
    }

    [Test]
    public void A_non_finite_loss_names_its_input_and_step()
    {
        using var p = MakeProblem();
        using var scope = NewDisposeScope();
        var ada = new AdaMerging(new AdaMergingOptions { Steps = 50 });
        int steps = 0;
        var counting = new SynchronousProgress<AdaMergingProgress>(_ => steps++);

        using (var nanVector = TaskVector.FromDeltas(p.Vectors[1].Deltas.Clone()))
        {
            nanVector["second.weight"][1, 2] = float.NaN;
            var ex = Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, [p.Vectors[0], nanVector], p.Batches, p.Logits, counting));
            Assert.That(ex!.Message, Does.Contain("Task vector 1's 'second.weight' holds NaN").And.Contain("step 1"));
            Assert.That(steps, Is.Zero, "stopped at the first step, not after all of them");
        }

        using var nanBatch = p.Batches[0][1].clone();
        nanBatch[0, 0] = float.NaN;
        var batches = new[] { new[] { p.Batches[0][0], nanBatch }, p.Batches[1] };
        var batchError = Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, p.Vectors, batches, p.Logits));
        Assert.That(batchError!.Message, Does.Contain("Task 0's unlabeled batch 1 holds NaN"));

        using var infinity = float.PositiveInfinity.ToScalar();
        var diverging = Assert.Throws<InvalidOperationException>(() => ada.Learn(p.Net, p.Vectors, p.Batches, (o, t) => p.Logits(o, t).mul(infinity)));
        Assert.That(diverging!.Message, Does.Contain("step 1").And.Contain("not finite"));

        // A NaN in a weight the task vectors do not cover (a head's, here the module's second layer with
        // only the first in the task vectors) is named too, not reported as divergence.
        using var firstVector = TaskVector.FromDeltas(new StateDict
        {
            { "first.weight", p.Vectors[0]["first.weight"].clone() },
            { "first.bias", p.Vectors[0]["first.bias"].clone() },
        });
        using (no_grad())
        {
            p.Net.named_parameters().Single(n => n.name == "second.bias").parameter[0] = float.NaN;
        }

        var unmerged = Assert.Throws<ArgumentException>(() => ada.Learn(p.Net, [firstVector], [p.Batches[0]], p.Logits));
        Assert.That(unmerged!.Message, Does.Contain("The module's own 'second.bias' holds NaN"));
    }

    [Test]
    public void Steps_may_be_unbounded_until_cancelled()
    {
        using var p = MakeProblem();
        using var cts = new CancellationTokenSource();
        int steps = 0;
        var progress = new SynchronousProgress<AdaMergingProgress>(_ =>
        {
            if (++steps == 3)
            {
                cts.Cancel();
            }
        });
        Assert.Throws<OperationCanceledException>(() => new AdaMerging(new AdaMergingOptions { Steps = int.MaxValue })
            .Learn(p.Net, p.Vectors, p.Batches, p.Logits, progress, cts.Token));
        Assert.That(steps, Is.EqualTo(3));
    }

    [Test]
    public void An_initial_coefficient_outside_the_clamp_is_refused()
    {
        var ex = Assert.Throws<ArgumentException>(() => _ = new AdaMerging(new AdaMergingOptions { InitialCoefficient = 1.2 }));
        Assert.That(ex!.Message, Does.Contain("InitialCoefficient (1.2) lies outside [ClampMin, ClampMax] = [0, 1]"));
        Assert.DoesNotThrow(() => _ = new AdaMerging(new AdaMergingOptions { InitialCoefficient = 1.2, ClampMax = 2 }));
        Assert.DoesNotThrow(() => _ = new AdaMerging(new AdaMergingOptions { InitialCoefficient = 0 }));
    }
}
