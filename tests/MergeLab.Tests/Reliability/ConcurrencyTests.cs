using MergeLab.Engine;
using MergeLab.Methods;
using MergeLab.Stages;
using MergeLab.Tensors;
using MergeLab.Tests.IO;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Reliability;

/// <summary>Merges running at the same time in one process, on shared inputs and different outputs,
/// write exactly the bytes each writes when run alone.</summary>
public sealed class ConcurrencyTests : IDisposable
{
    private readonly TempDirectory _dir = new();
    private readonly string _base, _math, _code;

    public ConcurrencyTests()
    {
        using var baseModel = MergeFixtures.Model(21, tensors: 16, ScalarType.BFloat16);
        using var math = T.Expert(baseModel, 22);
        using var code = T.Expert(baseModel, 23);
        _base = MergeFixtures.Save(_dir, "base", baseModel, maxShardBytes: 3000);
        _math = MergeFixtures.Save(_dir, "math", math);
        _code = MergeFixtures.Save(_dir, "code", code, maxShardBytes: 5000);
    }

    public void Dispose() => _dir.Dispose();

    private static IEnumerable<MergeMethod> Methods() =>
    [
        new TiesMerge(), // three whole-model statistic passes
        new DareMerge(new DareOptions { DropRate = 0.7, Seed = 3, Combination = Combination.Ties }),
        new PcbMerge(new PcbOptions { Ratio = 0.3 }),
        new BreadcrumbsMerge(),
    ];

    private CheckpointMergeRequest Request(MergeMethod method, string output) => new()
    {
        BaseModel = _base,
        Experts = [_math, _code],
        Method = method,
        OutputDirectory = _dir.File(output),
        MaxShardBytes = 4000,
    };

    [Test]
    public async Task Two_merges_at_once_give_the_same_bytes_as_each_alone()
    {
        var methods = Methods().ToArray();
        var alone = new Dictionary<string, byte[]>[methods.Length];
        for (int i = 0; i < methods.Length; i++)
        {
            var result = CheckpointMerger.Merge(Request(methods[i], $"alone-{i}"));
            alone[i] = MergeFixtures.Files(result.OutputDirectory);
        }

        // Every pair of methods, the two merges started together.
        for (int i = 0; i < methods.Length; i++)
        {
            for (int j = i; j < methods.Length; j++)
            {
                var a = Task.Run(() => CheckpointMerger.Merge(Request(methods[i], $"pair-{i}-{j}-a")));
                var b = Task.Run(() => CheckpointMerger.Merge(Request(methods[j], $"pair-{i}-{j}-b")));
                var results = await Task.WhenAll(a, b);
                AssertSameFiles(MergeFixtures.Files(results[0].OutputDirectory), alone[i], $"{methods[i]} beside {methods[j]}");
                AssertSameFiles(MergeFixtures.Files(results[1].OutputDirectory), alone[j], $"{methods[j]} beside {methods[i]}");
            }
        }
    }

    [Test]
    public async Task One_method_object_serves_four_merges_at_once()
    {
        var method = new TiesMerge(new TiesOptions { Preset = TiesPreset.Mergekit, Density = 0.4 });
        var alone = MergeFixtures.Files(CheckpointMerger.Merge(Request(method, "alone")).OutputDirectory);
        var results = await Task.WhenAll(Enumerable.Range(0, 4).Select(k => Task.Run(() => CheckpointMerger.Merge(Request(method, $"shared-{k}")))));
        foreach (var r in results)
        {
            AssertSameFiles(MergeFixtures.Files(r.OutputDirectory), alone, r.OutputDirectory);
        }
    }

    private static void AssertSameFiles(Dictionary<string, byte[]> actual, Dictionary<string, byte[]> expected, string what)
    {
        Assert.That(actual.Keys, Is.EquivalentTo(expected.Keys), what);
        foreach (var (name, bytes) in expected)
        {
            Assert.That(actual[name], Is.EqualTo(bytes), $"{what}: {name}");
        }
    }
}
