using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MergeLab.MultiTask;

/// <summary>Accuracy of a backbone with a task head on a prepared split.</summary>
internal static class Evaluation
{
    private const int BatchSize = 2500;

    /// <summary>The fraction of <paramref name="split"/> that backbone + head classify correctly.</summary>
    public static double Accuracy(MlpBackbone backbone, Linear head, TaskSplit split)
    {
        backbone.eval();
        using var noGrad = no_grad();
        long correct = 0;
        for (long start = 0; start < split.Count; start += BatchSize)
        {
            using var scope = NewDisposeScope();
            long end = Math.Min(split.Count, start + BatchSize);
            var x = split.Inputs.narrow(0, start, end - start);
            var y = split.Labels.narrow(0, start, end - start);
            var predicted = head.call(backbone.call(x)).argmax(1);
            correct += predicted.eq(y).sum().item<long>();
        }

        return (double)correct / split.Count;
    }
}
