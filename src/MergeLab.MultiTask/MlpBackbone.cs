using MergeLab.Tensors;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>
/// The benchmark's backbone: an MLP of Linear + ReLU blocks, 784 → widths[0] → … → widths[^1], whose
/// output features are L2-normalised and scaled to unit root-mean-square, f/‖f‖·√F (as CLIP normalises
/// its image features before the zero-shot head, so a head's confidence cannot grow by scaling the
/// features alone). Its parameters are named <c>blocks.{i}.weight</c> and <c>blocks.{i}.bias</c>, so
/// each block is one layer for layer-wise AdaMerging and one block for LiNeS.
/// </summary>
public sealed class MlpBackbone : nn.Module<Tensor, Tensor>
{
    private readonly ModuleList<Linear> blocks;

    /// <summary>Creates the backbone with freshly initialised weights (PyTorch's default init, drawn
    /// from torch's global generator: seed it first).</summary>
    /// <param name="widths">The output width of each block; at least two blocks.</param>
    public MlpBackbone(IReadOnlyList<int> widths)
        : base(nameof(MlpBackbone))
    {
        ArgumentNullException.ThrowIfNull(widths);
        if (widths.Count < 2 || widths.Any(w => w < 1))
        {
            throw new ArgumentException("The backbone needs at least two blocks of positive width.", nameof(widths));
        }

        Widths = widths.ToArray();
        blocks = new ModuleList<Linear>();
        int input = FashionMnist.Pixels;
        foreach (int w in Widths)
        {
            blocks.Add(nn.Linear(input, w));
            input = w;
        }

        RegisterComponents();
    }

    /// <summary>The block widths.</summary>
    public IReadOnlyList<int> Widths { get; }

    /// <summary>The feature width (the last block's).</summary>
    public int FeatureWidth => Widths[^1];

    /// <inheritdoc />
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = input;
        foreach (var block in blocks)
        {
            x = nn.functional.relu(block.call(x));
        }

        using var scale = Math.Sqrt(FeatureWidth).ToScalar();
        return nn.functional.normalize(x, p: 2, dim: -1).mul_(scale).MoveToOuterDisposeScope();
    }

    /// <summary>A copy of the parameters as a state dict (float32, detached).</summary>
    public StateDict ToStateDict() => StateDict.FromModule(this);

    /// <summary>Copies <paramref name="weights"/> into the module's parameters (names must match).</summary>
    public void Load(StateDict weights) => LoadInto(this, weights);

    /// <summary>Copies each named tensor into the module's tensor of that name.</summary>
    internal static void LoadInto(nn.Module module, StateDict weights)
    {
        ArgumentNullException.ThrowIfNull(weights);
        var own = module.state_dict();
        if (own.Count != weights.Count || own.Keys.Any(k => !weights.ContainsKey(k)))
        {
            throw new ArgumentException($"The weights have names [{string.Join(", ", weights.Names)}] but the module has [{string.Join(", ", own.Keys)}].", nameof(weights));
        }

        using var noGrad = no_grad();
        foreach (var (name, target) in own)
        {
            target.copy_(weights[name]);
        }
    }
}
