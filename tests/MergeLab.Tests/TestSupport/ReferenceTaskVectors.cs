namespace MergeLab.Tests;

/// <summary>
/// The reference vector of the foundation issue, which the reference-code tests run through PEFT's,
/// mergekit's and the PCB authors' own functions: τ1 = [.5, −1, .2, 0, 3, −.1],
/// τ2 = [−.4, −2, .3, 1, −1.5, .05], τ3 = [.6, .5, −.9, −2, .7, .02], weights [1, .5, 2].
/// </summary>
internal static class ReferenceTaskVectors
{
    public static readonly float[] Tau1 = [.5f, -1f, .2f, 0f, 3f, -.1f];
    public static readonly float[] Tau2 = [-.4f, -2f, .3f, 1f, -1.5f, .05f];
    public static readonly float[] Tau3 = [.6f, .5f, -.9f, -2f, .7f, .02f];
    public static readonly double[] Weights = [1, .5, 2];
}
