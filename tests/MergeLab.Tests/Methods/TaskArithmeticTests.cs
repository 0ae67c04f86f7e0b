using MergeLab.Methods;
using NUnit.Framework;

namespace MergeLab.Tests.Methods;

public class TaskArithmeticTests
{
    [Test]
    public void Adds_lambda_times_the_weighted_sum_of_task_vectors()
    {
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Weights = [1, 2], Lambda = .5 });
        using var merged = T.MergeDeltas(ta, [1, -2, 4], [3, 1, -1]);
        T.Near(merged, [3.5, 0, 1]); // .5·([1,−2,4] + 2·[3,1,−1])
    }

    [Test]
    public void Normalize_divides_by_the_weight_sum()
    {
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Weights = [1, 3], Normalize = true });
        using var merged = T.MergeDeltas(ta, [4, 0], [0, 4]);
        T.Near(merged, [1, 3]);
    }

    [Test]
    public void Merges_relative_to_the_base()
    {
        var ta = new TaskArithmeticMerge(new TaskArithmeticOptions { Lambda = .5 });
        using var b = T.Vec(10, 20);
        using var e1 = T.Vec(12, 18);
        using var e2 = T.Vec(14, 20);
        using var merged = ta.MergeTensor(new TensorGroup("w", b, [e1, e2]));
        T.Near(merged, [13, 19]); // 10 + .5·(2 + 4), 20 + .5·(−2 + 0)
    }
}
