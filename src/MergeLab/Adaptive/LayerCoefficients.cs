using MergeLab.Methods;
using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Adaptive;

/// <summary>
/// Merge coefficients λ_{t,l}, one per task t and layer l, with the rule that maps a parameter name to
/// its layer. The merged model is θ_p = θ0_p + Σ_t λ_{t,l(p)}·τ_{t,p} (AdaMerging, Yang et al., 2024,
/// Eq. 4 task-wise with one layer, Eq. 5 layer-wise).
/// </summary>
/// <remarks>Immutable and thread-safe.</remarks>
public sealed class LayerCoefficients
{
    private readonly double[,] _values;
    private readonly Dictionary<string, int> _layerIndex;

    /// <summary>Creates coefficients for <c>values.GetLength(0)</c> tasks over <paramref name="layers"/>.</summary>
    /// <param name="layers">The layer names, one per column of <paramref name="values"/>.</param>
    /// <param name="values">λ[task, layer]; copied.</param>
    /// <param name="layerOf">Maps a parameter name to its layer name; every merged name must map to one
    /// of <paramref name="layers"/>.</param>
    /// <exception cref="ArgumentException">The column count differs from the layer count, a layer is
    /// repeated, or a value is not finite.</exception>
    public LayerCoefficients(IReadOnlyList<string> layers, double[,] values, Func<string, string> layerOf)
    {
        ArgumentNullException.ThrowIfNull(layers);
        ArgumentNullException.ThrowIfNull(values);
        ArgumentNullException.ThrowIfNull(layerOf);
        if (values.GetLength(1) != layers.Count)
        {
            throw new ArgumentException($"There are {layers.Count} layers but {values.GetLength(1)} coefficient columns.", nameof(values));
        }

        _layerIndex = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int l = 0; l < layers.Count; l++)
        {
            if (!_layerIndex.TryAdd(layers[l], l))
            {
                throw new ArgumentException($"The layer '{layers[l]}' is listed twice.", nameof(layers));
            }
        }

        foreach (var v in values)
        {
            MergeLab.Options.RequireFinite(v, nameof(values));
        }

        Layers = layers.ToArray();
        _values = (double[,])values.Clone();
        LayerOf = layerOf;
    }

    /// <summary>The layer names, in the order of the coefficient columns.</summary>
    public IReadOnlyList<string> Layers { get; }

    /// <summary>The number of tasks (rows).</summary>
    public int TaskCount => _values.GetLength(0);

    /// <summary>Maps a parameter name to its layer name.</summary>
    public Func<string, string> LayerOf { get; }

    /// <summary>λ of task <paramref name="task"/> in layer <paramref name="layer"/> (column index).</summary>
    public double this[int task, int layer] => _values[task, layer];

    /// <summary>A copy of all coefficients, [task, layer].</summary>
    public double[,] ToArray() => (double[,])_values.Clone();

    /// <summary>λ of task <paramref name="task"/> for the parameter named <paramref name="parameterName"/>.</summary>
    /// <exception cref="KeyNotFoundException">The parameter's layer has no coefficients.</exception>
    public double For(int task, string parameterName)
    {
        var layer = LayerOf(parameterName);
        return _layerIndex.TryGetValue(layer, out int l)
            ? _values[task, l]
            : throw new KeyNotFoundException($"The parameter '{parameterName}' is in layer '{layer}', which has no coefficients.");
    }

    /// <summary>
    /// θ_p = θ0_p + Σ_t λ_{t,l(p)}·τ_{t,p}, computed in float32 (float64 for a float64 base tensor)
    /// and cast to each base tensor's dtype; base tensors the task vectors do not cover are copied.
    /// </summary>
    /// <exception cref="ArgumentException">The number of task vectors differs from <see cref="TaskCount"/>, or one is null.</exception>
    /// <exception cref="MergeException">The task vectors disagree in names or shapes, or name a tensor
    /// the base lacks.</exception>
    public StateDict ApplyTo(StateDict baseModel, IReadOnlyList<TaskVector> taskVectors)
    {
        ArgumentNullException.ThrowIfNull(baseModel);
        ArgumentNullException.ThrowIfNull(taskVectors);
        if (taskVectors.Count != TaskCount)
        {
            throw new ArgumentException($"There are {TaskCount} rows of coefficients but {taskVectors.Count} task vectors.", nameof(taskVectors));
        }

        StateDictChecks.CheckTaskVectors(taskVectors, nameof(taskVectors));
        StateDictChecks.CheckCovers(baseModel, taskVectors[0].Deltas, "the task vectors");

        var result = new StateDict();
        try
        {
            foreach (var (name, b) in baseModel)
            {
                if (!taskVectors[0].Deltas.ContainsKey(name))
                {
                    result.Add(name, b.clone());
                    continue;
                }

                using var scope = NewDisposeScope();
                var merged = b.to(b.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32, copy: true);
                for (int t = 0; t < taskVectors.Count; t++)
                {
                    using var alpha = For(t, name).ToScalar();
                    merged.add_(taskVectors[t][name].to(b.device), alpha: alpha);
                }

                result.Add(name, merged.to(b.dtype).MoveToOuterDisposeScope());
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }
}
