"""Independent float64 reference for the fp4 numerics tests. Shares no code with fp4/.

Grids are enumerated by decoding every bit code of the format; rounding looks the two neighbours
of a value up in that explicit list (binary search), takes the nearer, and breaks exact ties
towards the even code (mantissa LSB 0 / even integer): no exponent or quantum arithmetic;
scale exponents are found by searching an explicit table of candidate powers of two against
the definition; float32
operations are emulated as "compute in float64, round to float32" (exact for +,-,*,/ because
float64 has more than 2 * 24 + 2 bits).
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _minifloat_codes(ebits, mbits, bias, reserved=()):
    """(value, code) for every non-negative finite code of a sign-magnitude minifloat."""
    out = []
    for code in range(2 ** (ebits + mbits)):
        if code in reserved:
            continue
        exp_field, man_field = code >> mbits, code & (2 ** mbits - 1)
        if exp_field == 0:
            value = man_field / 2 ** mbits * 2.0 ** (1 - bias)
        else:
            value = (1 + man_field / 2 ** mbits) * 2.0 ** (exp_field - bias)
        out.append((value, code))
    return out


class Grid:
    def __init__(self, name, pairs):
        pairs = sorted(pairs)
        self.name = name
        self.values = torch.tensor([p[0] for p in pairs], dtype=F64)
        self.codes = torch.tensor([p[1] for p in pairs])
        self.max = float(self.values[-1])
        assert len(set(self.values.tolist())) == len(pairs), "codes must decode to distinct values"


GRIDS = {
    "e2m1": Grid("e2m1", _minifloat_codes(2, 1, 1)),
    "e1m2": Grid("e1m2", _minifloat_codes(1, 2, 1)),
    "int4": Grid("int4", [(float(i), i) for i in range(8)]),
    # E4M3FN: only S.1111.111 is NaN. E5M2: exponent field 31 is Inf/NaN.
    "e4m3": Grid("e4m3", _minifloat_codes(4, 3, 7, reserved={127})),
    "e5m2": Grid("e5m2", _minifloat_codes(5, 2, 15, reserved=set(range(124, 128)))),
}
ELEMENT_OF = {"mxfp4": "e2m1", "e1m2": "e1m2", "int4": "int4"}
EMAX_ELEM = {"e2m1": 2, "e1m2": 0, "int4": 2}
MBITS = {"e2m1": 1, "e1m2": 2, "int4": 2}


def f32(t):
    """Round a float64 tensor to float32 and back: one emulated float32 operation."""
    return t.to(torch.float32).to(F64)


def _neighbour_indices(a, grid: Grid):
    """Indices of the largest grid point <= a and the smallest >= a (0 <= a <= max)."""
    hi = torch.searchsorted(grid.values, a, right=False)
    lo = torch.searchsorted(grid.values, a, right=True) - 1
    return lo, hi


def round_nearest_even(v, grid: Grid):
    """RNE onto the decoded grid, saturating to +-max; NaN stays NaN; sign kept (copysign).

    The two neighbours come from a binary search of the enumerated values; the nearer one wins
    and an exact tie goes to the neighbour whose bit code is even.
    """
    v = v.to(F64)
    a = torch.nan_to_num(v.abs(), nan=0.0).clamp(max=grid.max)  # past max (and Inf) saturate
    lo, hi = _neighbour_indices(a, grid)
    d_lo, d_hi = a - grid.values[lo], grid.values[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (grid.codes[hi] % 2 == 0))
    out = torch.copysign(grid.values[torch.where(take_hi, hi, lo)], v)
    return torch.where(torch.isnan(v), v, out)


def neighbours(v, grid: Grid):
    """(lo, hi): the largest grid point <= |v| and the smallest >= |v| (|v| clamped to max)."""
    a = v.to(F64).abs().clamp(max=grid.max)
    lo, hi = _neighbour_indices(a, grid)
    return grid.values[lo], grid.values[hi]


def round_up_saturating(v, grid: Grid):
    """Smallest grid point >= v for v >= 0 (max past the top)."""
    return neighbours(v, grid)[1]


# Candidate exponents wide enough for every float32 amax (2^-149 .. 2^128) and every element max.
_KS = torch.arange(-200, 200)
_POW = torch.tensor([2.0 ** int(k) for k in _KS], dtype=F64)


def _largest_k(table, x):
    """Largest k with table[k] <= x, by binary search over the explicit table of candidates."""
    return _KS[torch.searchsorted(table, x, right=True) - 1]


def _smallest_k(table, x):
    """Smallest k with table[k] >= x."""
    return _KS[torch.searchsorted(table, x, right=False)]


def mx_exponent(amax, element: str, mode: str):
    """E8M0 exponent per block by searching k against the definition; 128 for non-finite."""
    amax = amax.to(F64).reshape(-1)
    m, emax = GRIDS[element].max, EMAX_ELEM[element]
    finite, zero = torch.isfinite(amax), amax == 0
    a = torch.where(finite & ~zero, amax, torch.ones_like(amax))
    floor_log2 = _largest_k(_POW, a)
    if mode == "floor":
        e = floor_log2 - emax
    elif mode == "ceil":
        e = _smallest_k(_POW, a) - emax
    elif mode == "rceil":
        e = _smallest_k(m * _POW, a)  # smallest k with M 2^k >= amax
    elif mode == "even":
        # Round amax to MBITS bits after the leading one (half to even), then floor.
        step = _POW[floor_log2 - MBITS[element] - _KS[0]]
        c = torch.floor(a / step)
        rem = a / step - c
        up = (rem > 0.5) | ((rem == 0.5) & (c % 2 == 1))
        e = _largest_k(_POW, (c + up.to(F64)) * step) - emax
    else:
        raise AssertionError(mode)
    e = torch.where(zero, torch.full_like(e, -127), e.clamp(-127, 127))
    return torch.where(finite, e, torch.full_like(e, 128))


def mx_quantize(x, fmt: str, mode: str):
    """MX fake-quantize of x along its last dim (a multiple of 32); float64 result."""
    element = ELEMENT_OF[fmt]
    blocks = x.to(F64).reshape(-1, 32)
    bad = ~torch.isfinite(blocks).all(1)
    amax = torch.where(bad, torch.full_like(blocks[:, 0], float("inf")), blocks.abs().amax(1))
    e = mx_exponent(amax, element, mode)
    scale = _POW[e.clamp(max=127) - _KS[0]][:, None]
    out = round_nearest_even(blocks / scale, GRIDS[element]).reshape(blocks.shape) * scale
    out[bad] = float("nan")
    return out.reshape(x.shape)


def nvfp4_quantize(x, rounding="nearest", tiles=False):
    """NVFP4 (x_dq, s_g, dequantized) of a float32 x: 16-blocks along the last dim or 16x16 tiles."""
    x64 = x.to(torch.float32).to(F64)
    if tiles:
        r, c = x64.shape
        blocks = x64.reshape(r // 16, 16, c // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
    else:
        blocks = x64.reshape(-1, 16)
    gamax = x64.abs().max()
    s_g = f32(gamax / 2688)
    ratio = f32(f32(blocks.abs().amax(1) / 6) / s_g)
    e4m3 = GRIDS["e4m3"]
    s_b = round_up_saturating(ratio, e4m3) if rounding == "up" else round_nearest_even(ratio, e4m3)
    if s_g == 0:
        s_b = torch.zeros_like(s_b)
    s = f32(s_b * s_g)[:, None]
    v = torch.where(s == 0, blocks * 0, f32(blocks / s))
    q = round_nearest_even(v, GRIDS["e2m1"]).reshape(blocks.shape)
    x_dq = f32(q * s_b[:, None])
    if tiles:
        x_dq = x_dq.reshape(r // 16, c // 16, 16, 16).permute(0, 2, 1, 3)
    x_dq = x_dq.reshape(x.shape)
    if not math.isfinite(float(gamax)):
        x_dq, s_g = torch.full_like(x_dq, float("nan")), torch.tensor(float("nan"), dtype=F64)
    return x_dq, s_g, f32(x_dq * s_g)


def fp8_quantize(x, fmt: str):
    """FP8 per-tensor current scaling of a float32 x: (q, s, dequantized) in float64."""
    x64 = x.to(torch.float32).to(F64)
    amax = x64.abs().max()
    s = f32(amax / GRIDS[fmt].max)
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = round_nearest_even(f32(x64 / s), GRIDS[fmt]).reshape(x.shape)
    if not math.isfinite(float(amax)):
        q, s = torch.full_like(q, float("nan")), torch.tensor(float("nan"), dtype=F64)
    return q, s, f32(q * s)


def assert_same_bits(actual, expected):
    """Bit-exact equality (signed zeros included); any NaN matches any NaN at the same position."""
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ at {torch.nonzero(nan_a != nan_e)[:5].tolist()}"
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                torch.float64: torch.int64}[actual.dtype]
    a, e = actual[~nan_a], expected[~nan_e]
    diff = a.view(int_type) != e.view(int_type)
    if diff.any():
        idx = torch.nonzero(diff)[:5, 0]
        raise AssertionError(f"{int(diff.sum())} values differ; first: got {a[idx].tolist()}, "
                             f"expected {e[idx].tolist()}")


def wide_binade_values(n, generator, low=-20.0, high=20.0):
    """n float32 values sign * 2^U(low, high) * U(1, 2): every binade in between, both signs."""
    e = torch.empty(n, dtype=F64).uniform_(low, high, generator=generator)
    m = torch.empty(n, dtype=F64).uniform_(1, 2, generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator).to(F64) * 2 - 1
    return (sign * torch.exp2(torch.floor(e)) * m).to(torch.float32)


def random_float32_bits(n, generator):
    """n float32 values uniform over the bit patterns of finite numbers, both signs: every binade
    from the subnormals to float32 max equally often."""
    bits = torch.randint(0, 0x7F800000, (n,), generator=generator, dtype=torch.int64)
    sign = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) << 31
    return (bits | sign).to(torch.int32).view(torch.float32)


def mx_blocks(n_blocks, generator, spread=8.0):
    """[n_blocks, 32] float32: a per-block binade in 2^[-20, 20) and elements spread `spread` binades."""
    base = torch.exp2(torch.empty(n_blocks, 1, dtype=F64).uniform_(-20, 20, generator=generator).floor())
    within = wide_binade_values(n_blocks * 32, generator, -spread, 1.0).reshape(n_blocks, 32).to(F64)
    return (base * within).to(torch.float32)


def wide_tensor(shape, dtype, seed: int = 0, spread: int = 20, device="cpu") -> torch.Tensor:
    """randn with a different power-of-two magnitude per row and column (wide dynamic range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-spread, spread, (shape[0], 1), generator=g).float())
    x = x * torch.exp2(torch.randint(-4, 4, (1, shape[1]), generator=g).float())
    return x.to(dtype).to(device)
