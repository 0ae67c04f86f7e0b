#:project ../src/MergeLab/MergeLab.csproj

// Merges three synthetic "fine-tuned" experts of a toy two-layer MLP with every MergeLab method and
// prints, per method, the L2 distance of the merged model to the base and to each expert, and the
// cosine similarity of the merged task vector (merged − base) with each expert's task vector.
//
// Run from the repository root:
//   dotnet run examples/merge-toy-experts.cs

using MergeLab.Methods;
using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

torch.manual_seed(42);

// The "pretrained" model: the weights of a 16 → 32 → 4 MLP.
using var pretrained = new StateDict
{
    { "fc1.weight", randn(32, 16).mul_(0.25) },
    { "fc1.bias", zeros(32) },
    { "fc2.weight", randn(4, 32).mul_(0.18) },
    { "fc2.bias", zeros(4) },
};

// Three experts: the base plus a sparse fine-tuning delta each (a random 30% of the entries, so the
// experts overlap, and sometimes disagree in sign, on about a third of what each one changed).
StateDict[] experts = [FineTune(pretrained), FineTune(pretrained), FineTune(pretrained)];

(string Label, MergeMethod Method)[] methods =
[
    ("task arithmetic λ=0.5", new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = 0.5 })),
    ("TIES (paper)", new TiesMerge(new TiesOptions { Preset = TiesPreset.Paper, Density = 0.2 })),
    ("TIES (mergekit)", new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.2 })),
    ("TIES (PEFT)", new TiesMerge(new TiesOptions { Preset = TiesPreset.Peft, Density = 0.2 })),
    ("DARE linear p=0.5", new DareMerge(new DareOptions { DropRate = 0.5, Lambda = 0.5, Seed = 1 })),
    ("DARE TIES p=0.5", new DareMerge(new DareOptions { DropRate = 0.5, Combination = Combination.Ties, Seed = 1 })),
    ("Breadcrumbs", new BreadcrumbsMerge(new BreadcrumbsOptions { Density = 0.2, Gamma = 0.1, Lambda = 0.5 })),
    ("PCB", new PcbMerge(new PcbOptions { Ratio = 0.2 })),
    ("weight average", new WeightAverageMerge()),
];

using var theta0 = Flatten(pretrained);
var thetas = experts.Select(Flatten).ToArray();
var taus = thetas.Select(t => t - theta0).ToArray();

Console.WriteLine($"{"method",-22} {"|m-base|",9} {"|m-e1|",8} {"|m-e2|",8} {"|m-e3|",8}   {"cos(t,t1)",9} {"cos(t,t2)",9} {"cos(t,t3)",9}");
foreach (var (label, method) in methods)
{
    using var scope = NewDisposeScope(); // frees this iteration's temporaries
    using var merged = method.Merge(pretrained, experts);
    var theta = Flatten(merged);
    var tau = theta - theta0;
    var distances = thetas.Select(e => Norm(theta - e));
    var cosines = taus.Select(t => (tau.dot(t) / (tau.norm() * t.norm())).item<float>());
    Console.WriteLine($"{label,-22} {Norm(tau),9:F3} {string.Join(" ", distances.Select(d => $"{d,8:F3}"))}   "
        + string.Join(" ", cosines.Select(c => $"{c,9:F3}")));
}

Console.WriteLine($"\nFor reference, each expert's distance to the base: {string.Join(", ", taus.Select(t => Norm(t).ToString("F3")))}");

foreach (var e in experts)
{
    e.Dispose();
}

// An expert: every tensor of the base, with N(0, 0.05²) noise added to a random 30% of its entries.
static StateDict FineTune(StateDict pretrained)
{
    var expert = new StateDict();
    foreach (var name in pretrained.Names)
    {
        var w = pretrained[name];
        using var changed = rand_like(w).lt(0.3);
        using var delta = randn_like(w).mul_(0.05).mul_(changed);
        expert.Add(name, w + delta);
    }

    return expert;
}

// All of a model's tensors as one vector, in name order.
static Tensor Flatten(StateDict model) => cat(model.Names.Select(n => model[n].flatten()).ToList(), 0);

static float Norm(Tensor t) => t.norm().item<float>();
