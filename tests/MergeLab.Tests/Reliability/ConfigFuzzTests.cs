using MergeLab.Config;
using MergeLab.Tests.Config;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>
/// Fuzzes the config parser and planner (<see cref="MergeConfig.Parse"/>, <see cref="MergeConfig.Load"/>,
/// <see cref="MergePlan.Create(MergeConfig, IReadOnlyList{string}, long)"/>) with mutated valid configs
/// and generated attacks: each input either gives a plan or raises a <see cref="MergeConfigException"/>;
/// never another exception, a crash (a stack overflow on deep nesting), a hang, or an alias expansion.
/// </summary>
[Category("Fuzz")]
public sealed class ConfigFuzzTests : IDisposable
{
    /// <summary>Managed bytes per input byte parsing and planning may allocate, plus a constant. YAML
    /// parsing allocates several objects per character; an alias bomb that expanded would exceed this
    /// by orders of magnitude. Measured: about 210 bytes per byte on inputs over 64 KiB.</summary>
    internal const int AllocationPerByte = 500;

    internal const long AllocationConstant = 4 << 20;

    private readonly ConfigFolder _folder = new("base", "math", "code");

    public void Dispose() => _folder.Dispose();

    [Test]
    public void Mutated_configs_give_a_plan_or_raise_the_config_error()
    {
        var summary = FuzzHarness.Run("config", defaultIterations: 6000, defaultBudget: TimeSpan.FromSeconds(20),
            ConfigMutator.Next,
            (input, meter) => Check(_folder.Root, input, meter),
            e => e is MergeConfigException,
            input => AllocationPerByte * input.TotalBytes + AllocationConstant);

        if (FuzzHarness.DefaultBudget)
        {
            Assert.That(summary.Iterations, Is.GreaterThanOrEqualTo(1000));
            Assert.That(summary.Loaded, Is.GreaterThan(summary.Iterations / 50), "some mutations still make a valid plan");
            Assert.That(summary.DistinctReasons, Is.GreaterThan(30));
        }
    }

    /// <summary>Parses (or, for every tenth UTF-8 input, loads from a file) and plans the config, and
    /// checks the plan: every model exists and every tensor has a method.</summary>
    internal static void Check(string root, FuzzCase input, AllocationMeter meter)
    {
        var bytes = input.Files.Values.Single();
        string source = Path.Combine(root, "merge.yml");
        MergeConfig config;
        if (ConfigMutator.IsUtf8(bytes) && (input.Recipe.GetHashCode(StringComparison.Ordinal) & 0xF) < 2)
        {
            File.WriteAllBytes(source, bytes);
            config = meter.Measure(() => MergeConfig.Load(source));
        }
        else
        {
            string yaml = ConfigMutator.Decode(bytes);
            config = meter.Measure(() => MergeConfig.Parse(yaml, source));
        }

        var plan = meter.Measure(() => MergePlan.Create(config, ConfigNames.ThreeLayers, seed: 7));
        Assert.That(plan.Methods, Is.Not.Empty);
        Assert.That(plan.ExpertPaths, Is.Not.Empty);
        foreach (var path in plan.ExpertPaths.Append(plan.TokenizerSource).Concat(plan.BaseModelPath is null ? [] : [plan.BaseModelPath]))
        {
            Assert.That(Directory.Exists(path) || File.Exists(path), Is.True, $"the plan names '{path}', which does not exist");
        }

        foreach (var name in ConfigNames.ThreeLayers)
        {
            Assert.That(plan.MethodFor(name), Is.Not.Null);
        }
    }
}
