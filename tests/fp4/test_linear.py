"""QuantLinear: which GEMMs are quantized how (trace records *and* manual recomputation), randomness,
non-finite checks, the bf16 identity, and the FP8 GEMM path (run on CPU through torch._scaled_mm)."""
import contextlib
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp4.linear as linear
from fp4 import fp8_gemm
from fp4.transforms import random_signs
from fp4.linear import (ExecutionConfig, NonFiniteError, QuantLinear, QuantState, gemm_paths, record_gemms,
                        swap_linears)
from fp4.quantize import fake_quantize, quantize_operand
from fp4.recipe import GemmSpec, HadamardSpec, OperandSpec, Recipe

T, IN, OUT = 32, 64, 48
FP4_GEMMS_BY_RUNG = {"fp8": set(), "fprop": {"fprop"}, "dgrad": {"fprop", "dgrad"},
                     "wgrad": {"fprop", "dgrad", "wgrad"}}
# The operand dim each GEMM blocks along (its reduction axis), for X [T, in], W [out, in], dY [T, out].
AXES = {("fprop", "x"): -1, ("fprop", "w"): -1, ("dgrad", "dy"): -1, ("dgrad", "w"): 0,
        ("wgrad", "dy"): 0, ("wgrad", "x"): 0}
close = dict(rtol=1e-5, atol=1e-5)


def tensors(seed=0, t=T, in_f=IN, out_f=OUT, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, in_f, generator=g).to(dtype)
    dy = torch.randn(t, out_f, generator=g).to(dtype)
    return x, dy


def make_layer(recipe, in_f=IN, out_f=OUT, bias=True, state=None, name="blocks.0.mlp", dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = QuantLinear.from_linear(copy.deepcopy(ref), recipe, state or QuantState(seed=recipe.seed), 3, name)
    return ref, layer


def run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def q(t, fmt, axis, **kw):
    """Grid values and tensor scale straight from the quantizer: the test's own reference."""
    grid, scale = quantize_operand(t, fmt, axis, backend="torch", **kw)
    return grid.float() * (1.0 if scale is None else scale.float())


# ---- bf16: exactly nn.Linear ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, shape, debug", list(itertools.product(
    (torch.float32, torch.bfloat16), ((T, IN), (2, 16, IN)), (False, True))))
def test_bf16_recipe_is_bit_identical_to_nn_linear(dtype, shape, debug):
    ref, layer = make_layer(Recipe("bf16"), dtype=dtype)
    layer.check_finite = debug  # the checking / recording probes must not change a single bit
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dy = torch.randn(*shape[:-1], OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
    with record_gemms() if debug else contextlib.nullcontext([]) as records:
        got = run(layer, x, dy)
    want = run(ref, x, dy)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if debug:
        assert {(r.gemm, r.path) for r in records} == {(g, "bf16") for g in ("fprop", "dgrad", "wgrad")}


def test_bf16_recipe_under_cpu_autocast_matches_nn_linear():
    ref, layer = make_layer(Recipe("bf16"))
    x, dy = tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(layer, x, dy.bfloat16()), run(ref, x, dy.bfloat16())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_state_dict_keys_identical_and_loadable_both_ways():
    ref, layer = make_layer(Recipe("wgrad", "h16"))
    assert list(layer.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    other = nn.Linear(IN, OUT)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.weight, other.weight)
    ref.load_state_dict(QuantLinear(IN, OUT, recipe=Recipe("fp8")).state_dict())
    no_bias = QuantLinear(IN, OUT, bias=False, recipe=Recipe("fp8"))
    assert list(no_bias.state_dict()) == list(nn.Linear(IN, OUT, bias=False).state_dict())


# ---- every rung x stabilizer: the trace says what ran ------------------------------------------------
@pytest.mark.parametrize("ladder, stabilizer", list(itertools.product(
    ("fp8", "fprop", "dgrad", "wgrad"), ("none", "sr", "rht", "h16"))))
def test_trace_shows_exactly_the_named_gemms_in_fp4(ladder, stabilizer):
    _, layer = make_layer(Recipe(ladder, stabilizer))
    x, dy = tensors()
    with record_gemms() as records:
        run(layer, x, dy)
    seen = {(r.gemm, r.operand): r for r in records}
    assert len(records) == 6 and set(seen) == set(AXES)
    for (gemm, operand), r in seen.items():
        fp4 = gemm in FP4_GEMMS_BY_RUNG[ladder]
        assert r.layer == "blocks.0.mlp" and r.layer_index == 3 and r.axis == AXES[(gemm, operand)]
        assert r.fmt == ("mxfp4" if fp4 else "e5m2" if operand == "dy" else "e4m3")
        stabilized = fp4 and gemm == "wgrad"
        sr = stabilized and stabilizer == "sr" and operand == "dy"
        assert r.rounding == ("stochastic" if sr else "nearest")
        assert r.hadamard == ({"rht": "16:step", "h16": "16:none"}.get(stabilizer) if stabilized else None)
        assert r.path == ("fp4:mxfp4 (emulated)" if fp4 else
                          f"fp8:{'e5m2xe4m3' if gemm != 'fprop' else 'e4m3xe4m3'} (emulated)")


# ---- and the numbers agree with a manual recomputation --------------------------------------------------
def fp8_reference(x, w, dy):
    # Per-tensor FP8 has no axis; the public fake_quantize is the reference here.
    xq, wq, dyq = fake_quantize(x, "e4m3"), fake_quantize(w, "e4m3"), fake_quantize(dy, "e5m2")
    return xq @ wq.t(), dyq @ wq, dyq.t() @ xq


@pytest.mark.parametrize("ladder", ["fp8", "fprop", "dgrad", "wgrad"])
def test_each_gemm_equals_its_manual_quantized_product(ladder):
    ref, layer = make_layer(Recipe(ladder))
    x, dy = tensors()
    w, b = ref.weight.detach(), ref.bias.detach()
    y, dx, dw, db = run(layer, x, dy)
    y_ref, dx_ref, dw_ref = fp8_reference(x, w, dy)
    y_fp4 = q(x, "mxfp4", -1) @ q(w, "mxfp4", -1).t()
    # The tolerance is far below the FP8-vs-FP4 difference, so the comparison tells formats apart.
    assert (y_ref - y_fp4).abs().max() > 100 * close["atol"]
    if ladder in ("fprop", "dgrad", "wgrad"):
        y_ref = y_fp4
    if ladder in ("dgrad", "wgrad"):
        dx_ref = q(dy, "mxfp4", -1) @ q(w, "mxfp4", 0)
    if ladder == "wgrad":
        dw_ref = q(dy, "mxfp4", 0).t() @ q(x, "mxfp4", 0)
    torch.testing.assert_close(y, y_ref + b, **close)
    torch.testing.assert_close(dx, dx_ref, **close)
    torch.testing.assert_close(dw, dw_ref, **close)
    torch.testing.assert_close(db, dy.sum(0), **close)
    assert (dw - dy.t() @ x).abs().max() > 100 * close["atol"]  # and quantized from unquantized


def test_nvfp4_applies_both_tensor_scales_to_the_output():
    ref, layer = make_layer(Recipe("wgrad", format="nvfp4", nvfp4_2d_weights=True))
    x, dy = tensors()
    w = ref.weight.detach()
    y, dx, dw, _ = run(layer, x, dy)
    torch.testing.assert_close(y, q(x, "nvfp4", -1) @ q(w, "nvfp4", -1, block_2d=True).t() + ref.bias, **close)
    torch.testing.assert_close(dx, q(dy, "nvfp4", -1) @ q(w, "nvfp4", 0, block_2d=True), **close)
    torch.testing.assert_close(dw, q(dy, "nvfp4", 0).t() @ q(x, "nvfp4", 0), **close)


@pytest.mark.parametrize("tokens", [32, 20])  # 20: the token axis is padded to the Hadamard block
def test_h16_wgrad_equals_manual_hadamard_quantized_product(tokens):
    ref, layer = make_layer(Recipe("wgrad", "h16"))
    x, dy = tensors(t=tokens)
    _, dx, dw, _ = run(layer, x, dy)
    pad = lambda t: F.pad(t, (0, 0, 0, -tokens % 16))
    want = q(pad(dy), "mxfp4", 0, hadamard_block=16).t() @ q(pad(x), "mxfp4", 0, hadamard_block=16)
    torch.testing.assert_close(dw, want, **close)
    torch.testing.assert_close(dx, q(dy, "mxfp4", -1) @ q(ref.weight.detach(), "mxfp4", 0), **close)


def test_hadamard_without_quantization_leaves_every_product_unchanged():
    recipe = Recipe("bf16")
    # Unquantized operands, but every GEMM transformed (fixed signs; in=40 and T=20 need padding).
    recipe.specs = {g: GemmSpec(g, OperandSpec(None), OperandSpec(None), HadamardSpec(16, "fixed"))
                    for g in ("fprop", "dgrad", "wgrad")}
    ref, layer = make_layer(recipe, in_f=40)
    x, dy = tensors(t=20, in_f=40)
    with record_gemms() as records:
        got = run(layer, x, dy)
    for a, b in zip(got, run(ref, x, dy)):
        torch.testing.assert_close(a, b, **close)
    assert {r.hadamard for r in records} == {"16:fixed"}


# ---- randomness: reproducible per (seed, step), fresh across steps where the cadence says so ----------
def dw_at(recipe, step, seed=0, call_twice=False):
    state = QuantState(seed=seed)
    state.step = step
    _, layer = make_layer(recipe, state=state)
    x, dy = tensors()
    if call_twice:
        run(layer, x, dy)
        layer.weight.grad = None
    return run(layer, x, dy)


@pytest.mark.parametrize("stabilizer", ["sr", "rht"])
def test_random_stabilizers_reproduce_per_seed_and_step_and_change_across_steps(stabilizer):
    recipe = Recipe("wgrad", stabilizer)
    dw = {step: dw_at(recipe, step)[2] for step in (0, 1)}
    assert torch.equal(dw[0], dw_at(recipe, 0)[2])
    assert not torch.equal(dw[0], dw[1])
    assert not torch.equal(dw[0], dw_at(recipe, 0, seed=1)[2])
    # Only Wgrad is stabilized: Fprop and Dgrad are deterministic.
    y0, dx0 = dw_at(recipe, 0)[:2]
    y1, dx1 = dw_at(recipe, 1)[:2]
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)


@pytest.mark.parametrize("stabilizer", ["sr", "rht"])
def test_random_stabilizers_draw_from_the_documented_generators(stabilizer):
    # SR: (seed, step, layer_index, GEMM, operand, call); step signs: (seed, step, layer_index, GEMM).
    _, layer = make_layer(Recipe("wgrad", stabilizer), state=QuantState(seed=11, step=5))
    x, dy = tensors()
    dw = run(layer, x, dy)[2]
    gen = lambda *parts: torch.Generator().manual_seed(linear.derive_seed(*parts))
    if stabilizer == "sr":
        sr = dict(rounding="stochastic", generator=gen("sr", 11, 5, 3, "wgrad", "dy", 0))
        want = q(dy, "mxfp4", 0, **sr).t() @ q(x, "mxfp4", 0)
    else:  # one sign vector, shared by both operands
        had = dict(hadamard_block=16, hadamard_signs=random_signs(16, gen("signs", 11, 5, 3, "wgrad")))
        want = q(dy, "mxfp4", 0, **had).t() @ q(x, "mxfp4", 0, **had)
    torch.testing.assert_close(dw, want, **close)


def test_h16_and_fixed_signs_are_deterministic_across_steps():
    for recipe in (Recipe("wgrad", "h16"), Recipe("wgrad", "rht", hadamard_signs="fixed")):
        assert torch.equal(dw_at(recipe, 0)[2], dw_at(recipe, 7)[2])
    assert not torch.equal(dw_at(Recipe("wgrad", "h16"), 0)[2],
                           dw_at(Recipe("wgrad", "rht", hadamard_signs="fixed"), 0)[2])


def test_sr_differs_between_micro_batches_of_one_step_and_state_round_trips():
    recipe = Recipe("wgrad", "sr")
    assert not torch.equal(dw_at(recipe, 4)[2], dw_at(recipe, 4, call_twice=True)[2])
    state = QuantState(seed=5, step=2)
    state.next_call(0)
    state.advance_step()
    assert state.step == 3 and state.next_call(0) == 0
    restored = QuantState()
    restored.load_state_dict(state.state_dict())
    assert (restored.seed, restored.step) == (5, 3)


def test_sr_is_unbiased_through_the_layer():
    _, layer = make_layer(Recipe("wgrad", "sr"))
    x, dy = tensors()
    mean = torch.zeros(OUT, IN)
    for step in range(64):
        layer.state.step = step
        layer.weight.grad = None
        mean += run(layer, x, dy)[2] / 64
    one_draw = q(dy, "mxfp4", 0, rounding="stochastic",
                 generator=torch.Generator().manual_seed(0)).t() @ q(x, "mxfp4", 0)
    exact_dy = dy.t() @ q(x, "mxfp4", 0)  # SR averages dY back; X stays nearest-rounded
    assert (mean - exact_dy).abs().mean() < 0.25 * (one_draw - exact_dy).abs().mean()


# ---- non-finite checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ladder", ["bf16", "wgrad"])
def test_check_finite_names_layer_gemm_and_operand(ladder):
    _, layer = make_layer(Recipe(ladder))
    layer.state.check_finite = True
    x, dy = tensors()
    dy[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'blocks.0.mlp'.*Dgrad.*operand dy") as err:
        run(layer, x, dy)
    assert (err.value.layer, err.value.gemm, err.value.operand) == ("blocks.0.mlp", "dgrad", "dy")
    x_bad, _ = tensors()
    x_bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="Fprop GEMM, operand x"):
        layer(x_bad)
    layer(x.clone().requires_grad_()).mul_(2)  # the checked output may still be modified in place
    # Without a Dgrad (input needs no grad) the NaN dY is caught by Wgrad.
    with pytest.raises(NonFiniteError, match="Wgrad GEMM, operand dy"):
        layer(x).backward(dy)


def test_check_finite_is_off_by_default():
    _, layer = make_layer(Recipe("wgrad"))
    x, dy = tensors()
    dy[0, 0] = float("nan")
    _, dx, _, _ = run(layer, x, dy)
    assert torch.isnan(dx).any()


# ---- paths, swapping, autocast ----------------------------------------------------------------------------
def test_gemm_paths_on_cpu_are_emulated():
    assert gemm_paths(Recipe("fprop"), "cpu") == {
        "fprop": "fp4:mxfp4 (emulated)", "dgrad": "fp8:e5m2xe4m3 (emulated)",
        "wgrad": "fp8:e5m2xe4m3 (emulated)"}
    assert gemm_paths(Recipe("fp8"), "cpu")["fprop"] == "fp8:e4m3xe4m3 (emulated)"
    assert set(gemm_paths(Recipe("bf16"), "cpu").values()) == {"bf16"}
    assert gemm_paths(Recipe("wgrad", format="ufp4", ufp4_element="int4"), "cpu")["wgrad"] == "fp4:int4 (emulated)"
    assert not fp8_gemm.fp8_path_available("cpu")


def test_swap_linears_replaces_in_place_keeping_weights():
    model = nn.Sequential(nn.Linear(8, 16), nn.ModuleDict({"attn": nn.Linear(16, 16), "head": nn.Linear(16, 4)}))
    weight = model[1]["attn"].weight
    state = QuantState(seed=9)
    n = swap_linears(model, Recipe("wgrad"), state, lambda name: not name.endswith("head"))
    assert n == 2 and type(model[1]["head"]) is nn.Linear
    attn = model[1]["attn"]
    assert isinstance(attn, QuantLinear) and attn.weight is weight and attn.state is state
    assert (model[0].name, model[0].layer_index, attn.name, attn.layer_index) == ("0", 0, "1.attn", 1)
    assert swap_linears(model, Recipe("wgrad"), state) == 1  # only the remaining plain nn.Linear


def test_autocast_quantizes_x_in_bf16_w_from_the_fp32_master_and_rounds_once():
    ref, layer = make_layer(Recipe("wgrad"))
    x, dy = tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dx, dw, db = run(layer, x, dy.bfloat16())
    assert y.dtype == torch.bfloat16 and dx.dtype == dw.dtype == db.dtype == torch.float32
    xb, dyb, w = x.bfloat16(), dy.bfloat16(), ref.weight.detach()
    y_want = (q(xb, "mxfp4", -1) @ q(w, "mxfp4", -1).t() + ref.bias).bfloat16()
    dx_want = (q(dyb, "mxfp4", -1) @ q(w, "mxfp4", 0)).bfloat16()
    bf16_close = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_want, **bf16_close)
    torch.testing.assert_close(dx, dx_want.float(), **bf16_close)
    torch.testing.assert_close(dw, (q(dyb, "mxfp4", 0).t() @ q(xb, "mxfp4", 0)).bfloat16().float(), **bf16_close)


# ---- the FP8 GEMM module (torch._scaled_mm has a CPU kernel, so the layout code runs here too) ------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_fp8_matches_the_reference_quantizer(fmt):
    x = torch.randn(40, 24) * torch.logspace(-8, 4, 24)
    for t in (x, x.bfloat16(), torch.zeros(4, 4), torch.full((3,), 1e-44)):
        q8, s = fp8_gemm.quantize_fp8(t, fmt)
        grid, scale = quantize_operand(t, fmt, -1, backend="torch")
        assert torch.equal(q8.float(), grid.float()) and torch.equal(s, scale)
    x[1, 1] = float("nan")
    q8, s = fp8_gemm.quantize_fp8(x, fmt)
    assert torch.isnan(s) and torch.isnan(q8.float()).all()


def test_fp8_mm_handles_layouts_and_dims():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 48, generator=g), torch.randn(16, 48, generator=g)
    (qa, sa), (qb, sb) = fp8_gemm.quantize_fp8(a, "e5m2"), fp8_gemm.quantize_fp8(b, "e4m3")
    want = (qa.float() @ qb.float().t()) * (sa * sb)
    torch.testing.assert_close(fp8_gemm.fp8_mm(qa, sa, qb.t(), sb, torch.float32), want, **close)
    torch.testing.assert_close(fp8_gemm.fp8_mm(qa.t().contiguous().t(), sa, qb.t().contiguous(), sb,
                                               torch.float32), want, **close)
    assert fp8_gemm.dims_fit(5, 32, 16) and not fp8_gemm.dims_fit(16, 20, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_gemm.fp8_mm(qa[:, :40], sa, qb.t()[:40], sb, torch.float32)


def test_real_fp8_path_matches_emulation(monkeypatch):
    _, layer = make_layer(Recipe("fp8"))
    x, dy = tensors()
    emulated = run(layer, x, dy)
    layer.weight.grad = layer.bias.grad = None
    monkeypatch.setattr(fp8_gemm, "fp8_path_available", lambda device: True)
    assert layer.state.execution.real_fp8  # the default ExecutionConfig allows real FP8
    with record_gemms() as records:
        real = run(layer, x, dy)
    assert {r.path for r in records} == {"fp8:e4m3xe4m3 (torch._scaled_mm)", "fp8:e5m2xe4m3 (torch._scaled_mm)"}
    for a, b in zip(real, emulated):
        torch.testing.assert_close(a, b, **close)
    assert gemm_paths(Recipe("fp8"), "cuda", ExecutionConfig(real_fp8=False))["fprop"] == "fp8:e4m3xe4m3 (emulated)"
    assert gemm_paths(Recipe("fp8"), "cuda", ExecutionConfig())["fprop"] == "fp8:e4m3xe4m3 (torch._scaled_mm)"
