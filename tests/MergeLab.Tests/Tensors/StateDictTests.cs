using MergeLab.Tensors;
using NUnit.Framework;
using static TorchSharp.torch;

namespace MergeLab.Tests.Tensors;

public class StateDictTests
{
    [Test]
    public void Keeps_insertion_order_and_answers_shape_and_dtype_queries()
    {
        using var sd = new StateDict { { "z", zeros(2, 3) }, { "a", ones(4, dtype: ScalarType.BFloat16) } };
        Assert.That(sd.Names, Is.EqualTo(new[] { "z", "a" }));
        Assert.That(sd.Shape("z"), Is.EqualTo(new long[] { 2, 3 }));
        Assert.That(sd.DType("a"), Is.EqualTo(ScalarType.BFloat16));
        Assert.That(sd.ElementCount, Is.EqualTo(10));
        Assert.That(sd.Device.type, Is.EqualTo(TorchSharp.DeviceType.CPU));
    }

    [Test]
    public void From_module_copies_parameters_and_buffers_detached()
    {
        using var module = TorchSharp.torch.nn.Sequential(("fc", TorchSharp.torch.nn.Linear(3, 2)), ("norm", TorchSharp.torch.nn.BatchNorm1d(2)));
        using var sd = StateDict.FromModule(module);
        Assert.That(sd.Names, Is.EqualTo(module.state_dict().Keys.ToArray()));
        Assert.That(sd.Names, Does.Contain("fc.weight").And.Contain("norm.running_mean"));
        Assert.That(sd["fc.weight"].requires_grad, Is.False);
        Assert.That(T.Same(sd["fc.weight"], module.state_dict()["fc.weight"]), Is.True);

        sd["fc.weight"].add_(1); // a copy: the module keeps its weights
        Assert.That(T.Same(sd["fc.weight"], module.state_dict()["fc.weight"]), Is.False);
    }

    [Test]
    public void Duplicate_and_missing_names_are_reported()
    {
        using var sd = new StateDict { { "w", zeros(1) } };
        var dup = Assert.Throws<ArgumentException>(() => sd.Add("w", zeros(1)));
        Assert.That(dup!.Message, Does.Contain("'w'"));
        var missing = Assert.Throws<KeyNotFoundException>(() => _ = sd["v"]);
        Assert.That(missing!.Message, Does.Contain("'v'"));
    }

    [Test]
    public void Clone_is_independent_of_the_original()
    {
        using var sd = new StateDict { { "w", zeros(3) } };
        using var copy = sd.Clone();
        copy["w"].add_(1);
        Assert.That(sd["w"].sum().item<float>(), Is.EqualTo(0));
        Assert.That(copy["w"].sum().item<float>(), Is.EqualTo(3));
    }

    [Test]
    public void To_dtype_converts_floats_and_keeps_integers()
    {
        using var sd = new StateDict { { "w", ones(2) }, { "ids", arange(3) } };
        using var half = sd.To(ScalarType.Float16);
        Assert.That(half.DType("w"), Is.EqualTo(ScalarType.Float16));
        Assert.That(half.DType("ids"), Is.EqualTo(ScalarType.Int64));
    }

    [Test]
    public void To_device_copies_every_tensor()
    {
        using var sd = new StateDict { { "w", ones(2) } };
        using var moved = sd.To(CPU);
        moved["w"].add_(1);
        Assert.That(sd["w"].sum().item<float>(), Is.EqualTo(2));
    }

    [Test]
    public void Dispose_releases_the_owned_tensors_and_survives_outer_scopes()
    {
        Tensor kept;
        StateDict sd;
        using (var scope = NewDisposeScope())
        {
            kept = ones(2);
            sd = new StateDict { { "w", kept } };
        }

        Assert.That(kept.IsInvalid, Is.False, "the dict owns the tensor, not the scope");
        sd.Dispose();
        Assert.That(kept.IsInvalid, Is.True);
        Assert.Throws<ObjectDisposedException>(() => _ = sd["w"]);
    }
}

public class TaskVectorTests
{
    [Test]
    public void Task_vector_is_expert_minus_base_and_applies_back()
    {
        using var b = new StateDict { { "w", T.Vec(1, 2) }, { "ids", arange(2) } };
        using var e = new StateDict { { "w", T.Vec(4, 0) }, { "ids", arange(2) } };
        using var tv = TaskVector.Between(e, b);
        T.Near(tv["w"], [3, -2]);
        Assert.That(tv.Names, Is.EqualTo(new[] { "w" }), "integer buffers have no task vector");
        using var back = tv.ApplyTo(b, .5);
        T.Near(back["w"], [2.5, 1]);
        Assert.That(back.ContainsKey("ids"), Is.True);
    }

    [Test]
    public void Add_scale_and_combine()
    {
        using var b = new StateDict { { "w", T.Vec(0, 0) } };
        using var e1 = new StateDict { { "w", T.Vec(1, 2) } };
        using var e2 = new StateDict { { "w", T.Vec(3, -1) } };
        using var t1 = TaskVector.Between(e1, b);
        using var t2 = TaskVector.Between(e2, b);
        using var sum = t1.Add(t2);
        T.Near(sum["w"], [4, 1]);
        using var scaled = t1.Scale(-2);
        T.Near(scaled["w"], [-2, -4]);
        using var combined = TaskVector.Combine([t1, t2], [2, .5]);
        T.Near(combined["w"], [3.5, 3.5]);

        // Task vectors are named as such when they do not combine.
        using var e3 = new StateDict { { "w", T.Vec(1, 2, 3) } };
        using var t3 = TaskVector.FromDeltas(e3.Clone());
        Assert.That(() => t1.Add(t3), Throws.TypeOf<MergeException>().With.Message.Contain("task vector 1 has shape [3] but task vector 0 has [2]"));
        Assert.That(() => TaskVector.Combine([]), Throws.ArgumentException.With.Message.Contain("no task vectors"));
        Assert.That(() => TaskVector.Combine([t1, null!]), Throws.ArgumentException.With.Message.Contain("Task vector 1 is null"));
    }

    [Test]
    public void Wrapped_deltas_keep_their_dtype_and_half_precision_ones_combine_in_float32()
    {
        // Thirds of three equal bfloat16 deltas give the delta back; summed in bfloat16, 0.1 came out 0.100586.
        using var d = new StateDict { { "w", tensor(new[] { 1.0078125f, 3f, 0.1f }, ScalarType.BFloat16) } };
        using var tv = TaskVector.FromDeltas(d.Clone());
        using var combined = TaskVector.Combine([tv, tv, tv], [1.0 / 3, 1.0 / 3, 1.0 / 3]);
        T.BitEqual(combined["w"], d["w"]);

        // A float64 delta keeps its own value: 1 + 2^-40 is not a float32.
        double fine = 1 + Math.Pow(2, -40);
        using var wide = TaskVector.FromDeltas(new StateDict { { "w", tensor(new[] { fine }) } });
        using var doubled = TaskVector.Combine([wide, wide]);
        Assert.That(doubled["w"].dtype, Is.EqualTo(ScalarType.Float64));
        Assert.That(doubled["w"].item<double>(), Is.EqualTo(2 * fine));
    }

    [Test]
    public void Disagreeing_names_and_shapes_are_named()
    {
        using var b = new StateDict { { "w", zeros(2) } };
        using var e = new StateDict { { "w", zeros(3) } };
        var shape = Assert.Throws<MergeException>(() => TaskVector.Between(e, b));
        Assert.That(shape!.Message, Does.Contain("'w'").And.Contain("[3]"));

        using var other = new StateDict { { "v", zeros(2) } };
        using var tv = TaskVector.Between(b, b);
        var missing = Assert.Throws<MergeException>(() => tv.ApplyTo(other));
        Assert.That(missing!.Message, Does.Contain("'w'").And.Contain("not in the base model"));

        using var wider = new StateDict { { "w", zeros(3) } };
        var mismatch = Assert.Throws<MergeException>(() => tv.ApplyTo(wider));
        Assert.That(mismatch!.Message, Does.Contain("'w'").And.Contain("[2] in the task vector").And.Contain("[3] in the base model"));
    }
}
