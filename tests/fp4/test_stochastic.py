"""Stochastic rounding: unbiased (statistically), lands on a neighbour, reproducible per seed."""
import math

import pytest
import torch

import fp4
import fp4_reference as ref
from fp4.quantize import quantize_operand

F64 = torch.float64
DRAWS = 20000
# u is a float32 multiple of 2^-24, so P(up) is frac rounded up to 2^-24: a bias below 2^-23 steps.
RESOLUTION = 2.0 ** -23


def _check_unbiased(samples, target, lo, hi):
    """samples [draws, n] of values whose expectation is `target` [n], each in {lo, hi}."""
    assert torch.all((samples == lo) | (samples == hi)), "a draw left the two neighbours"
    step = hi - lo
    p = torch.where(step > 0, (target - lo) / torch.where(step > 0, step, 1), 0)
    sigma = step * torch.sqrt(p * (1 - p) / samples.shape[0])
    err = (samples.mean(0) - target).abs()
    bound = 6 * sigma + step * RESOLUTION + 1e-12 * target.abs()
    assert torch.all(err <= bound), f"worst z = {float(((err - step * RESOLUTION) / sigma).max()):.1f}"


def _mx_row(fmt, gen):
    top = ref.GRIDS[ref.ELEMENT_OF[fmt]].max
    row = (torch.rand(32, generator=gen, dtype=F64) * 2 - 1) * 0.9 * top * 8
    row[0], row[1] = 0.93 * top * 8, -0.77 * top * 8  # the block max sits between grid points
    row[2:6] = torch.tensor([1e-3, -1e-2, 0.0, 0.5])  # small values round to zero or the first step
    return row.to(torch.float32)


@pytest.mark.parametrize("fmt", ["mxfp4", "e1m2", "int4"])
def test_mx_sr_is_unbiased_including_the_block_max(fmt):
    gen = torch.Generator().manual_seed(3)
    row = _mx_row(fmt, gen)
    out = fp4.fake_quantize(row.expand(DRAWS, 32).contiguous(), fmt, rounding="stochastic", generator=gen)
    e = ref.mx_exponent(row.abs().max().reshape(1), ref.ELEMENT_OF[fmt], "rceil")
    scale = 2.0 ** int(e)
    lo, hi = ref.neighbours(row.double() / scale, ref.GRIDS[ref.ELEMENT_OF[fmt]])
    _check_unbiased(out.double().abs() / scale, row.double().abs() / scale, lo, hi)
    assert torch.all(torch.signbit(out) == torch.signbit(row))


def test_floor_scale_would_clip_the_block_max():
    # The same statistics detect the bias that rceil avoids: with the OCP floor scale the block
    # max 7.5 * 2^k of an e2m1 block clips to 6 * 2^k in every draw.
    row = torch.zeros(32)
    row[0] = 7.5
    out = fp4.fake_quantize(row.expand(1000, 32).contiguous(), "mxfp4", rounding="stochastic",
                            scale_mode="floor", generator=torch.Generator().manual_seed(0))
    assert torch.all(out[:, 0] == 6.0)


def test_nvfp4_sr_is_unbiased():
    gen = torch.Generator().manual_seed(4)
    row = (torch.rand(16, generator=gen, dtype=F64) * 2 - 1) * 3.7
    row[0] = 5.3
    row = row.to(torch.float32)
    x_dq, s_g = quantize_operand(row.expand(DRAWS, 16).contiguous(), "nvfp4", -1, rounding="stochastic",
                                 generator=gen)
    # Reference scales: the E4M3 block scale is rounded *up* under SR.
    s_g_ref = ref.f32(row.double().abs().max() / 2688)
    s_b = ref.round_up_saturating(ref.f32(ref.f32(row.double().abs().max() / 6) / s_g_ref), ref.GRIDS["e4m3"])
    assert s_g.item() == s_g_ref.item()
    v = ref.f32(row.double() / ref.f32(s_b * s_g_ref)).abs()
    assert v.max() <= 6  # rounding the scale up means the block max cannot clip
    lo, hi = ref.neighbours(v, ref.GRIDS["e2m1"])
    q = x_dq.double().abs() / s_b  # x_dq = q * s_b exactly
    _check_unbiased(q, v, lo, hi)
    # And the dequantized mean is x up to the float32 rounding of s and x / s.
    mean = (x_dq.double() * s_g.double()).mean(0)
    assert torch.all((mean - row.double()).abs() <= 6 * (hi - lo) * s_b * s_g_ref / math.sqrt(DRAWS)
                     + 1e-6 * row.double().abs())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_sr_is_unbiased(fmt):
    gen = torch.Generator().manual_seed(5)
    row = ref.wide_binade_values(64, gen, -24, 0).double()
    row[0] = 1.0
    row = row.to(torch.float32)
    q, s = quantize_operand(row.expand(DRAWS, 64).contiguous(), fmt, -1, rounding="stochastic", generator=gen)
    v = ref.f32(row.double() / s.double()).abs()
    lo, hi = ref.neighbours(v, ref.GRIDS[fmt])
    _check_unbiased(q.double().abs(), v, lo, hi)


@pytest.mark.parametrize("fmt", ["mxfp4", "e1m2", "int4", "nvfp4"])
def test_single_draw_over_forty_binades_has_no_aggregate_bias(fmt):
    # One draw of 2^18 values: sum of (indicator - p) over all values, normalized, is ~N(0, 1).
    gen = torch.Generator().manual_seed(6)
    if fmt == "nvfp4":
        x = ref.wide_binade_values(1 << 18, gen).reshape(-1, 16)
        x_dq, s_g = quantize_operand(x, fmt, -1, rounding="stochastic", generator=gen)
        s_g_ref = ref.f32(x.double().abs().max() / 2688)
        ratio = ref.f32(ref.f32(x.double().abs().amax(1, keepdim=True) / 6) / s_g_ref)
        s_b = ref.round_up_saturating(ratio, ref.GRIDS["e4m3"])
        keep = s_b[:, 0] > 0  # blocks far below the global amax get s_b = 0 and quantize to 0
        assert torch.all(x_dq[~keep] == 0)
        v = ref.f32(x.double()[keep] / ref.f32(s_b * s_g_ref)[keep]).abs()
        got = (x_dq.double()[keep] / s_b[keep]).abs()
        grid = ref.GRIDS["e2m1"]
    else:
        x = ref.mx_blocks(1 << 13, gen, spread=12)
        out = fp4.fake_quantize(x, fmt, rounding="stochastic", generator=gen)
        grid = ref.GRIDS[ref.ELEMENT_OF[fmt]]
        e = ref.mx_exponent(x.abs().amax(1), grid.name, "rceil")
        scale = torch.exp2(e.to(F64))[:, None]
        v, got = x.double().abs() / scale, out.double().abs() / scale
    lo, hi = ref.neighbours(v, grid)
    assert torch.all((got == lo) | (got == hi))
    between = hi > lo
    p = ((v - lo) / torch.where(between, hi - lo, 1))[between]
    up = (got == hi)[between].to(F64)
    assert between.sum() > 100_000
    z = (up - p).sum() / torch.sqrt((p * (1 - p)).sum())
    assert abs(z.item()) < 6


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "e4m3"])
def test_same_seed_same_bits_different_seed_different_bits(fmt):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(8))

    def draw(seed):
        return fp4.fake_quantize(x, fmt, rounding="stochastic",
                                 generator=torch.Generator().manual_seed(seed)).view(torch.int32)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    # Without a generator the global RNG is used, so torch.manual_seed reproduces it too.
    torch.manual_seed(123)
    a = fp4.fake_quantize(x, fmt, rounding="stochastic")
    torch.manual_seed(123)
    assert torch.equal(a, fp4.fake_quantize(x, fmt, rounding="stochastic"))


def test_nearest_ignores_the_generator():
    x = torch.randn(8, 64)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(fp4.fake_quantize(x, "mxfp4", generator=g), fp4.fake_quantize(x, "mxfp4"))
    assert torch.equal(g.get_state(), state)
