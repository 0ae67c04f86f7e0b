using System.Collections;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Tensors;

/// <summary>
/// An ordered map from parameter names to tensors: a model's weights, or a set of task vectors.
/// </summary>
/// <remarks>
/// A <see cref="StateDict"/> owns the tensors added to it: they are detached from any
/// <see cref="DisposeScope"/> when added and disposed with the dictionary. Names keep their insertion
/// order, which is the order merges and writers visit them. Instances are not thread-safe for
/// concurrent mutation; concurrent reads are safe. Once disposed, every member but
/// <see cref="Dispose"/> throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public sealed class StateDict : IReadOnlyDictionary<string, Tensor>, IDisposable
{
    private readonly List<string> _names = [];
    private readonly Dictionary<string, Tensor> _tensors = new(StringComparer.Ordinal);
    private bool _disposed;

    /// <summary>Creates an empty state dict.</summary>
    public StateDict()
    {
    }

    /// <summary>Creates a state dict that takes ownership of the given named tensors, in order.</summary>
    /// <exception cref="ArgumentException">A name occurs twice.</exception>
    public StateDict(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        foreach (var (name, tensor) in tensors)
        {
            Add(name, tensor);
        }
    }

    /// <summary>
    /// A detached copy of every tensor of <paramref name="module"/>'s <c>state_dict()</c> (parameters and
    /// buffers, in the module's order, same dtypes and devices): what merges and task vectors take.
    /// </summary>
    public static StateDict FromModule(nn.Module module)
    {
        ArgumentNullException.ThrowIfNull(module);
        var result = new StateDict();
        try
        {
            foreach (var (name, value) in module.state_dict())
            {
                using var detached = value.detach();
                var copy = detached.clone();
                try
                {
                    result.Add(name, copy);
                }
                catch
                {
                    copy.Dispose();
                    throw;
                }
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }

    /// <summary>The parameter names, in insertion order.</summary>
    public IReadOnlyList<string> Names => Live._names;

    /// <summary>The number of tensors.</summary>
    public int Count => Live._names.Count;

    /// <summary>The total number of elements over all tensors.</summary>
    public long ElementCount => Live._names.Sum(n => _tensors[n].numel());

    /// <summary>The tensor stored under <paramref name="name"/>.</summary>
    /// <exception cref="KeyNotFoundException">No tensor has that name; the message names it.</exception>
    public Tensor this[string name]
    {
        get
        {
            ThrowIfDisposed();
            return _tensors.TryGetValue(name, out var t)
                ? t
                : throw new KeyNotFoundException($"The state dict has no tensor named '{name}'.");
        }
    }

    /// <summary>Adds a tensor and takes ownership of it.</summary>
    /// <exception cref="ArgumentException">The name is empty or already present.</exception>
    public void Add(string name, Tensor tensor)
    {
        ThrowIfDisposed();
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(tensor);
        if (_tensors.ContainsKey(name))
        {
            throw new ArgumentException($"The state dict already has a tensor named '{name}'.", nameof(name));
        }

        _tensors.Add(name, tensor.DetachFromDisposeScope());
        _names.Add(name);
    }

    /// <summary>Whether a tensor named <paramref name="name"/> is present.</summary>
    public bool ContainsKey(string name) => Live._tensors.ContainsKey(name);

    /// <inheritdoc />
    public bool TryGetValue(string key, [System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out Tensor value) =>
        Live._tensors.TryGetValue(key, out value);

    /// <summary>The shape of the tensor named <paramref name="name"/>.</summary>
    public long[] Shape(string name) => this[name].shape;

    /// <summary>The element type of the tensor named <paramref name="name"/>.</summary>
    public ScalarType DType(string name) => this[name].dtype;

    /// <summary>The device of the first tensor (CPU when empty).</summary>
    public Device Device => Live._names.Count == 0 ? CPU : _tensors[_names[0]].device;

    /// <summary>A deep copy: every tensor cloned, same names and order.</summary>
    public StateDict Clone() => Map(t => t.clone());

    /// <summary>A copy with every tensor moved to <paramref name="device"/>.</summary>
    public StateDict To(Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        return Map(t => t.to(device, copy: true));
    }

    /// <summary>A copy with every floating-point tensor converted to <paramref name="dtype"/>;
    /// integer and boolean tensors are copied unchanged.</summary>
    public StateDict To(ScalarType dtype) =>
        Map(t => t.is_floating_point() ? t.to(dtype, copy: true) : t.clone());

    /// <summary>Builds a new state dict by applying <paramref name="map"/> to every tensor, in order.
    /// The function must return a new tensor; the result owns it.</summary>
    public StateDict Map(Func<Tensor, Tensor> map)
    {
        ArgumentNullException.ThrowIfNull(map);
        ThrowIfDisposed();
        var result = new StateDict();
        try
        {
            foreach (var name in _names)
            {
                result.Add(name, map(_tensors[name]));
            }
        }
        catch
        {
            result.Dispose();
            throw;
        }

        return result;
    }

    /// <summary>Removes the tensor named <paramref name="name"/> and hands its ownership to the caller.</summary>
    public Tensor Detach(string name)
    {
        var t = this[name];
        _tensors.Remove(name);
        _names.Remove(name);
        return t;
    }

    /// <inheritdoc />
    public IEnumerator<KeyValuePair<string, Tensor>> GetEnumerator() => Live.Entries().GetEnumerator();

    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

    IEnumerable<string> IReadOnlyDictionary<string, Tensor>.Keys => Live._names;

    IEnumerable<Tensor> IReadOnlyDictionary<string, Tensor>.Values => Live._names.Select(n => _tensors[n]);

    /// <summary>Disposes every tensor the dictionary owns.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        foreach (var t in _tensors.Values)
        {
            t.Dispose();
        }

        _tensors.Clear();
        _names.Clear();
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    /// <summary>This dictionary, checked not to be disposed: a disposed one has no tensors, and reading it
    /// as empty would make a merge of it report missing names, or return nothing, instead of the misuse.</summary>
    private StateDict Live
    {
        get
        {
            ThrowIfDisposed();
            return this;
        }
    }

    private IEnumerable<KeyValuePair<string, Tensor>> Entries()
    {
        foreach (var name in _names)
        {
            yield return new(name, _tensors[name]);
        }
    }
}
