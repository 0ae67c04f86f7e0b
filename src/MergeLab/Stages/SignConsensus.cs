using MergeLab.Tensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MergeLab.Stages;

/// <summary>What the elected sign of a parameter is computed from.</summary>
public enum SignElection
{
    /// <summary>The sign of the sum of the values (TIES "mass"; PEFT <c>total</c>; mergekit <c>sum</c>).</summary>
    Sum,

    /// <summary>The sign of the sum of the signs: the more frequent sign (PEFT <c>frequency</c>;
    /// mergekit <c>count</c>).</summary>
    Count,
}

/// <summary>The sign a parameter gets when its election sums to exactly 0.</summary>
public enum ZeroSignRule
{
    /// <summary>+1 (mergekit, PEFT).</summary>
    Positive,

    /// <summary>The sign of the sum of all elected signs in the scope (the TIES authors'
    /// <c>resolve_zero_signs(…, "majority")</c>); if that is 0 too, the sign stays 0 and only
    /// negative entries agree, as in the authors' <c>disjoint_merge</c>.</summary>
    Majority,
}

/// <summary>
/// The sign-consensus stage of TIES-style merging: elects one sign per parameter across the experts and
/// keeps, for each expert, only the entries that agree with it. An entry of 0 never agrees.
/// </summary>
/// <param name="Election">What the sign is elected from. Default <see cref="SignElection.Sum"/>.</param>
/// <param name="ElectOnWeighted">Elect on the weighted task vectors w_k·τ_k (mergekit) rather than the
/// unweighted ones (PEFT). Agreement is judged on the same values. Default true.</param>
/// <param name="ZeroRule">The sign of a parameter whose election sums to 0. Default
/// <see cref="ZeroSignRule.Positive"/>.</param>
/// <param name="MajorityScope">For <see cref="ZeroSignRule.Majority"/>: whether the majority is taken
/// over the tensor or over the whole model (the authors' code). Default per tensor.</param>
/// <remarks>Immutable and thread-safe.</remarks>
public sealed record SignConsensus(
    SignElection Election = SignElection.Sum,
    bool ElectOnWeighted = true,
    ZeroSignRule ZeroRule = ZeroSignRule.Positive,
    SelectionScope MajorityScope = SelectionScope.PerTensor)
{
    /// <summary>What the sign is elected from (checked when set).</summary>
    public SignElection Election { get; init => field = Options.Defined(value, nameof(Election)); } = Options.Defined(Election, nameof(Election));

    /// <summary>The sign of a parameter whose election sums to 0 (checked when set).</summary>
    public ZeroSignRule ZeroRule { get; init => field = Options.Defined(value, nameof(ZeroRule)); } = Options.Defined(ZeroRule, nameof(ZeroRule));

    /// <summary>The majority's scope for <see cref="ZeroSignRule.Majority"/> (checked when set).</summary>
    public SelectionScope MajorityScope { get; init => field = Options.Defined(value, nameof(MajorityScope)); } = Options.Defined(MajorityScope, nameof(MajorityScope));

    /// <summary>Whether the zero rule needs a whole-model pass.</summary>
    public bool NeedsWholeModelMajority => ZeroRule == ZeroSignRule.Majority && MajorityScope == SelectionScope.WholeModel;

    /// <summary>The elected sign per parameter before the zero rule: sign of Σ values or Σ signs
    /// over the leading (expert) dimension of <paramref name="electorate"/>.</summary>
    public Tensor RawSign(Tensor electorate)
    {
        using var scope = NewDisposeScope();
        var score = Election == SignElection.Sum ? electorate.sum(dim: 0) : electorate.sign().sum(dim: 0);
        return score.sign().MoveToOuterDisposeScope();
    }

    /// <summary>Applies the zero rule to <paramref name="rawSign"/> in place and returns it.</summary>
    /// <param name="rawSign">The elected signs, −1, 0 or +1.</param>
    /// <param name="wholeModelMajority">The majority sign over the whole model, when that is the scope.</param>
    public Tensor ResolveZeros(Tensor rawSign, float? wholeModelMajority = null)
    {
        using var zero = rawSign.eq(ScalarArgs.Zero);
        float fill = ZeroRule == ZeroSignRule.Positive ? 1f
            : MajorityScope == SelectionScope.WholeModel
                ? wholeModelMajority ?? throw new InvalidOperationException("The whole-model majority sign was not computed.")
                : Math.Sign(rawSign.sum().item<float>());
        using var fillScalar = fill.ToScalar();
        return rawSign.masked_fill_(zero, fillScalar);
    }

    /// <summary>Which entries agree with the elected sign: where sign &gt; 0, the positive entries;
    /// elsewhere the negative ones (<c>torch.where(sign &gt; 0, x &gt; 0, x &lt; 0)</c>).</summary>
    public static Tensor Agreement(Tensor electorate, Tensor sign)
    {
        using var scope = NewDisposeScope();
        return where(sign.gt(ScalarArgs.Zero), electorate.gt(ScalarArgs.Zero), electorate.lt(ScalarArgs.Zero)).MoveToOuterDisposeScope();
    }
}
