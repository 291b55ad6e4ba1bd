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
reproduces the same bits. generator=None draws from torch's global RNG. MX formats default to
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
this reference. Arguments are validated here first and the kernel receives the resolved scale
mode (never None for MX formats).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .formats import E1M2, E2M1, E4M3, E5M2, INT4, ElementFormat, round_to_grid
from .transforms import check_block, hadamard_compute, split_blocks
from .scaling import MX_SCALE_MODES, fp8_tensor_scale, mx_scales, nvfp4_scales

__all__ = ["FORMATS", "ROUNDINGS", "SCALE_MODES", "BACKENDS", "MX_FORMATS", "fake_quantize",
           "quantize_operand", "resolve_scale_mode"]

FORMATS = ("mxfp4", "nvfp4", "e1m2", "int4", "e4m3", "e5m2")
ROUNDINGS = ("nearest", "stochastic")
SCALE_MODES = MX_SCALE_MODES
BACKENDS = ("auto", "torch", "triton")
MX_ELEMENTS = {"mxfp4": E2M1, "e1m2": E1M2, "int4": INT4}
FP8_ELEMENTS = {"e4m3": E4M3, "e5m2": E5M2}
MX_FORMATS = tuple(MX_ELEMENTS)
MX_BLOCK, NVFP4_BLOCK = 32, 16


def _check_choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")


def resolve_scale_mode(fmt: str, rounding: str, scale_mode: Optional[str]) -> Optional[str]:
    """The MX scale mode actually used: `even` under nearest, `rceil` under SR unless given."""
    if fmt not in MX_FORMATS:
        if scale_mode is not None:
            raise ValueError(f"scale_mode {scale_mode!r} applies only to the MX formats "
                             f"{', '.join(MX_FORMATS)}, not to {fmt!r}; pass None")
        return None
    if scale_mode is None:
        return "even" if rounding == "nearest" else "rceil"
    _check_choice("scale_mode", scale_mode, SCALE_MODES)
    return scale_mode


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
TRITON_GPU_VERIFIED = frozenset({"mxfp4", "e1m2", "int4", "nvfp4", "e4m3", "e5m2"})


def _use_triton(x: torch.Tensor, backend: str, fmt: str = "mxfp4") -> bool:
    if backend == "torch":
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


# torch's own float8 casts round to nearest even and keep subnormals, exactly the E4M3/E5M2
# rule (the tests check them bit for bit against the float64 reference); they are ~20x faster
# on the CPU than the generic grid rounding, which matters because FP8 is the baseline's path.
_TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _fp8(work, elem: ElementFormat, rounding, generator, out_dtype):
    x32 = work.to(torch.float32)
    s = fp8_tensor_scale(x32, elem)
    if rounding == "nearest":
        # The clamp saturates (a bare cast would overflow to NaN/Inf); NaN passes through it.
        q = (x32 / s).clamp(-elem.max, elem.max).to(_TORCH_FP8[elem.name]).to(torch.float32)
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
    if _use_triton(x, backend, fmt):
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
        return x_dq
    return (x_dq.to(torch.float32) * tensor_scale).to(x.dtype)
