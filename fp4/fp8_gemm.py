"""Scaled GEMMs: real FP8 through torch._scaled_mm (cuBLASLt) on sm_89+, and the emulation QuantLinear
uses for everything else (FP4 formats, FP8 elsewhere), with the same alpha semantics.

QuantLinear uses this for every GEMM whose two operands are FP8 (the fp8 rung, and the FP8 GEMMs of
the fprop / dgrad rungs) when the hardware has FP8 tensor cores; everywhere else it emulates the same
GEMM (quantize, then multiply the dequantized grid values). Both paths quantize with the reference's
per-tensor current scaling (docs/design.md, "FP8 per-tensor current scaling"):

    s = fp32(amax / fmt_max)            (s == 0 -> s = 1; non-finite amax -> s = NaN: all outputs NaN)
    q = fp8_rne_satfinite(fp32(x / s))  (division, not multiplication by 1/s, exactly as the reference)

so the real and emulated paths multiply identical operands; only the order of the fp32 accumulation
inside the GEMM may differ. The GEMM output is alpha * (q_A . q_B) with alpha = s_A * s_B applied in
fp32 before the single rounding to out_dtype, which is what the emulation does too.

Pairings used by the linear layer (cuBLAS has no E5M2 x E5M2 kernel, and none is needed):
    Fprop  E4M3 X   x E4M3 W^T
    Dgrad  E5M2 dY  x E4M3 W
    Wgrad  E5M2 dY^T x E4M3 X

torch._scaled_mm's layout rules (cuBLASLt "TN" only): the first operand row-major, the second
column-major, the reduction dim K and the output dim N multiples of 16, per-tensor scales as fp32
tensors with one element. W^T is column-major for free (a transposed view of the contiguous weight);
the other operands are copied into the required layout. Shapes that do not fit are answered with
`dims_fit() == False` and the caller emulates instead.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .formats import FP8_DTYPES, FP8_ELEMENTS, FP8_MAX  # noqa: F401  (FP8_DTYPES, FP8_MAX: public here too)
from .names import QuantBackend, choices
from .quantize import use_triton
from .scaling import fp8_tensor_scale
# cuBLASLt FP8 kernels need K and N to be multiples of 16 (M is free).
FP8_DIM_MULTIPLE = 16


def fp8_path_available(device) -> bool:
    """True when GEMMs on `device` can run through torch._scaled_mm with FP8 tensor cores (sm_89+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return _has_fp8_tensor_cores(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_fp8_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def dims_fit(m: int, k: int, n: int) -> bool:
    """Whether an [M, K] x [K, N] product meets _scaled_mm's size rules."""
    return m > 0 and k > 0 and n > 0 and k % FP8_DIM_MULTIPLE == 0 and n % FP8_DIM_MULTIPLE == 0


def _check_fp8_args(fmt: str, backend: str) -> None:
    if backend not in choices(QuantBackend):
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(choices(QuantBackend))}")
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}; valid: {', '.join(FP8_DTYPES)}")


@torch.no_grad()
def quantize_fp8(x: torch.Tensor, fmt: str, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling: returns (q as a float8 tensor, s as a 0-dim fp32 tensor), x ~ q * s.

    q.float() equals the x_dq that fp4.quantize.quantize_operand(x, fmt, ...) returns, and s its
    tensor_scale, so the emulated and the real GEMM see the same operands.

    backend: "torch" (five elementwise passes and a reduction, fp32 intermediates), "triton" (the
    fused amax + scale/round/cast kernels of fp4.kernels.fp8_quant, writing only the float8 bytes;
    bit-identical, tested under TRITON_INTERPRET=1 and on the GPU by the benchmark), or "auto"
    (triton for CUDA tensors when it imports).
    """
    _check_fp8_args(fmt, backend)
    # The kernel takes float32/bf16/fp16; a float64 x goes to the torch route (use_triton says so).
    if use_triton(x, backend, fmt):
        from .kernels.fp8_quant import fp8_quantize
        _, scale, q = fp8_quantize(x, fmt, return_fp8=True, return_dq=False)
        return q, scale
    fmt_max = FP8_MAX[fmt]
    xf = x.float()
    # The reference's scale: fp32(amax / max) by true division on any device, 0 -> 1.
    scale = fp8_tensor_scale(xf, FP8_ELEMENTS[fmt])
    # NaN or Inf anywhere poisons the whole tensor (a non-finite amax gives a non-finite scale).
    scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))
    # The clamp saturates (a plain cast would turn overflow into NaN for E4M3FN / Inf for E5M2);
    # torch's cast to float8 rounds to nearest even and keeps subnormals. NaN passes the clamp.
    q = (xf / scale).clamp(-fmt_max, fmt_max).to(FP8_DTYPES[fmt])
    return q, scale


@torch.no_grad()
def quantize_fp8_both(x: torch.Tensor, fmt: str, backend: str = "auto"
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, q_t, s) for a 2-D x [M, N]: quantize_fp8's q and s, plus q_t = q^T as its own row-major
    float8 tensor [N, M], so q_t.t() is the column-major operand torch._scaled_mm takes (fp8_mm
    then copies nothing). Bit-identical on every route.

    The kernel route is one cast-transpose pass after the amax pre-pass (fp4.kernels.fp8_quant.
    fp8_quantize_t: x read once, both layouts written, as Transformer Engine does); the torch route
    quantizes and then transposes q (one more read and write of the bytes).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_both takes a 2-D tensor, got shape {tuple(x.shape)}")
    _check_fp8_args(fmt, backend)
    if use_triton(x, backend, fmt):
        from .kernels.fp8_quant import fp8_quantize_t
        return fp8_quantize_t(x, fmt)
    q, scale = quantize_fp8(x, fmt, backend="torch")
    return q, q.t().contiguous(), scale


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 and t.stride(0) >= max(t.size(1), 1) else t.contiguous()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    # transpose -> contiguous -> transpose: same logical [K, N], strides (1, K).
    return t if t.stride(0) == 1 and t.stride(1) >= max(t.size(0), 1) else t.t().contiguous().t()


def fp8_mm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
           out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) for float8 a [M, K] and b [K, N], any strides, on the FP8 tensor cores.

    The accumulation is fp32 and alpha = scale_a * scale_b is applied before the one rounding to
    out_dtype. use_fast_accum=False (the default) keeps cuBLAS's periodic promotion of the partial
    sums to full fp32; the fast mode loses accuracy on long K, which would blur the ablation.
    """
    if not dims_fit(a.size(0), a.size(1), b.size(1)):
        raise ValueError(f"FP8 GEMM [{a.size(0)}, {a.size(1)}] x [{b.size(0)}, {b.size(1)}]: K and N must be "
                         f"multiples of {FP8_DIM_MULTIPLE}; use the emulated path (see dims_fit)")
    return torch._scaled_mm(_row_major(a), _col_major(b),
                            scale_a=scale_a.reshape(()).float(), scale_b=scale_b.reshape(()).float(),
                            out_dtype=out_dtype, use_fast_accum=use_fast_accum)



@functools.lru_cache(maxsize=None)
def _mm_has_fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) runs for `dtype` operands on `device`.

    A memo of a capability of (torch build, device, dtype), probed once on a tiny product; not a
    switch: every model in the process gets the same answer for the same device, so it cannot make
    two models behave differently. (It replaced a module-level dict that a failed call flipped.)"""
    probe = torch.zeros(16, 16, dtype=dtype, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (exact products of grid values, as on tensor cores)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_has_fp32_out(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    # Upcasting is exact too (bf16 grid values fit fp32, and even tf32), only slower.
    return a.float() @ b.float()


def emulated_scaled_mm(a: torch.Tensor, scale_a: Optional[torch.Tensor], b: torch.Tensor,
                       scale_b: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The emulated counterpart of fp8_mm for grid values a [M, K], b [K, N] in the compute dtype.

    With per-tensor scales (NVFP4 s_g, FP8 s) or a bias, the product is accumulated in fp32, multiplied
    by alpha = scale_a * scale_b and offset by the bias in fp32, and returned in fp32 for the caller's
    one rounding. Without either (MX formats) the GEMM runs straight in the compute dtype -- except
    fp16, whose range the unscaled grid-space sums of FP8 / NVFP4 / MX values can exceed.
    """
    if scale_a is None and scale_b is None and bias is None and a.dtype != torch.float16:
        return a @ b
    out = _matmul_fp32(a, b)
    if scale_a is not None or scale_b is not None:
        one = torch.ones((), dtype=torch.float32, device=out.device)
        out = out * ((one if scale_a is None else scale_a.float()) * (one if scale_b is None else scale_b.float()))
    if bias is not None:
        out = out + bias.float()
    return out
