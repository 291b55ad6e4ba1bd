"""Quantize-dequantize of GEMM operands: the public `fake_quantize` and the linear's `quantize_operand`.

Formats (FORMATS):

| fmt    | elements | scale                                          | tensor scale returned |
|--------|----------|------------------------------------------------|-----------------------|
| mxfp4  | e2m1     | E8M0 per 32 along `axis` (MX, scale_mode)      | None                  |
| e1m2   | e1m2     | E8M0 per 32 along `axis` (MX, scale_mode)      | None                  |
| int4   | int4 +-7 | E8M0 per 32 along `axis` (MX, scale_mode)      | None                  |
| nvfp4  | e2m1     | E4M3 per 16 along `axis` (or 16x16 tiles)      | s_g (float32 0-dim)   |
| e4m3   | e4m3     | FP32 per tensor (current scaling)              | s (float32 0-dim)     |
| e5m2   | e5m2     | FP32 per tensor (current scaling)              | s (float32 0-dim)     |
| e2m1   | e2m1     | as e1m2 / int4 (with an MX mode: exactly mxfp4)| None                  |

e2m1 / e1m2 / int4 with scale_mode="fp32" (the UFP4 paper's scaling): blocks of 16 along `axis`, one
unrounded FP32 scale s = fp32(block amax / grid max) each, v = fp32(x / s) rounded onto the grid
(nearest-even, or SR), x_dq = fp32(q * s), returned in float32 for any x dtype (q * s is not a
bfloat16 value); an all-zero block stays zero, a block with NaN/Inf is all NaN. The Triton kernel
(fp4/kernels/fp32_block_quant.py) is bit-identical to `_fp32_blocks`, stochastic rounding included:
it reads the same torch.rand uniforms (same call, same generator). `fake_quantize(x, "e1m2",
scale_mode="fp32")`.

The scale rules are in fp4.scaling and the element rounding in fp4.formats; this module does
the layout and the dispatch. `quantize_operand` returns x_dq *without* the per-tensor scale
(q * 2^e for MX, q * s_b for NVFP4, q for FP8), in x's dtype and exactly representable there
(bfloat16 included), so a GEMM can multiply s_A * s_B into its float32 output as the
hardware's alpha does. `fake_quantize` multiplies the tensor scale back in (one float32
multiply) and casts to x.dtype.

Layout. Blocks run along `axis` (any rank, any axis): the axis is moved last, zero-padded to a
multiple of the block (zeros never change a block amax) and viewed as [..., nblocks, block]; the
pad is cut off at the end. NVFP4 `block_2d=True` (2-D tensors, for weights) uses 16x16 tiles
over both dimensions, so W is quantized identically along dim 0 and dim -1; both dimensions are
padded. block_2d is an NVFP4 option only (ValueError for other formats).

Stochastic rounding draws one float32 uniform per element, torch.rand(shape, generator=g), in
the blocked working layout: [..., nblocks, block] with `axis` last and the pad included (tiles
flattened row-major for block_2d; x's own shape for the per-tensor FP8 formats). Hence a padded
input and its manually zero-padded version draw the same numbers, and the same generator state
reproduces the same bits. generator=None draws from torch's global RNG. The scale-mode-fp32 kernel
makes this same draw and so matches the reference bit for bit; the MX / NVFP4 / FP8 kernels draw
Philox bits in-kernel from a seed taken from the generator (same distribution, other bits). MX formats default to
the `rceil` scale under SR (never clips); NVFP4 rounds its E4M3 block scale up under SR.

Hadamard (hadamard_block, hadamard_signs) is applied along `axis` first, before any amax. Its
float32 result is quantized directly, without a round trip through x.dtype, as the fused
kernel keeps it in registers.

Special values: an MX block with NaN/Inf is all NaN; NVFP4 and FP8 make the whole tensor (and
the returned tensor scale) NaN when any element is NaN/Inf. A scale that decodes past the top of
the float32 range (block max within half an element step of float32 max, rounded up) gives Inf,
as the hardware format does.

Errors. Unknown fmt / rounding / scale_mode / backend raise ValueError listing the valid names
(FORMATS, ROUNDINGS, SCALE_MODES, BACKENDS). A scale_mode given for a non-MX format is a
ValueError too: silently ignoring it would mislabel an ablation.

Backends. "auto" uses fp4.kernels.triton_quantize_operand when x is on CUDA and
fp4.kernels.triton_available(x) says so (a missing module or function counts as unavailable);
"triton" forces the kernel (the tests run it on CPU under TRITON_INTERPRET=1); "torch" forces
this reference; float64 always takes this reference (no kernel reads float64, and the reference
is float64 already). This module is the dispatcher: arguments are validated here first, and the
kernel receives the resolved scale mode (never None for MX formats). The kernels import nothing
from here (fp4.kernels -> fp4.quantize would be an import cycle).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .names import OperandFormat, QuantBackend, Rounding, ScaleMode, choices
from .formats import (E2M1, FP32_BLOCK, FP8_DTYPES, FP8_ELEMENTS, MX_BLOCK, MX_ELEMENTS, MX_FORMATS,
                      NVFP4_BLOCK, ElementFormat, round_to_grid)
from .transforms import check_block, hadamard_compute, split_blocks
from .scaling import (MX_SCALE_MODES, SCALE_MODES as BLOCK_SCALE_MODES, block_amax, fp32_block_scales, fp8_tensor_scale, mx_scales, nvfp4_scales,
                      resolve_scale_mode)

__all__ = ["FORMATS", "ROUNDINGS", "SCALE_MODES", "BLOCK_SCALE_MODES", "BACKENDS", "MX_FORMATS", "fake_quantize",
           "quantize_operand", "resolve_scale_mode", "use_triton"]

FORMATS = choices(OperandFormat)
ROUNDINGS = choices(Rounding)
BACKENDS = choices(QuantBackend)
SCALE_MODES = MX_SCALE_MODES  # the E8M0 (MX) rules; BLOCK_SCALE_MODES adds "fp32"


def _check_choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")


def _validate(fmt, rounding, scale_mode, block_2d, hadamard_block, hadamard_signs, backend):
    _check_choice("fmt", fmt, FORMATS)
    _check_choice("rounding", rounding, ROUNDINGS)
    _check_choice("backend", backend, BACKENDS)
    if block_2d and fmt != "nvfp4":
        raise ValueError(f"block_2d (16x16 tiles) is an nvfp4 option, not valid for {fmt!r}")
    if hadamard_block is not None:
        check_block(hadamard_block)
    elif hadamard_signs is not None:
        raise ValueError("hadamard_signs given without hadamard_block")
    return resolve_scale_mode(fmt, rounding, scale_mode)


# Formats whose Triton kernel has been measured bit-identical to the contract on a GPU (H100,
# 8192^2 bf16 with planted zero / subnormal / signed-zero blocks, both axes, plus
# tests/fp4/test_kernels.py run on the GPU; docs/kernels-notes.md, results/bench/). "auto" sends
# only these to Triton. The first GPU check found the *reference* off by an ulp on CUDA (torch
# evaluates `tensor / python_float` as tensor * fp32(1 / float)); scaling._div_fp32 now divides
# by a device tensor, and the benchmark's same-GPU comparison shows 0 mismatches for every format.
# e2m1 under an MX scale mode launches exactly the mxfp4 kernel. Scale mode "fp32" has its own kernel
# (fp4.kernels.fp32_block_quant), checked on an H200 by experiments/gpu/fp32_block_kernel_check.py.
TRITON_GPU_VERIFIED = frozenset(choices(OperandFormat))
# Scale modes without a Triton kernel ("auto" takes the reference, "triton" raises): none at present.
NO_KERNEL_SCALE_MODES: frozenset = frozenset()


def use_triton(x: torch.Tensor, backend: str, fmt: str = "mxfp4", scale_mode: Optional[str] = None) -> bool:
    """The dispatch decision: whether quantize_operand (and fp8_gemm.quantize_fp8) hand x to a kernel.

    float64 never goes to a kernel, even when forced: the kernels read float32 / bfloat16 / float16
    bits, and the float64 reference is already exact. A scale mode without a kernel
    (NO_KERNEL_SCALE_MODES; none at present, scale mode fp32 has one) would go to the reference
    under "auto" and be a ValueError under "triton" (a forced backend that silently ran elsewhere
    would mislabel a benchmark). "triton" forces the kernel otherwise; "auto" takes it for CUDA
    tensors of a GPU-verified format when the kernels can run.
    """
    if backend == "torch" or x.dtype == torch.float64:
        return False
    if scale_mode in NO_KERNEL_SCALE_MODES:
        if backend == "triton":
            raise ValueError(f"backend='triton': the Triton kernels have no scale_mode={scale_mode!r} "
                             "path; use backend='torch' or 'auto' (which takes the torch reference)")
        return False
    if backend == "triton":
        return True
    if not x.is_cuda or fmt not in TRITON_GPU_VERIFIED:
        return False
    try:
        from . import kernels
        return bool(kernels.triton_available(x))
    except (ImportError, AttributeError):
        return False


def _triton(*args):
    try:
        from .kernels import triton_quantize_operand
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"backend='triton' requested but the Triton kernels are unavailable: {err}") from err
    return triton_quantize_operand(*args)


def split_tiles(x: torch.Tensor, axis: int, block: int
                ) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View a 2-D x as [rows/b, cols/b, b*b] square tiles (zero-padded), plus the inverse map."""
    if x.dim() != 2:
        raise ValueError(f"block_2d needs a 2-D tensor, got shape {tuple(x.shape)}")
    moved = x.movedim(axis, -1)
    rows, cols = moved.shape
    padded = torch.nn.functional.pad(moved, (0, (-cols) % block, 0, (-rows) % block))
    pr, pc = padded.shape
    tiles = padded.reshape(pr // block, block, pc // block, block).permute(0, 2, 1, 3)

    def restore(y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(pr // block, pc // block, block, block).permute(0, 2, 1, 3).reshape(pr, pc)
        return y[:rows, :cols].movedim(-1, axis)

    return tiles.reshape(pr // block, pc // block, block * block), restore


def _all_nan_unless(finite: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, t, torch.full_like(t, float("nan")))


def _mx(work, axis, elem: ElementFormat, mode, rounding, generator, out_dtype):
    blocks, restore = split_blocks(work.to(torch.float64), axis, MX_BLOCK)
    scale = mx_scales(blocks, elem, mode)  # NaN scale poisons the whole block, as required
    q = round_to_grid(blocks / scale, elem, rounding, generator)
    return restore(q * scale).to(out_dtype)


def _fp32_blocks(work, axis, elem: ElementFormat, rounding, generator):
    """Scale mode fp32: blocks of 16, s = fp32(amax / elem.max), v = fp32(x / s) (IEEE float32
    division, as NVFP4), v onto the grid, x_dq = fp32(q * s). Returned in float32 whatever x's dtype:
    q * s has up to 3 + 24 significant bits, so it is not a bfloat16 value (and is rounded once, to
    float32); the real GEMM would apply s in float32 to its block partial sums."""
    blocks, restore = split_blocks(work.to(torch.float32), axis, FP32_BLOCK)
    s = fp32_block_scales(blocks, elem)
    v = torch.where(s == 0, blocks * 0, blocks / s)  # blocks * 0 keeps the sign of zero
    q = round_to_grid(v, elem, rounding, generator)
    x_dq = (q * s.to(torch.float64)).to(torch.float32)  # exact product in float64, one rounding
    finite = torch.isfinite(block_amax(blocks)).unsqueeze(-1)  # NaN / Inf poisons its block
    return restore(_all_nan_unless(finite, x_dq))


def _nvfp4(work, axis, rounding, generator, block_2d, out_dtype):
    x32 = work.to(torch.float32)
    global_amax = x32.abs().amax()
    split = split_tiles if block_2d else split_blocks
    blocks, restore = split(x32, axis, NVFP4_BLOCK)
    s_b, s_g = nvfp4_scales(blocks, global_amax, rounding)
    s = s_b * s_g
    v = torch.where(s == 0, blocks * 0, blocks / s)  # blocks * 0 keeps the sign of zero
    q = round_to_grid(v, E2M1, rounding, generator).to(torch.float32)
    finite = torch.isfinite(global_amax)
    x_dq = _all_nan_unless(finite, restore(q * s_b))
    return x_dq.to(out_dtype), _all_nan_unless(finite, s_g)


# torch's own float8 casts (FP8_DTYPES) round to nearest even and keep subnormals, exactly the
# E4M3/E5M2 rule (the tests check them bit for bit against the float64 reference); they are ~20x
# faster on the CPU than the generic grid rounding, which matters because FP8 is the baseline's path.


def _fp8(work, elem: ElementFormat, rounding, generator, out_dtype):
    x32 = work.to(torch.float32)
    s = fp8_tensor_scale(x32, elem)
    if rounding == "nearest":
        # The clamp saturates (a bare cast would overflow to NaN/Inf); NaN passes through it.
        q = (x32 / s).clamp(-elem.max, elem.max).to(FP8_DTYPES[elem.name]).to(torch.float32)
    else:
        q = round_to_grid(x32 / s, elem, rounding, generator).to(torch.float32)
    finite = torch.isfinite(x32.abs().amax())
    return _all_nan_unless(finite, q).to(out_dtype), _all_nan_unless(finite, s)


def _quantize_torch(x, fmt, axis, rounding, scale_mode, generator, block_2d, hadamard_block,
                    hadamard_signs):
    if x.numel() == 0:
        return x.clone(), (None if fmt in MX_FORMATS else torch.ones((), device=x.device))
    work = x
    if hadamard_block is not None:
        work = hadamard_compute(x, hadamard_block, axis, hadamard_signs)
    if scale_mode == ScaleMode.fp32:
        return _fp32_blocks(work, axis, MX_ELEMENTS[fmt], rounding, generator), None
    if fmt in MX_ELEMENTS:
        return _mx(work, axis, MX_ELEMENTS[fmt], scale_mode, rounding, generator, x.dtype), None
    if fmt == "nvfp4":
        return _nvfp4(work, axis, rounding, generator, block_2d, x.dtype)
    return _fp8(work, FP8_ELEMENTS[fmt], rounding, generator, x.dtype)


def quantize_operand(x: torch.Tensor, fmt: str, axis: int, rounding: str = "nearest",
                     scale_mode: Optional[str] = None, generator: Optional[torch.Generator] = None,
                     block_2d: bool = False, hadamard_block: Optional[int] = None,
                     hadamard_signs: Optional[torch.Tensor] = None, backend: str = "auto"
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x_dq, tensor_scale): quantize x in blocks along `axis`; see the module docstring."""
    scale_mode = _validate(fmt, rounding, scale_mode, block_2d, hadamard_block, hadamard_signs, backend)
    if use_triton(x, backend, fmt, scale_mode):
        return _triton(x, fmt, axis, rounding, scale_mode, generator, block_2d, hadamard_block,
                       hadamard_signs)
    return _quantize_torch(x, fmt, axis, rounding, scale_mode, generator, block_2d,
                           hadamard_block, hadamard_signs)


def fake_quantize(x: torch.Tensor, fmt: str, axis: int = -1, rounding: str = "nearest",
                  scale_mode: Optional[str] = None, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """Quantize-dequantize x in `fmt` along `axis`; same shape and dtype as x."""
    x_dq, tensor_scale = quantize_operand(x, fmt, axis, rounding, scale_mode, generator)
    if tensor_scale is None:
        return x_dq.to(x.dtype)  # a no-op except for FP32 block scales (x_dq float32)
    return (x_dq.to(torch.float32) * tensor_scale).to(x.dtype)
