"""Element grids and rounding (fp4.formats) against the brute-force reference in fp4_reference."""
import math

import pytest
import torch

from fp4.formats import ELEMENT_FORMATS, get_format, round_to_grid
from fp4_reference import GRIDS, assert_same_bits, neighbours, round_nearest_even, round_up_saturating, wide_binade_values

NAMES = ["e2m1", "e1m2", "int4", "e4m3", "e5m2"]
F32_TINY = 2.0 ** -149


def _edge_values(name):
    """Grid points, exact midpoints, one float32 ulp either side, saturation and special values."""
    g = GRIDS[name].values
    mids = ((g[1:] + g[:-1]) / 2).to(torch.float32)  # midpoints of these grids are float32-exact
    top = GRIDS[name].max
    step = float(g[-1] - g[-2])
    specials = torch.tensor([0.0, top + step / 2, top + step, 2 * top, 1e30, math.inf, math.nan,
                             F32_TINY, 3 * F32_TINY, 2.0 ** -126, 2.0 ** -127 * 1.5,
                             torch.finfo(torch.float32).max], dtype=torch.float32)
    inf = torch.tensor(math.inf)
    values = torch.cat([g.to(torch.float32), mids, torch.nextafter(mids, inf),
                        torch.nextafter(mids, -inf), specials])
    return torch.cat([values, -values])


def test_descriptor_grids_match_decoded_bit_codes():
    assert sorted(ELEMENT_FORMATS) == sorted(NAMES)
    for name in NAMES:
        fmt = get_format(name)
        assert torch.equal(fmt.grid, GRIDS[name].values), name
        assert fmt.max == GRIDS[name].max
        assert fmt.emax_elem == math.floor(math.log2(fmt.max))
        assert fmt.min_subnormal == float(GRIDS[name].values[1])
    assert (get_format("e4m3").max, get_format("e5m2").max, get_format("int4").max) == (448, 57344, 7)


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match="e2m1.*int4"):
        get_format("e3m0")
    with pytest.raises(ValueError, match="nearest"):
        round_to_grid(torch.ones(3), get_format("e2m1"), "truncate")


def test_hand_checked_ties_go_to_even():
    # Spec examples: e2m1 midpoints round to the neighbour whose mantissa bit is 0.
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, -0.25])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0, -0.0], dtype=torch.float64)
    assert_same_bits(round_to_grid(v, get_format("e2m1")), want)
    # int4: half-integers go to the even integer; -8 is not on the symmetric grid.
    v = torch.tensor([0.5, 1.5, 2.5, 6.5, 7.5, -7.5, -9.0])
    want = torch.tensor([0.0, 2.0, 2.0, 6.0, 7.0, -7.0, -7.0], dtype=torch.float64)
    assert_same_bits(round_to_grid(v, get_format("int4")), want)


@pytest.mark.parametrize("name", NAMES)
def test_nearest_matches_bruteforce_on_a_million_values(name):
    gen = torch.Generator().manual_seed(1000 + NAMES.index(name))
    v = wide_binade_values(1 << 20, gen)  # 2^-20 .. 2^20: subnormals, every binade, saturation
    assert_same_bits(round_to_grid(v, get_format(name)), round_nearest_even(v, GRIDS[name]))


@pytest.mark.parametrize("name", NAMES)
def test_nearest_edge_cases(name):
    v = _edge_values(name)
    got = round_to_grid(v, get_format(name))
    assert_same_bits(got, round_nearest_even(v, GRIDS[name]))
    top = GRIDS[name].max
    assert got[v == math.inf].item() == top and got[v == -math.inf].item() == -top


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_float32_inputs_agree(name):
    gen = torch.Generator().manual_seed(7)
    v = wide_binade_values(4096, gen)
    fmt = get_format(name)
    assert_same_bits(round_to_grid(v.double(), fmt), round_to_grid(v, fmt))


def test_round_up_is_ceiling_onto_e4m3_grid():
    gen = torch.Generator().manual_seed(3)
    v = wide_binade_values(1 << 16, gen, -12, 10).abs()
    edges = _edge_values("e4m3")
    v = torch.cat([v, edges[~torch.signbit(edges) & ~torch.isnan(edges)]])
    assert_same_bits(round_to_grid(v, get_format("e4m3"), "up"), round_up_saturating(v, GRIDS["e4m3"]))


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_lands_on_a_neighbour(name):
    gen = torch.Generator().manual_seed(11)
    v = torch.cat([wide_binade_values(1 << 16, gen, -12, 18), _edge_values(name)])
    v = v[~torch.isnan(v)]
    got = round_to_grid(v, get_format(name), "stochastic", generator=gen)
    lo, hi = neighbours(v, GRIDS[name])
    assert torch.all((got.abs() == lo) | (got.abs() == hi))
    assert torch.all(torch.signbit(got) == torch.signbit(v))
    on_grid = lo == hi
    assert torch.equal(got[on_grid].abs(), lo[on_grid])  # representable values never move


def test_stochastic_uniform_threshold_rule():
    # hi iff u < frac: frac = 0.25 between e2m1 points 1 and 1.5 (v = 1.125).
    v = torch.full((4,), 1.125)
    u = torch.tensor([0.0, 0.2499999, 0.25, 0.9])
    got = round_to_grid(v, get_format("e2m1"), "stochastic", uniforms=u)
    assert got.tolist() == [1.5, 1.5, 1.0, 1.0]
    nan = round_to_grid(torch.tensor([math.nan]), get_format("e2m1"), "stochastic")
    assert torch.isnan(nan).all()
