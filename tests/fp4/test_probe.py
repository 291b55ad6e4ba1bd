"""The GEMM probe (fp4/probe.py): an observer that changes nothing and sees all three GEMMs."""
import torch

from fp4.linear import QuantLinear, QuantState
from fp4.recipe import Recipe


def _run(recipe, probe=None, seed=0):
    torch.manual_seed(seed)
    state = QuantState(seed=3)
    layer = QuantLinear(64, 48, bias=True, recipe=recipe, state=state, name="lin")
    x = torch.randn(40, 64, requires_grad=True)
    dy = torch.randn(40, 48)
    if probe is not None:
        with state.probe_gemms(probe):
            y = layer(x)
    else:
        y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


RECIPES = [Recipe("wgrad", "none"), Recipe("wgrad", "sr"), Recipe("wgrad", "rht"), Recipe("wgrad", "h16_all"),
           Recipe("fp8", "none"), Recipe("wgrad", "none", "nvfp4"), Recipe("wgrad", "none", "ufp4")]


def test_probe_changes_nothing_bit_for_bit_and_sees_all_three_gemms():
    for recipe in RECIPES:
        seen = []
        plain = _run(recipe)
        probed = _run(recipe, seen.append)
        for a, b in zip(plain, probed):
            assert torch.equal(a, b), recipe.name
        assert [o.gemm for o in seen] == ["fprop", "dgrad", "wgrad"], recipe.name
        assert [o.operands for o in seen] == [("x", "w"), ("dy", "w"), ("dy", "x")]
        # The output handed over is the GEMM's actual output: Fprop's is the layer's.
        assert torch.equal(seen[0].output, plain[0])
        assert torch.equal(seen[2].output, plain[2])
        assert torch.equal(seen[1].output, plain[1])


def test_observation_contents_plain_and_hadamard():
    seen = []
    _run(Recipe("wgrad", "none"), seen.append)
    f = seen[0]
    x, w = f.inputs
    # Without a transform the quantized operand is compared with the input itself, and the exact
    # output is the float64 product plus bias.
    assert f.quantized_from[0] is x
    assert f.exact().dtype == torch.float64
    assert torch.allclose(f.exact(), x.double() @ w.double().t() + f.bias.double())
    assert f.exact() is f.exact()  # cached
    rel = (f.quantized[0].double() - x.double()).norm() / x.double().norm()
    assert 0.01 < rel < 0.5  # really FP4-quantized
    # With a Hadamard transform, quantized_from is the transformed operand (what was quantized), and
    # the exact (untransformed) product equals the transformed one in exact arithmetic.
    seen = []
    _run(Recipe("wgrad", "h16_all"), seen.append)
    for o in seen:
        a_t, b_t = (t.double() for t in o.quantized_from)
        a_axis, b_axis = o.axes
        transformed = (a_t if a_axis == -1 else a_t.t()) @ (b_t if b_axis == 0 else b_t.t())
        if o.bias is not None:
            transformed = transformed + o.bias.double()
        assert torch.allclose(transformed, o.exact(), atol=1e-4), o.gemm
        assert not torch.equal(o.quantized_from[0].double(), o.inputs[0].double())
        # Quantized values are close to the transformed operand, not to the untransformed one.
        err_t = (o.quantized[0].double() - a_t).norm()
        assert err_t < 0.5 * a_t.norm()


def test_probe_is_per_model_and_off_by_default():
    state_a, state_b = QuantState(), QuantState()
    assert state_a.probe is None
    seen = []
    with state_a.probe_gemms(seen.append):
        assert state_b.probe is None
        layer_b = QuantLinear(32, 32, recipe=Recipe("wgrad"), state=state_b)
        layer_b(torch.randn(4, 32))
    assert seen == [] and state_a.probe is None
