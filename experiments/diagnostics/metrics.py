"""Quantization-error metrics of one GEMM operand, one GEMM output, and of errors across steps.

Everything is computed in float64 from the tensors given (the probe's, fp4/probe.py); nothing here
changes a tensor or draws a random number.

Operand x and the values q the GEMM multiplied (grid values x tensor scale)
---------------------------------------------------------------------------
    rel_err    ||q - x|| / ||x||
    sqnr_db    10 log10(||x||^2 / ||q - x||^2)             (None when q == x exactly)
    bias       <x, q> / <x, x> - 1                         magnitude bias: the projection of q on x
                                                           minus one. Negative = shrinkage, e.g.
                                                           E2M1's clipping at 6 and its coarse top
                                                           binade pull large values in
    flushed    #(x != 0 and q == 0) / #(x != 0)            nonzero values rounded to zero
    clipped    #(|x| > M * s) / #(x)                       values past the top of their block's grid:
                                                           M the element maximum (E2M1: 6), s the
                                                           decoded scale of the element's block
                                                           (block scale x tensor scale, recomputed
                                                           from x by the rule the quantizer used), so
                                                           q saturates at +-M * s. The floor / even
                                                           E8M0 rules can clip, rceil cannot
    log2_scale_min / _median / _max   log2 of the decoded per-block scale over the blocks
                                      (MX: the E8M0 exponent e of 2^e; NVFP4: s_b * s_g; FP8: the
                                      tensor scale); e8m0_hist: {e: #blocks} for MX formats
For a high-precision operand (fmt None) the last four are None.

GEMM output y against the exact product y* (float64, untransformed operands)
---------------------------------------------------------------------------
    cos        <y, y*> / (||y|| ||y*||)
    rel_err    ||y - y*|| / ||y*||
    bias       <e, y*> / <y*, y*>,  e = y - y*             the error's component along the exact
                                                           direction (negative: the output shrinks)

Error consistency across steps (ErrorConsistency)
-------------------------------------------------
Only meaningful for a tensor of a fixed shape across steps whose elements keep their meaning: the
Wgrad output dW ([out, in], whatever the batch) and the weight operand W. (X, dY and the Fprop /
Dgrad outputs are per token and change with the batch.) For errors e_1..e_k of k steps:

    step_corr  mean over t of the Pearson correlation corr(e_t, e_{t+1})
    coherence  ||sum_t e_t|| / sum_t ||e_t||   ~1: the same error every step (it accumulates into
               the weights linearly in k); ~1/sqrt(k): independent errors (they average out)

Which error of which GEMM is fed in (the Wgrad output error; for Fprop and Dgrad the weight-operand
error, mapped back to W's own coordinates) is experiments/diagnostics/consistency.py's concern; this
module only does the arithmetic, shared by `fp4-ablate diagnose` and the in-training windows.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch

from fp4.formats import ELEMENT_FORMATS, FP32_BLOCK, FP8_ELEMENTS, MX_BLOCK, MX_ELEMENTS, NVFP4_BLOCK
from fp4.names import ScaleMode
from fp4.quantize import split_tiles
from fp4.scaling import fp32_block_scales, fp8_tensor_scale, mx_scales, nvfp4_scales, resolve_scale_mode
from fp4.transforms import split_blocks

__all__ = ["operand_metrics", "output_metrics", "block_scales", "ErrorConsistency", "step_correlation",
           "coherence"]


def _finite_or_none(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def _ratio(num: float, den: float) -> Optional[float]:
    return _finite_or_none(num / den) if den > 0 else None


def block_scales(x: torch.Tensor, op, axis: int):
    """(per-element decoded scale, float64, x's shape; per-block scales, 1-D) of operand spec `op`
    (fp4.recipe.OperandSpec) for x (what was quantized), by the rule fp4.quantize applies."""
    fmt = op.fmt
    if fmt in FP8_ELEMENTS:
        s = fp8_tensor_scale(x.to(torch.float32), FP8_ELEMENTS[fmt]).to(torch.float64)
        return s.expand(x.shape), s.reshape(1)
    mode = resolve_scale_mode(fmt, op.rounding, op.scale_mode)
    if mode == ScaleMode.fp32:
        blocks, restore = split_blocks(x.to(torch.float32), axis, FP32_BLOCK)
        s = fp32_block_scales(blocks, MX_ELEMENTS[fmt]).to(torch.float64)
    elif fmt in MX_ELEMENTS:
        blocks, restore = split_blocks(x.to(torch.float64), axis, MX_BLOCK)
        s = mx_scales(blocks, MX_ELEMENTS[fmt], mode)
    elif fmt == "nvfp4":
        x32 = x.to(torch.float32)
        split = split_tiles if op.block_2d else split_blocks
        blocks, restore = split(x32, axis, NVFP4_BLOCK)
        s_b, s_g = nvfp4_scales(blocks, x32.abs().amax(), op.rounding)
        s = (s_b * s_g).to(torch.float64)
    else:
        raise ValueError(f"no block scale rule for operand format {fmt!r}")
    return restore(s.expand(blocks.shape)), s.reshape(-1)


def _element_max(fmt: str) -> float:
    if fmt == "nvfp4":
        return ELEMENT_FORMATS["e2m1"].max
    return (MX_ELEMENTS.get(fmt) or FP8_ELEMENTS[fmt]).max


# The metrics are computed in two halves: the sums, as 0-dim float64 tensors on x's device (no host
# sync), and the ratios, on the host from those sums. A probed training step collects the sums of
# every GEMM and moves them to the host in one transfer (collect.py): on a GPU shared by several
# runs each sync waits for the others' time slices, and a sync per metric made a probed llama-3m step
# 100x a plain one (results/ladder-long/README.md).

def host_floats(tensors) -> list:
    """0-dim (or one-element) tensors as Python floats, in one device-to-host transfer."""
    tensors = list(tensors)
    if not tensors:
        return []
    return torch.stack([t.to(torch.float64).reshape(()) for t in tensors]).cpu().tolist()


def to_host(sums: Dict[str, object]) -> Dict[str, object]:
    """Every tensor value of ``sums`` as a Python float, in one device-to-host transfer."""
    keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
    return {**sums, **dict(zip(keys, host_floats(sums[k] for k in keys)))}


@torch.no_grad()
def operand_sums(x: torch.Tensor, q: torch.Tensor, op=None, axis: int = -1) -> Dict[str, object]:
    """The sums behind :func:`operand_metrics`, as 0-dim tensors (NaN where a quantity is undefined)."""
    x64, q64 = x.detach().to(torch.float64), q.detach().to(torch.float64)
    e = q64 - x64
    nonzero = x64 != 0
    sums: Dict[str, object] = {"xx": (x64 * x64).sum(), "ee": (e * e).sum(), "xq": (x64 * q64).sum(),
                               "n_nonzero": nonzero.sum(), "n_flushed": (nonzero & (q64 == 0)).sum(),
                               "numel": x64.numel(), "blocks": op is not None and op.fmt is not None}
    if not sums["blocks"]:
        return sums
    per_element, per_block = block_scales(x64, op, axis)
    sums["n_clipped"] = (x64.abs() > _element_max(op.fmt) * per_element).sum()
    usable = torch.isfinite(per_block) & (per_block > 0)
    log2 = torch.log2(torch.where(usable, per_block, torch.ones_like(per_block)))
    nan = torch.full_like(log2, math.nan)
    sums["log2_min"] = torch.where(usable, log2, torch.full_like(log2, math.inf)).amin()
    sums["log2_max"] = torch.where(usable, log2, torch.full_like(log2, -math.inf)).amax()
    sums["log2_median"] = torch.where(usable, log2, nan).nanmedian()  # NaN: no usable block
    return sums


def operand_from_sums(s: Dict[str, object]) -> Dict[str, object]:
    """The operand metrics of the module docstring from :func:`operand_sums` on the host."""
    xx, ee, n_nonzero = s["xx"], s["ee"], int(s["n_nonzero"])
    out: Dict[str, object] = {
        "rel_err": _ratio(math.sqrt(ee), math.sqrt(xx)),
        "sqnr_db": _finite_or_none(10 * math.log10(xx / ee)) if ee > 0 and xx > 0 else None,
        "bias": _finite_or_none(s["xq"] / xx - 1) if xx > 0 else None,
        "flushed": (int(s["n_flushed"]) / n_nonzero) if n_nonzero else 0.0,
        "clipped": None, "log2_scale_min": None, "log2_scale_median": None, "log2_scale_max": None,
    }
    if not s["blocks"]:
        return out
    out["clipped"] = int(s["n_clipped"]) / max(s["numel"], 1)
    if math.isfinite(s["log2_median"]):
        out["log2_scale_min"], out["log2_scale_max"] = s["log2_min"], s["log2_max"]
        out["log2_scale_median"] = s["log2_median"]
    return out


@torch.no_grad()
def e8m0_histogram(x: torch.Tensor, op, axis: int) -> Optional[Dict[int, int]]:
    """{E8M0 exponent: #blocks} of an MX operand (None for other formats); syncs (torch.unique)."""
    if op is None or op.fmt not in MX_ELEMENTS or \
            resolve_scale_mode(op.fmt, op.rounding, op.scale_mode) == ScaleMode.fp32:
        return None
    per_block = block_scales(x.detach().to(torch.float64), op, axis)[1]
    usable = per_block[torch.isfinite(per_block) & (per_block > 0)]
    if not usable.numel():
        return None
    exps, counts = torch.unique(torch.log2(usable).round().to(torch.int64), return_counts=True)
    return {int(k): int(c) for k, c in zip(exps.tolist(), counts.tolist())}


def operand_metrics(x: torch.Tensor, q: torch.Tensor, op=None, axis: int = -1) -> Dict[str, object]:
    """The operand metrics of the module docstring; `op` (OperandSpec) and `axis` are needed for the
    clipping and block-scale entries (None / fmt None: they are None)."""
    out = operand_from_sums(to_host(operand_sums(x, q, op, axis)))
    hist = e8m0_histogram(x, op, axis) if out["log2_scale_median"] is not None else None
    if hist is not None:
        out["e8m0_hist"] = hist
    return out


@torch.no_grad()
def output_sums(y: torch.Tensor, exact: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The sums behind :func:`output_metrics`, as 0-dim tensors."""
    y64, ex = y.detach().to(torch.float64), exact.detach().to(torch.float64)
    e = y64 - ex
    return {"yy": (y64 * y64).sum(), "xx": (ex * ex).sum(), "yx": (y64 * ex).sum(), "ee": (e * e).sum(),
            "ex": (e * ex).sum()}


def output_from_sums(s: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {"cos": _ratio(s["yx"], math.sqrt(s["yy"] * s["xx"])),
            "rel_err": _ratio(math.sqrt(s["ee"]), math.sqrt(s["xx"])),
            "bias": _ratio(s["ex"], s["xx"])}


def output_metrics(y: torch.Tensor, exact: torch.Tensor) -> Dict[str, Optional[float]]:
    """cos, rel_err, bias of a GEMM output y against the exact product (module docstring)."""
    return output_from_sums(to_host(output_sums(y, exact)))


def _correlation(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two error tensors as a 0-dim float64 tensor (NaN if one is constant)."""
    a, b = e1.detach().to(torch.float64).flatten(), e2.detach().to(torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    den = torch.sqrt((a * a).sum() * (b * b).sum())
    return torch.where(den > 0, (a * b).sum() / den, torch.full_like(den, math.nan))


def _finite_floats(values) -> list:
    return [v for v in values if math.isfinite(v)]


def step_correlation(e1: torch.Tensor, e2: torch.Tensor) -> Optional[float]:
    """Pearson correlation of two error tensors (flattened, float64); None if one is constant."""
    return _finite_or_none(float(_correlation(e1, e2)))


def coherence(errors: Iterable[torch.Tensor]) -> Optional[float]:
    """||sum e_t|| / sum ||e_t|| over the errors of k steps (1: coherent, ~1/sqrt(k): independent)."""
    total, norms = None, 0.0
    for e in errors:
        e = e.detach().to(torch.float64)
        total = e.clone() if total is None else total + e
        norms += float(e.norm())
    return None if total is None else _ratio(float(total.norm()), norms)


class ErrorConsistency:
    """Streaming step_corr and coherence per key (e.g. ("wgrad", layer, index)), without the history.

    Within a step `add` accumulates (the error of a gradient accumulated over micro-batches is the sum
    of theirs); `end_step` closes the step. Held per key: the running sum and the previous step's error
    (plus, during a step, the step's own accumulator), in `dtype`: float64 for `fp4-ablate diagnose`
    (a few steps of one state), float32 in training (half the memory; a sum of a few float32 errors
    loses nothing the metrics can see). step_corr is computed in float64 on transient copies. Drop
    the object to free everything."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self._current: Dict[object, torch.Tensor] = {}
        self._sum: Dict[object, torch.Tensor] = {}
        self._norms: Dict[object, torch.Tensor] = {}  # 0-dim float64, on the errors' device
        self._prev: Dict[object, torch.Tensor] = {}
        self._corrs: Dict[object, list] = {}
        self._steps: Dict[object, int] = {}

    def add(self, key, error: torch.Tensor) -> None:
        e = error.detach()
        if key in self._current:
            self._current[key].add_(e.to(self.dtype))
        else:  # a copy: the caller's tensor may be the GEMM's own (never written to)
            self._current[key] = e.to(self.dtype, copy=True)

    def end_step(self) -> None:
        for key, e in self._current.items():
            if key in self._prev:  # kept on the device: read in one transfer by results()
                self._corrs.setdefault(key, []).append(_correlation(self._prev[key], e))
            if key in self._sum:
                self._sum[key].add_(e)
            else:
                self._sum[key] = e.clone()  # not an alias of e, which becomes _prev
            norm = e.double().norm()
            self._norms[key] = self._norms[key] + norm if key in self._norms else norm
            self._steps[key] = self._steps.get(key, 0) + 1
            self._prev[key] = e
        self._current = {}

    def in_step(self, key) -> bool:
        """Whether the open step has an error for `key` already."""
        return key in self._current

    def keys(self):
        return list(self._sum)

    def steps(self, key) -> int:
        return self._steps.get(key, 0)

    def held_bytes(self) -> int:
        """Bytes of the tensors held now (sums, previous errors, the open step's accumulators)."""
        return sum(t.numel() * t.element_size() for d in (self._current, self._sum, self._prev) for t in d.values())

    def results(self, keys=None) -> Dict[object, tuple]:
        """{key: (step_corr, coherence)} for ``keys`` (default: all), in one device-to-host transfer."""
        keys = self.keys() if keys is None else list(keys)
        parts = []
        for key in keys:
            parts += self._corrs.get(key, [])
            parts += [self._sum[key].double().norm(), self._norms[key]] if key in self._sum else []
        values = iter(host_floats(parts))
        out = {}
        for key in keys:
            corrs = _finite_floats([next(values) for _ in self._corrs.get(key, [])])
            coh = _ratio(next(values), next(values)) if key in self._sum else None
            out[key] = (sum(corrs) / len(corrs) if corrs else None, coh)
        return out

    def step_corr(self, key) -> Optional[float]:
        return self.results([key])[key][0]

    def coherence(self, key) -> Optional[float]:
        return self.results([key])[key][1]
