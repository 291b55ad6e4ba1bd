"""Element formats: the grids that one quantized number can take, and rounding onto them.

Every format here is a small, sign-symmetric floating-point-like grid described by three numbers:

    mbits   mantissa bits after the leading one
    emin    exponent of the smallest normal binade (below it the spacing stays 2^(emin - mbits):
            the subnormals, which make the grid uniform down to zero)
    max     the largest magnitude (the grid stops there; values past it saturate)

| name | grid (magnitudes)            | max   | mbits | emin | emax_elem = floor(log2 max) |
|------|------------------------------|-------|-------|------|-----------------------------|
| e2m1 | 0 .5 1 1.5 2 3 4 6           | 6     | 1     | 0    | 2                           |
| e1m2 | 0 .25 ... 1.75               | 1.75  | 2     | 0    | 0                           |
| int4 | 0 1 ... 7                    | 7     | 2     | 2    | 2                           |
| e4m3 | OCP E4M3FN incl. subnormals  | 448   | 3     | -6   | 8                           |
| e5m2 | OCP E5M2 incl. subnormals    | 57344 | 2     | -14  | 15                          |

int4 is written as a float grid with emin = 2: one "binade" [4, 8) with step 1 and subnormals
0..3 with the same step, i.e. the integers 0..7. It is the *symmetric* +-7 grid (-8 unused), so
negation commutes with rounding and stochastic rounding is unbiased at both ends.

Rounding is computed, not searched: for a magnitude a the local grid spacing is

    quantum(a) = 2^(max(floor(log2 a), emin) - mbits)

and round-to-nearest-even is torch.round(a / quantum) * quantum (torch.round is half-to-even, and
an even multiple of the quantum is exactly a grid point whose last mantissa bit is 0; a tie that
carries into the next binade lands on its even leading point). 2^floor(log2 a) is read off the
float64 exponent bits, so it is exact. All of this runs in float64, where float32 (and bfloat16)
subnormals are normal numbers and a / quantum is an exact power-of-two rescale.

Rules shared by every rounding mode:
- Magnitudes are clamped to max first (saturation, "satfinite"); +-Inf therefore becomes +-max.
  For nearest rounding clamping first is the same as clamping after (rounding is monotone and
  max is a grid point); for stochastic rounding it means the top of the grid is never exceeded.
- NaN stays NaN.
- The sign is reattached with copysign, so a negative value that rounds to zero gives -0, as
  the sign bit of a hardware FP4/FP8 encoding does.

Stochastic rounding: with lo <= a < hi the neighbouring grid points, the result is hi with
probability (a - lo) / (hi - lo). The caller passes float32 uniforms u in [0, 1) (torch.rand) and
the rule is `hi if u < frac else lo` with frac = a/quantum - floor(a/quantum) computed in
float64; u is a multiple of 2^-24, so the probability is frac rounded up to that resolution
(bias at most 2^-24 of a quantum). Values already on the grid never move.

Rounding "up" (ceil onto the grid, then saturate) is used for the NVFP4 E4M3 block scale under
stochastic rounding, so that the block maximum cannot clip.

The operand-format table (OPERAND_FORMATS) adds what a GEMM operand needs besides its element grid,
and is the only place these facts are written down:

| operand | element | block | block scale | tensor scale | torch dtype        |
|---------|---------|-------|-------------|--------------|--------------------|
| mxfp4   | e2m1    | 32    | E8M0        | -            | -                  |
| nvfp4   | e2m1    | 16    | E4M3        | FP32, amax / 2688 (= E4M3.max * E2M1.max) | - |
| e1m2    | e1m2    | 32    | E8M0        | -            | -                  |
| int4    | int4    | 32    | E8M0        | -            | -                  |
| e4m3    | e4m3    | -     | -           | FP32, amax / 448   | float8_e4m3fn |
| e5m2    | e5m2    | -     | -           | FP32, amax / 57344 | float8_e5m2   |
| e2m1    | e2m1    | 32    | E8M0        | -            | -                  |

e2m1 / e1m2 / int4 also take scale mode "fp32" (the UFP4 paper's scaling): blocks of FP32_BLOCK = 16
with one unrounded FP32 scale each (fp4.scaling.fp32_block_scales). e2m1 under an MX scale mode is
bit for bit mxfp4; the separate name exists so that "E2M1 elements, FP32 scales" has one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .names import OperandFormat, Rounding, ScaleMode, choices

__all__ = ["ElementFormat", "ELEMENT_FORMATS", "E2M1", "E1M2", "INT4", "E4M3", "E5M2",
           "OperandFormatSpec", "OPERAND_FORMATS", "MX_BLOCK", "NVFP4_BLOCK", "FP32_BLOCK", "NVFP4_TENSOR_DIVISOR",
           "E8M0_BIAS", "E8M0_MIN", "E8M0_MAX", "E8M0_NAN", "MX_ELEMENTS", "MX_FORMATS", "FP8_ELEMENTS",
           "FP8_DTYPES", "FP8_MAX", "floor_log2", "get_format", "pow2", "quantum", "round_to_grid"]


@dataclass(frozen=True)
class ElementFormat:
    """A sign-symmetric element grid. `grid` holds the non-negative magnitudes, ascending, float64."""

    name: str
    max: float
    mbits: int
    emin: int
    emax_elem: int
    grid: torch.Tensor = field(repr=False, compare=False)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


def _enumerate_grid(max_value: float, mbits: int, emin: int) -> torch.Tensor:
    # The subnormal range and every normal binade share the formula k * 2^(e - mbits).
    step = 2.0 ** (emin - mbits)
    values = {k * step for k in range(2 ** (mbits + 1))}
    for e in range(emin + 1, int(math.floor(math.log2(max_value))) + 1):
        values.update(m * 2.0 ** (e - mbits) for m in range(2 ** mbits, 2 ** (mbits + 1)))
    return torch.tensor(sorted(v for v in values if v <= max_value), dtype=torch.float64)


def _make(name: str, max_value: float, mbits: int, emin: int) -> ElementFormat:
    fmt = ElementFormat(name, float(max_value), mbits, emin, int(math.floor(math.log2(max_value))),
                        _enumerate_grid(max_value, mbits, emin))
    # The descriptor must be self-consistent: max is the top of the enumerated grid.
    assert fmt.grid[-1].item() == fmt.max, name
    return fmt


E2M1 = _make("e2m1", 6.0, 1, 0)
E1M2 = _make("e1m2", 1.75, 2, 0)
INT4 = _make("int4", 7.0, 2, 2)
E4M3 = _make("e4m3", 448.0, 3, -6)
E5M2 = _make("e5m2", 57344.0, 2, -14)

ELEMENT_FORMATS: Dict[str, ElementFormat] = {f.name: f for f in (E2M1, E1M2, INT4, E4M3, E5M2)}
# "up" (ceil onto the grid) is internal: the NVFP4 E4M3 block scale under SR.
GRID_ROUNDINGS = choices(Rounding) + ("up",)


# ---- The operand-format table: element grid x block x scale, defined once --------------------------
# Every other place (fp4.scaling, fp4.quantize, fp4.fp8_gemm, the Triton kernels) derives its block
# sizes, scale encodings and FP8 dtypes / maxima from here; the kernels turn them into constexprs in
# Python before the launch.
MX_BLOCK = 32      # OCP MX v1.0: one E8M0 scale per 32 elements
NVFP4_BLOCK = 16   # NVFP4: one E4M3 scale per 16 elements (or per 16x16 weight tile)
FP32_BLOCK = 16    # UFP4 paper: one unrounded FP32 scale per 16 elements (scale mode "fp32")
E8M0_BIAS = 127
E8M0_MIN, E8M0_MAX = -127, 127   # exponent range of an E8M0 scale 2^e
E8M0_NAN = 128                   # the exponent whose biased code is 0xFF (NaN)
# NVFP4's FP32 tensor scale s_g = amax / (E4M3 max * E2M1 max) = amax / 2688 puts the largest block
# scale at the top of E4M3 and that block's largest element at the top of E2M1.
NVFP4_TENSOR_DIVISOR = E4M3.max * E2M1.max


@dataclass(frozen=True)
class OperandFormatSpec:
    """How one operand format stores a number: element grid, block size and scale encodings."""

    name: str
    element: ElementFormat
    block: Optional[int]           # elements sharing one block scale (default scaling); None = per tensor
    block_scale: Optional[str]     # "e8m0" (MX), "e4m3" (NVFP4) or None
    tensor_scale: bool             # an FP32 per-tensor scale (NVFP4 s_g, FP8 s) multiplies the GEMM
    torch_dtype: Optional[torch.dtype] = None  # torch's float8 dtype of the element (FP8 only)
    # Scale modes the format accepts (fp4.names.ScaleMode); () = its scaling is fixed. The MX modes
    # keep the E8M0 / 32 blocks; "fp32" switches to FP32_BLOCK blocks with an FP32 scale.
    scale_modes: Tuple[str, ...] = ()


def _operand_formats() -> Dict[str, OperandFormatSpec]:
    f = OperandFormat
    mx_modes = tuple(m for m in choices(ScaleMode) if m != ScaleMode.fp32)
    grid_modes = mx_modes + (ScaleMode.fp32.value,)
    specs = [
        OperandFormatSpec(f.mxfp4.value, E2M1, MX_BLOCK, "e8m0", False, scale_modes=mx_modes),
        OperandFormatSpec(f.nvfp4.value, E2M1, NVFP4_BLOCK, "e4m3", True),
        OperandFormatSpec(f.e1m2.value, E1M2, MX_BLOCK, "e8m0", False, scale_modes=grid_modes),
        OperandFormatSpec(f.int4.value, INT4, MX_BLOCK, "e8m0", False, scale_modes=grid_modes),
        OperandFormatSpec(f.e4m3.value, E4M3, None, None, True, torch.float8_e4m3fn),
        OperandFormatSpec(f.e5m2.value, E5M2, None, None, True, torch.float8_e5m2),
        OperandFormatSpec(f.e2m1.value, E2M1, MX_BLOCK, "e8m0", False, scale_modes=grid_modes),
    ]
    table = {spec.name: spec for spec in specs}
    assert tuple(table) == choices(OperandFormat), "every OperandFormat needs exactly one row"
    return table


OPERAND_FORMATS: Dict[str, OperandFormatSpec] = _operand_formats()
# Derived views, in OperandFormat order.
MX_ELEMENTS: Dict[str, ElementFormat] = {n: s.element for n, s in OPERAND_FORMATS.items() if s.block_scale == "e8m0"}
MX_FORMATS = tuple(MX_ELEMENTS)  # formats scaled by E8M0 per 32 (by default; see scale_modes)
FP8_ELEMENTS: Dict[str, ElementFormat] = {n: s.element for n, s in OPERAND_FORMATS.items() if s.torch_dtype}
FP8_DTYPES: Dict[str, torch.dtype] = {n: s.torch_dtype for n, s in OPERAND_FORMATS.items() if s.torch_dtype}
FP8_MAX: Dict[str, float] = {n: e.max for n, e in FP8_ELEMENTS.items()}


def get_format(name: str) -> ElementFormat:
    try:
        return ELEMENT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown element format {name!r}; valid: {sorted(ELEMENT_FORMATS)}") from None


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float64 2^e for integer e in [-1022, 1023], built from the exponent bits.

    Avoids exp2/ldexp implementations that may go through float32 or lose the subnormal range.
    """
    e = e.to(torch.int64)
    return ((e + 1023) << 52).view(torch.float64)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    # frexp: a = m * 2^k with m in [0.5, 1), so floor(log2 a) = k - 1 exactly (a > 0).
    return torch.frexp(a).exponent.to(torch.int64) - 1


_EXPONENT_MASK = 0x7FF0000000000000  # float64 exponent bits


def quantum(a: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Grid spacing at magnitude a (float64, a >= 0): 2^(max(floor(log2 a), emin) - mbits).

    Keeping only the exponent bits of max(a, 2^emin) gives 2^floor(log2 .) exactly (every
    float32 / bfloat16 value is a normal float64). NaN maps to Inf, and NaN / Inf stays NaN.
    """
    floor_pow2 = a.clamp(min=2.0 ** fmt.emin).view(torch.int64).bitwise_and_(_EXPONENT_MASK)
    return floor_pow2.view(torch.float64).mul_(2.0 ** -fmt.mbits)


def round_to_grid(v: torch.Tensor, fmt: ElementFormat, rounding: str = "nearest",
                  generator: Optional[torch.Generator] = None,
                  uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round v (already in the scaled domain) onto fmt's grid; returns float64, same shape.

    rounding: "nearest" (RNE, saturating), "stochastic" (needs `uniforms` or draws them from
    `generator` with torch.rand(v.shape) float32), or "up" (ceil onto the grid, saturating).
    """
    if rounding not in GRID_ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {list(GRID_ROUNDINGS)}")
    v = v.to(torch.float64)
    a = v.abs().clamp_(max=fmt.max)  # NaN propagates through clamp
    q = quantum(a, fmt)
    scaled = a.div_(q)  # exact: q is a power of two
    if rounding == "nearest":
        r = scaled.round_()
    elif rounding == "up":
        r = scaled.ceil_()
    else:
        if uniforms is None:
            uniforms = torch.rand(v.shape, generator=generator, dtype=torch.float32, device=v.device)
        lo = torch.floor(scaled)
        r = lo.add_(torch.lt(uniforms, scaled.sub_(lo)))
    # Ceil never passes max: max is a grid point, and |v| was clamped to it.
    return r.mul_(q).copysign_(v)
