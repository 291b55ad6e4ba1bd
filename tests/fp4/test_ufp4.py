"""The UFP4 paper's scaling (scale mode "fp32") and the recipes built on it.

Scale mode fp32: blocks of 16 along `axis`, one FP32 scale s = fp32(block amax / grid max) per
block (not rounded onto E8M0 / E4M3), v = fp32(x / s) rounded to nearest even on the grid,
x_dq = fp32(q * s); an all-zero block stays zero and NaN / Inf poisons its block.
"""
import pytest
import torch

import fp4
from fp4.quantize import quantize_operand
from fp4.recipe import GEMMS, HadamardSpec, Recipe

F64 = torch.float64
# The grids written out (magnitudes; index parity = code parity, so ties go to the even index).
GRIDS = {"e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
         "e1m2": [k / 4 for k in range(8)],
         "int4": [float(k) for k in range(8)]}


def _f32(t: torch.Tensor) -> torch.Tensor:
    """float64 -> nearest float32 -> float64 (float32 ops emulated: compute in float64, round once)."""
    return t.to(torch.float32).to(F64)


def _round_grid(v: torch.Tensor, grid) -> torch.Tensor:
    g = torch.tensor(grid, dtype=F64)
    a = v.abs().clamp(max=g[-1].item())
    dist = (a.unsqueeze(-1) - g).abs()
    best = dist.min(-1, keepdim=True).values
    tied = dist == best
    # Among the nearest points (one, or two at a tie) take the one with the even index.
    idx = torch.where(tied.sum(-1) > 1, (tied & (torch.arange(len(grid)) % 2 == 0)).to(torch.int64).argmax(-1),
                      tied.to(torch.int64).argmax(-1))
    return torch.copysign(g[idx], v)


def reference_fp32_scaled(x: torch.Tensor, element: str) -> torch.Tensor:
    """float64 reference of fake_quantize(x, element, axis=-1, scale_mode="fp32") for float32 2-D x."""
    rows, cols = x.shape
    pad = (-cols) % 16
    xp = torch.cat([x.to(F64), torch.zeros(rows, pad, dtype=F64)], 1).reshape(rows, -1, 16)
    amax = xp.abs().amax(-1, keepdim=True)
    s = _f32(amax / GRIDS[element][-1])
    v = torch.where(s == 0, xp * 0, _f32(xp / torch.where(s == 0, torch.ones_like(s), s)))
    out = _f32(_round_grid(v, GRIDS[element]) * s)
    out = torch.where(torch.isfinite(amax), out, torch.full_like(out, float("nan")))
    return out.reshape(rows, -1)[:, :cols].to(torch.float32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.to(torch.float32), b.to(torch.float32)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def _wide(rows=64, cols=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.exp2(torch.randint(-30, 30, (rows, 1), generator=g).float())


@pytest.mark.parametrize("element", ["e2m1", "e1m2", "int4"])
def test_fp32_scale_is_bit_exact_against_the_float64_reference(element):
    x = _wide(seed=1)
    x[0, :16] = 0.0                       # all-zero block stays zero
    x[1, :16] = -0.0
    x[2, 3] = float("nan")                # poisons block 0 of row 2 only
    x[3, 20] = float("inf")               # poisons block 1 of row 3 only
    x[4, :16] = torch.rand(16) * 2.0 ** -140  # subnormal amax
    grid = GRIDS[element]  # block amax = grid max -> s = 1: every midpoint is an exact tie
    mids = [(lo + hi) / 2 for lo, hi in zip(grid, grid[1:])]
    x[5, 32:48] = torch.tensor([grid[-1]] + mids + [-m for m in mids] + [grid[-1]])
    got = fp4.fake_quantize(x, element, axis=-1, scale_mode="fp32")
    want = reference_fp32_scaled(x, element)
    assert got.dtype == torch.float32 and _same_bits(got, want)
    assert bool((got[0, :16] == 0).all()) and bool(torch.signbit(got[1, :16]).all())
    assert bool(got[2, :16].isnan().all()) and not bool(got[2, 16:].isnan().any())
    assert bool(got[3, 16:32].isnan().all()) and not bool(got[3, :16].isnan().any())
    ties = got[5, 33:40].tolist()  # ties go to the even grid index
    assert ties == [grid[2 * ((i + 1) // 2)] for i in range(7)]
    # Along another axis: the same thing on the transpose.
    got0 = fp4.fake_quantize(x.t().contiguous(), element, axis=0, scale_mode="fp32")
    assert _same_bits(got0.t(), want)


@pytest.mark.parametrize("element", ["e2m1", "e1m2", "int4"])
def test_block_max_maps_onto_the_grid_max(element):
    x = _wide(seed=2)
    blocks = x.reshape(64, 5, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    s = (amax.double() / GRIDS[element][-1]).float().double()
    q = fp4.fake_quantize(x, element, scale_mode="fp32").reshape(64, 5, 16).double() / s
    at_max = blocks.abs() == amax
    assert torch.allclose(q.abs()[at_max], torch.full_like(q[at_max], GRIDS[element][-1]), rtol=2 ** -20, atol=0)
    assert bool((q.abs() <= GRIDS[element][-1] * (1 + 2 ** -20)).all())


def test_e1m2_and_int4_are_the_same_grid_up_to_scale():
    # The grids: int4 = 4 x e1m2, point for point.
    assert [4 * v for v in GRIDS["e1m2"]] == GRIDS["int4"]
    assert (fp4.formats.INT4.grid == 4 * fp4.formats.E1M2.grid).all()
    x = _wide(seed=3)
    a = fp4.fake_quantize(x, "e1m2", scale_mode="fp32")
    b = fp4.fake_quantize(x, "int4", scale_mode="fp32")
    assert torch.equal(a, b)
    gen = lambda: torch.Generator().manual_seed(7)  # SR too: same uniforms, same decisions
    sr = dict(rounding="stochastic")
    assert torch.equal(fp4.fake_quantize(x, "e1m2", scale_mode="fp32", generator=gen(), **sr),
                       fp4.fake_quantize(x, "int4", scale_mode="fp32", generator=gen(), **sr))
    # Under MX scales too: the E8M0 exponents differ by exactly emax_elem(int4) - emax_elem(e1m2) = 2.
    assert torch.equal(fp4.fake_quantize(x, "e1m2"), fp4.fake_quantize(x, "int4"))


def test_e2m1_is_mxfp4_under_mx_scales_and_fp32_is_not():
    x = _wide(seed=4)
    for mode in ("floor", "ceil", "rceil", "even"):
        assert torch.equal(fp4.fake_quantize(x, "e2m1", scale_mode=mode), fp4.fake_quantize(x, "mxfp4", scale_mode=mode))
    assert not torch.equal(fp4.fake_quantize(x, "e2m1", scale_mode="fp32"), fp4.fake_quantize(x, "mxfp4"))
    with pytest.raises(ValueError, match="use fmt 'e2m1'"):
        fp4.fake_quantize(x, "mxfp4", scale_mode="fp32")
    with pytest.raises(ValueError, match="MX formats"):
        fp4.fake_quantize(x, "nvfp4", scale_mode="fp32")


def test_fp32_scale_kernel_equals_the_reference_and_returns_float32():
    pytest.importorskip("triton")
    x = _wide(seed=5)
    for rounding in ("nearest", "stochastic"):
        got = quantize_operand(x, "e1m2", -1, rounding=rounding, scale_mode="fp32", backend="triton",
                               generator=torch.Generator().manual_seed(3))
        want = quantize_operand(x, "e1m2", -1, rounding=rounding, scale_mode="fp32", backend="torch",
                                generator=torch.Generator().manual_seed(3))
        assert got[1] is None and want[1] is None
        assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)), rounding
    # auto takes the reference (here on the CPU anyway) and bfloat16 input still gives float32 values.
    x_dq, ts = quantize_operand(x.bfloat16(), "e1m2", -1, scale_mode="fp32")
    assert ts is None and x_dq.dtype == torch.float32
    assert fp4.fake_quantize(x.bfloat16(), "e1m2", scale_mode="fp32").dtype == torch.bfloat16


# ---- recipes ------------------------------------------------------------------------------------
def test_ufp4_is_e1m2_fp32_blocks_random_hadamard_everywhere_sr_on_dy():
    for element in ("e1m2", "int4"):
        specs = Recipe("wgrad", "none", "ufp4", ufp4_element=element).specs
        for gemm in GEMMS:
            assert specs[gemm].hadamard == HadamardSpec(16, "step")
            for name, op in specs[gemm].operands.items():
                assert (op.fmt, op.scale_mode) == (element, "fp32")
                assert op.rounding == ("stochastic" if name == "dy" else "nearest")
    described = Recipe("wgrad", format="ufp4").describe()
    assert described["fp4_element"] == "e1m2" and described["gemms"]["fprop"]["x"]["scale_mode"] == "fp32"
    assert "signs:fprop:step" in Recipe("wgrad", format="ufp4").random_draws


def test_ufp4_e2m1_is_the_strong_e2m1_baseline():
    specs = Recipe("wgrad", "none", "ufp4_e2m1").specs
    assert specs["wgrad"].hadamard == HadamardSpec(16, "step")
    assert specs["fprop"].hadamard is None and specs["dgrad"].hadamard is None
    for gemm in GEMMS:
        for name, op in specs[gemm].operands.items():
            assert (op.fmt, op.scale_mode) == ("e2m1", "fp32")
            assert op.rounding == ("stochastic" if name == "dy" else "nearest")
    assert Recipe("wgrad", format="ufp4_e2m1").describe()["fp4_element"] == "e2m1"


def test_h16_all_is_deterministic_h16_on_every_fp4_gemm():
    specs = Recipe("wgrad", "h16_all").specs
    assert all(specs[g].hadamard == HadamardSpec(16, "none") for g in GEMMS)
    assert Recipe("wgrad", "h16_all").random_draws == ()
    assert Recipe("wgrad", "h16").specs["fprop"].hadamard is None  # h16 stays Wgrad only
    fprop_rung = Recipe("fprop", "h16_all").specs
    assert fprop_rung["fprop"].hadamard == HadamardSpec(16, "none") and fprop_rung["wgrad"].hadamard is None
    with pytest.raises(ValueError, match="every GEMM"):
        Recipe("wgrad", "h16_all", stabilizer_gemms=["wgrad"])


def test_a_ufp4_linear_runs_its_gemms_in_float32_with_fp32_scales():
    from torch import nn
    from fp4.linear import QuantLinear, record_gemms
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 48), Recipe("wgrad", format="ufp4_e2m1", seed=1))
    x = torch.randn(32, 64, requires_grad=True)
    with record_gemms() as records, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert {r.scale_mode for r in records} == {"fp32"} and {r.fmt for r in records} == {"e2m1"}
    # Fprop by hand: both operands quantized with FP32 16-blocks along in_features, product in float32.
    xq = quantize_operand(x.detach().bfloat16(), "e2m1", -1, scale_mode="fp32")[0]
    wq = quantize_operand(layer.weight.detach(), "e2m1", -1, scale_mode="fp32")[0]
    want = (torch.addmm(layer.bias.float(), xq, wq.t())).bfloat16()
    assert torch.equal(y, want)
