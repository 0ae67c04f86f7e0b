using MergeLab.Methods;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Benchmarks;

/// <summary>
/// One parameter of a benchmark: a base of standard normal entries and experts that are the base plus a
/// small dense fine-tuning delta each (0.01 standard deviations), in one [N + 1, rows, columns] tensor of
/// the benchmark's dtype on the benchmark's device (seeded, so every run draws the same).
/// </summary>
public sealed class ExpertGroup : IDisposable
{
    private ExpertGroup(Tensor inputs, string name, int experts)
    {
        Inputs = inputs;
        Group = new TensorGroup(name, inputs[0], Enumerable.Range(1, experts).Select(k => inputs[k]).ToArray());
    }

    /// <summary>Draws the parameter <paramref name="name"/> of <paramref name="rows"/>×<paramref name="columns"/>
    /// for a base and <paramref name="experts"/> experts; the caller disposes it (in its global clean-up).</summary>
    public static ExpertGroup Create(string name, long rows, long columns, int experts, ScalarType dtype)
    {
        BenchmarkDevice.Initialize();
        torch.manual_seed(0);
        Tensor inputs;
        using (var scope = NewDisposeScope())
        {
            var all = new Tensor[experts + 1];
            all[0] = randn(rows, columns);
            for (int k = 1; k <= experts; k++)
            {
                all[k] = all[0] + 0.01 * randn(rows, columns);
            }

            inputs = stack(all).to(dtype).to(BenchmarkDevice.Device).MoveToOuterDisposeScope();
        }

        // The views are taken outside the scope, which would dispose them on leaving.
        return new ExpertGroup(inputs, name, experts);
    }

    /// <summary>The base and the experts as views of one tensor (row 0 the base, rows 1..N the experts).</summary>
    public TensorGroup Group { get; }

    /// <summary>All the inputs as one [N + 1, rows, columns] tensor.</summary>
    public Tensor Inputs { get; }

    public void Dispose()
    {
        Group.Base!.Dispose();
        foreach (var t in Group.Experts)
        {
            t.Dispose();
        }

        Inputs.Dispose();
    }
}
