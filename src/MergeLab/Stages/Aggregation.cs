namespace MergeLab.Stages;

/// <summary>How the weighted, sign-filtered task vectors are combined into one.</summary>
public enum Aggregation
{
    /// <summary>Σ_k w_k·τ_k·m_k (task arithmetic; the TIES authors' <c>dis-sum</c>).</summary>
    Sum,

    /// <summary>Σ_k w_k·τ_k·m_k / max(Σ_k m_k, 1): the mean over the experts that agree with the elected
    /// sign (the TIES authors' <c>dis-mean</c>; PEFT's <c>disjoint_merge</c>). Needs sign consensus.</summary>
    MeanOfAgreeing,

    /// <summary>Σ_k w_k·τ_k·m_k / Σ_k w_k·m_k, a divisor of 0 taken as 1 (mergekit's <c>normalize</c>);
    /// without consensus m_k = 1 and a divisor with |Σ w| &lt; 1e-8 is taken as 1.</summary>
    WeightNormalized,
}
