"""Scale rules (fp4.scaling) against definitions searched by brute force in fp4_reference."""
import math

import pytest
import torch

import fp4_reference as ref
from fp4.formats import get_format
from fp4.scaling import (E8M0_NAN, MX_SCALE_MODES, e8m0_decode, fp8_tensor_scale, mx_exponent,
                         nvfp4_scales)

ELEMENTS = ["e2m1", "e1m2", "int4"]
F32 = torch.float32


def _random_positive_float32(n, gen):
    """Uniform over float32 bit patterns of positive finite numbers: subnormals to 2^128 alike."""
    bits = torch.randint(1, 0x7F800000, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    return bits.view(F32)


def _edge_amaxes(element):
    """Powers of two across the whole float32 range, M * 2^k, one ulp either side, specials."""
    m = ref.GRIDS[element].max
    p = torch.tensor([2.0 ** k for k in range(-149, 128)], dtype=torch.float64)
    base = torch.cat([p, (p * m), p * 1.5, p * 1.75, p * 1.875, p * 1.9375]).to(F32)
    base = base[torch.isfinite(base) & (base > 0)]
    inf = torch.tensor(math.inf)
    near = torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf)])
    specials = torch.tensor([0.0, math.inf, math.nan, torch.finfo(F32).max, 2.0 ** -127,
                             2.0 ** -127 * 6, 2.0 ** -125, 2.0 ** -124 * 7], dtype=F32)
    return torch.cat([near[near > 0], specials])


@pytest.mark.parametrize("mode", MX_SCALE_MODES)
@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_exponent_matches_definition(element, mode):
    gen = torch.Generator().manual_seed(5)
    amax = torch.cat([_random_positive_float32(1 << 16, gen), _edge_amaxes(element)])
    got = mx_exponent(amax, get_format(element), mode)
    assert torch.equal(got, ref.mx_exponent(amax, element, mode))


def test_exponent_rules_on_hand_checked_values():
    e2m1 = get_format("e2m1")
    amax = torch.tensor([6.0, 7.0, 7.5, 8.0, 4.0, 0.0, math.inf, -math.inf, math.nan, 1e-45])
    # 6 = 1.5 * 2^2: every rule gives e = 0 except ceil (rounds 6 up to 8 -> 1).
    # 7 = 1.75 * 2^2: floor 0 (clips to 6), ceil 1, rceil 1, even: 1.75 -> 2.0 at 1 bit -> 1.
    # 7.5: same as 7. 8: all give 1. 4: floor/ceil/even 0, rceil: 6 * 2^-1 = 3 < 4 -> 0.
    want = {"floor": [0, 0, 0, 1, 0], "ceil": [1, 1, 1, 1, 0], "rceil": [0, 1, 1, 1, 0],
            "even": [0, 1, 1, 1, 0]}
    for mode, expected in want.items():
        got = mx_exponent(amax, e2m1, mode)
        assert got[:5].tolist() == expected, mode
        assert got[5].item() == -127  # all-zero block
        assert got[6:9].tolist() == [E8M0_NAN] * 3  # Inf / NaN blocks
        assert got[9].item() == -127  # 2^-149: floor would give -151, clamped


def test_e8m0_decode_keeps_float32_subnormal_scales():
    e = torch.tensor([-127, -126, 0, 127, E8M0_NAN])
    s = e8m0_decode(e)
    assert s[:4].tolist() == [2.0 ** -127, 2.0 ** -126, 1.0, 2.0 ** 127]
    assert math.isnan(s[4].item())
    # 2^-127 is a float32 subnormal and must survive the cast instead of flushing to zero.
    assert s[0].to(F32).item() == 2.0 ** -127


def _nvfp4_blocks(gen, n_tensors=16):
    for i in range(n_tensors):
        base = 2.0 ** float(torch.randint(-30, 30, (), generator=gen))
        spread = float(torch.randint(0, 24, (), generator=gen))
        yield (ref.wide_binade_values(64 * 16, gen, -spread, 1.0).double() * base).to(F32).reshape(64, 16)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_scales_match_float32_emulation(rounding):
    gen = torch.Generator().manual_seed(9)
    for blocks in _nvfp4_blocks(gen):
        s_b, s_g = nvfp4_scales(blocks, blocks.abs().amax(), rounding)
        s_g_ref = ref.f32(blocks.double().abs().max() / 2688)
        ratio = ref.f32(ref.f32(blocks.double().abs().amax(1) / 6) / s_g_ref)
        e4m3 = ref.GRIDS["e4m3"]
        want = (ref.round_up_saturating(ratio, e4m3) if rounding == "stochastic"
                else ref.round_nearest_even(ratio, e4m3))
        assert s_g.dtype == F32 and s_g.item() == s_g_ref.item()
        ref.assert_same_bits(s_b.squeeze(-1), want)


def test_nvfp4_scale_degenerate_global_amax():
    tiny = torch.full((2, 16), 2.0 ** -149)  # 2^-149 / 2688 underflows: s_g == 0
    for blocks in (torch.zeros(2, 16), tiny):
        s_b, s_g = nvfp4_scales(blocks, blocks.abs().amax())
        assert s_g.item() == 0 and torch.all(s_b == 0)


def test_fp8_tensor_scale():
    e4m3, e5m2 = get_format("e4m3"), get_format("e5m2")
    x = torch.tensor([[1.0, -3000.0], [2.5, 0.0]])
    assert fp8_tensor_scale(x, e4m3).item() == ref.f32(torch.tensor(3000.0 / 448)).item()
    assert fp8_tensor_scale(x, e5m2).item() == ref.f32(torch.tensor(3000.0 / 57344)).item()
    assert fp8_tensor_scale(torch.zeros(3), e4m3).item() == 1.0
    assert fp8_tensor_scale(torch.full((3,), 2.0 ** -149), e4m3).item() == 1.0  # underflow -> 1
    assert fp8_tensor_scale(x, e4m3).dtype == F32
