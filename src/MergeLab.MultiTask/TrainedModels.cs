using System.Diagnostics;
using MergeLab.Tensors;
using TorchSharp.Modules;
using static System.FormattableString;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>The pretrained backbone, the tasks' linear-probe heads and the fine-tuned experts.</summary>
internal sealed class TrainedModels : IDisposable
{
    private TrainedModels(StateDict pretrained, Linear[] probeHeads, StateDict[] experts, Linear[] heads, bool fromCache)
    {
        Pretrained = pretrained;
        ProbeHeads = probeHeads;
        Experts = experts;
        Heads = heads;
        FromCache = fromCache;
    }

    /// <summary>The pretrained backbone's weights.</summary>
    public StateDict Pretrained { get; }

    /// <summary>Per task: the linear probe trained on the pretrained backbone's frozen features.</summary>
    public IReadOnlyList<Linear> ProbeHeads { get; }

    /// <summary>Per task: the expert's fine-tuned backbone weights.</summary>
    public IReadOnlyList<StateDict> Experts { get; }

    /// <summary>Per task: the expert's head (the probe itself unless heads were fine-tuned).</summary>
    public IReadOnlyList<Linear> Heads { get; }

    /// <summary>Whether every checkpoint came from the cache.</summary>
    public bool FromCache { get; }

    public static TrainedModels LoadOrTrain(BenchmarkData data, BenchmarkOptions o, CheckpointCache cache, IProgress<string>? log, CancellationToken ct)
    {
        var tasks = data.Tasks;
        bool allCached = true;
        var clock = Stopwatch.StartNew();

        using var backbone = new MlpBackbone(o.Widths);
        var pretrained = cache.TryLoad("pretrained");
        if (pretrained is null)
        {
            allCached = false;
            manual_seed(o.Seed);
            using var fresh = new MlpBackbone(o.Widths);
            Training.Pretrain(fresh, data, o, ct);
            pretrained = fresh.ToStateDict();
            cache.Save("pretrained", pretrained);
            log?.Report(Invariant($"pretrained the backbone in {clock.Elapsed.TotalSeconds:F1} s"));
        }

        backbone.Load(pretrained);
        var probes = new Linear[tasks.Count];
        using (var cached = cache.TryLoad("probe_heads"))
        {
            for (int t = 0; t < tasks.Count; t++)
            {
                probes[t] = nn.Linear(backbone.FeatureWidth, tasks[t].ClassCount);
                if (cached is not null)
                {
                    LoadHead(probes[t], cached, tasks[t].Name + ".");
                }
            }

            if (cached is null)
            {
                allCached = false;
                using var all = new StateDict();
                for (int t = 0; t < tasks.Count; t++)
                {
                    probes[t].Dispose();
                    probes[t] = Training.TrainProbe(backbone, t, data, o, ct);
                    AddHead(all, probes[t], tasks[t].Name + ".");
                }

                cache.Save("probe_heads", all);
                log?.Report(Invariant($"trained {tasks.Count} linear probes ({clock.Elapsed.TotalSeconds:F1} s)"));
            }
        }

        var experts = new StateDict[tasks.Count];
        var heads = new Linear[tasks.Count];
        for (int t = 0; t < tasks.Count; t++)
        {
            var name = "expert_" + tasks[t].Name;
            heads[t] = nn.Linear(backbone.FeatureWidth, tasks[t].ClassCount);
            using var cached = cache.TryLoad(name);
            if (cached is not null)
            {
                LoadHead(heads[t], cached, "head.");
                experts[t] = new StateDict();
                foreach (var (n, v) in cached)
                {
                    if (!n.StartsWith("head.", StringComparison.Ordinal))
                    {
                        experts[t].Add(n, v.clone());
                    }
                }

                continue;
            }

            allCached = false;
            using var expert = new MlpBackbone(o.Widths);
            expert.Load(pretrained);
            using (var probe = new StateDict())
            {
                AddHead(probe, probes[t], "");
                LoadHead(heads[t], probe, "");
            }

            Training.FineTune(expert, heads[t], t, data, o, ct);
            experts[t] = expert.ToStateDict();
            using var save = experts[t].Clone();
            AddHead(save, heads[t], "head.");
            cache.Save(name, save);
            log?.Report(Invariant($"fine-tuned expert '{tasks[t].Name}' ({clock.Elapsed.TotalSeconds:F1} s)"));
        }

        return new TrainedModels(pretrained, probes, experts, heads, allCached);
    }

    private static void AddHead(StateDict target, Linear head, string prefix)
    {
        using var noGrad = no_grad();
        using var weight = head.weight!.detach();
        using var bias = head.bias!.detach();
        target.Add(prefix + "weight", weight.clone());
        target.Add(prefix + "bias", bias.clone());
    }

    private static void LoadHead(Linear head, StateDict source, string prefix)
    {
        using var noGrad = no_grad();
        head.weight!.copy_(source[prefix + "weight"]);
        head.bias!.copy_(source[prefix + "bias"]);
    }

    public void Dispose()
    {
        Pretrained.Dispose();
        foreach (var e in Experts)
        {
            e.Dispose();
        }

        foreach (var h in ProbeHeads.Concat(Heads))
        {
            h.Dispose();
        }
    }
}
