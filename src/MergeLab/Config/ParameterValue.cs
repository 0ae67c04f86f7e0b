namespace MergeLab.Config;

/// <summary>
/// The value of one merge parameter as written in a mergekit-style config (mergekit's
/// <c>ParameterSetting</c>): a number or boolean, a gradient (a list of numbers interpolated over the
/// layers), or a list of <c>{filter, value}</c> conditions. <see cref="Resolve"/> gives its value for
/// one tensor, following mergekit's <c>evaluate_setting</c> (<c>mergekit/config.py</c>). Values are
/// immutable and thread-safe.
/// </summary>
public abstract record ParameterValue
{
    private protected ParameterValue()
    {
    }

    /// <summary>The 1-based line of the value in the YAML, when it was parsed from one. Not part of
    /// equality: two values are equal when they resolve alike.</summary>
    public int? Line { get; init; }

    /// <summary>Equality of kind (and, in the derived records, of value), ignoring <see cref="Line"/>.</summary>
    public virtual bool Equals(ParameterValue? other) => other is not null && EqualityContract == other.EqualityContract;

    /// <inheritdoc />
    public override int GetHashCode() => EqualityContract.GetHashCode();

    /// <summary>
    /// The value for the tensor named <paramref name="tensorName"/> at layer position
    /// <paramref name="t"/> (0 for the first layer, 1 for the last; see <see cref="LayerPositions"/>), or
    /// <see langword="null"/> when no condition matches the name, in which case the next level of
    /// precedence applies (model → global → the method's default), as in mergekit. Booleans resolve to 1
    /// (true) or 0 (false).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="t"/> is not in [0, 1].</exception>
    public double? Resolve(string tensorName, double t)
    {
        ArgumentNullException.ThrowIfNull(tensorName);
        MergeLab.Options.RequireInRange(t, nameof(t), 0, 1);
        return ResolveCore(tensorName, t);
    }

    /// <summary>Whether the value is written as a boolean (every branch of a condition list included).</summary>
    public abstract bool IsBoolean { get; }

    /// <summary>Whether the value can differ between tensors (it has a gradient or a filter).</summary>
    public abstract bool VariesByTensor { get; }

    private protected abstract double? ResolveCore(string tensorName, double t);
}

/// <summary>A number, the same for every tensor.</summary>
/// <param name="Value">The number.</param>
public sealed record NumberParameter(double Value) : ParameterValue
{
    /// <inheritdoc />
    public override bool IsBoolean => false;

    /// <inheritdoc />
    public override bool VariesByTensor => false;

    private protected override double? ResolveCore(string tensorName, double t) => Value;
}

/// <summary>A boolean (mergekit's <c>normalize</c>, <c>rescale</c>, <c>int8_mask</c>), the same for
/// every tensor; it resolves to 1 or 0.</summary>
/// <param name="Value">The boolean.</param>
public sealed record BooleanParameter(bool Value) : ParameterValue
{
    /// <inheritdoc />
    public override bool IsBoolean => true;

    /// <inheritdoc />
    public override bool VariesByTensor => false;

    private protected override double? ResolveCore(string tensorName, double t) => Value ? 1 : 0;
}

/// <summary>
/// A gradient: a list of numbers interpolated piecewise-linearly over the layer position t ∈ [0, 1],
/// point i sitting at t = i/(n − 1) (mergekit's <c>evaluate_setting</c>): with s = t·(n − 1),
/// i₀ = ⌊s⌋, i₁ = min(n − 1, i₀ + 1), the value is (1 − (s − i₀))·p[i₀] + (s − i₀)·p[i₁]. A
/// one-point gradient is a constant.
/// </summary>
public sealed record GradientParameter : ParameterValue
{
    /// <summary>Creates the gradient.</summary>
    /// <param name="points">At least one finite number.</param>
    /// <exception cref="ArgumentException">The list is empty or has a non-finite number.</exception>
    public GradientParameter(IReadOnlyList<double> points)
    {
        ArgumentNullException.ThrowIfNull(points);
        if (points.Count == 0)
        {
            throw new ArgumentException("A gradient needs at least one number.", nameof(points));
        }

        for (int i = 0; i < points.Count; i++)
        {
            MergeLab.Options.RequireFinite(points[i], $"{nameof(points)}[{i}]");
        }

        Points = points.ToArray();
    }

    /// <summary>The gradient's points, first layer to last.</summary>
    public IReadOnlyList<double> Points { get; }

    /// <summary>Equal when the points are equal, in order.</summary>
    public bool Equals(GradientParameter? other) => base.Equals(other) && Points.SequenceEqual(other.Points);

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(base.GetHashCode(), Points.Count, Points[0]);

    /// <inheritdoc />
    public override bool IsBoolean => false;

    /// <inheritdoc />
    public override bool VariesByTensor => Points.Distinct().Skip(1).Any();

    private protected override double? ResolveCore(string tensorName, double t)
    {
        // Exactly mergekit's arithmetic, so values match it to the last bit.
        double scaled = t * (Points.Count - 1);
        int i0 = (int)scaled;
        int i1 = Math.Min(Points.Count - 1, i0 + 1);
        double frac = scaled - i0;
        return (1 - frac) * Points[i0] + frac * Points[i1];
    }
}

/// <summary>
/// A list of conditions (mergekit's list of <c>ConditionalParameter</c>): the first whose filter is a
/// substring of the tensor name (ordinal), or that has no filter or the filter <c>*</c>, gives the
/// value; when none matches the value is unset for that tensor and the next level of precedence applies.
/// </summary>
public sealed record ConditionalParameter : ParameterValue
{
    /// <summary>Creates the condition list.</summary>
    /// <param name="conditions">At least one condition, tried in order.</param>
    /// <exception cref="ArgumentException">The list is empty, or a condition's value is itself a
    /// condition list (mergekit allows only a number or a gradient there).</exception>
    public ConditionalParameter(IReadOnlyList<ParameterCondition> conditions)
    {
        ArgumentNullException.ThrowIfNull(conditions);
        if (conditions.Count == 0)
        {
            throw new ArgumentException("A condition list needs at least one condition.", nameof(conditions));
        }

        if (conditions.Any(c => c is null || c.Value is null || c.Value is ConditionalParameter))
        {
            throw new ArgumentException("Each condition needs a value that is a number, a boolean or a gradient.", nameof(conditions));
        }

        Conditions = conditions.ToArray();
    }

    /// <summary>The conditions, tried in order.</summary>
    public IReadOnlyList<ParameterCondition> Conditions { get; }

    /// <summary>Equal when the conditions are equal, in order.</summary>
    public bool Equals(ConditionalParameter? other) => base.Equals(other) && Conditions.SequenceEqual(other.Conditions);

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(base.GetHashCode(), Conditions.Count, Conditions[0]);

    /// <inheritdoc />
    public override bool IsBoolean => Conditions.All(c => c.Value.IsBoolean);

    /// <inheritdoc />
    public override bool VariesByTensor =>
        Conditions[0].Filter is not (null or "*") || Conditions[0].Value.VariesByTensor;

    private protected override double? ResolveCore(string tensorName, double t)
    {
        foreach (var c in Conditions)
        {
            if (c.Matches(tensorName))
            {
                return c.Value.Resolve(tensorName, t);
            }
        }

        return null;
    }
}

/// <summary>One entry of a <see cref="ConditionalParameter"/>. Immutable and thread-safe.</summary>
/// <param name="Filter">A substring of the tensor names it applies to; null or <c>*</c> matches every tensor.</param>
/// <param name="Value">A number, boolean or gradient.</param>
public sealed record ParameterCondition(string? Filter, ParameterValue Value)
{
    /// <summary>Whether the condition applies to the tensor named <paramref name="tensorName"/>.</summary>
    public bool Matches(string tensorName) =>
        Filter is null || Filter == "*" || tensorName.Contains(Filter, StringComparison.Ordinal);
}
