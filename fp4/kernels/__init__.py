"""Triton fast path of fp4.quantize.quantize_operand (same semantics, bit-identical for RNE).

Modules:
  _bits.py      integer-only rounding / scale arithmetic on float32 bit patterns (the reason the
                kernels are subnormal-safe on a flushing GPU; read its docstring first)
  mx_quant.py   one fused pass per operand for MX and NVFP4 (and FP8 behind a Hadamard), blocks
                along the last axis or along the first (token) axis without a transposed copy
  mx_rows_hadamard.py  MX along the token axis (with the block Hadamard fused or none) as 32 row
                slabs per MX block, so the block amax and the butterflies stay inside a thread
  _tiles.py     tile geometry, the Hadamard on a tile, block-value stores and MX integer rounding
                of a tile, shared by the two kernels above
  amax.py       the global-amax pre-pass and the SR seed draw (shared by mx_quant and fp8_quant)
  fp32_block_quant.py  scale mode "fp32" (UFP4: one unrounded float32 scale per 16, e2m1 / e1m2 /
                int4 elements), both orientations, fused Hadamard, bit-identical to the reference
                under stochastic rounding too (it reads the reference's own torch.rand uniforms)
  fp8_quant.py  FP8 per-tensor current scaling: amax pre-pass + fused scale/round/cast, with an
                optional real float8 output for torch._scaled_mm
  packing.py    plain-torch packing of E2M1 codes (two per byte, low nibble first), E8M0 / E4M3
                scale bytes, the 128x4 blocked scale swizzle torch._scaled_mm takes, and unpacking

Shapes. quantize_operand accepts any rank and axis; here x is folded, without copies when it is
contiguous, into [B, R, C]: axis last -> [1, prod(leading), L] with blocks along C; any other
axis -> [prod(before), L, prod(after)] with blocks along R (the token axis of Wgrad is axis 0 of
a [T, features] tensor: B = 1). Inputs are float32 / bfloat16 / float16 (KERNEL_DTYPES);
fp4.quantize answers float64 with the torch reference (which is float64 already).

Importing this package never needs triton; `triton_available` says whether the kernels can run.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ..formats import FP32_BLOCK, FP8_DTYPES, MX_ELEMENTS, MX_FORMATS, OPERAND_FORMATS
from ..names import OperandFormat, ScaleMode
from ..scaling import MX_SCALE_MODES, resolve_scale_mode
from .packing import (FP4_BLOCK, decode_scales, dequantize_packed, e2m1_codes, e2m1_decode,
                      expand_2d_scales, from_blocked, pack_fp4, to_blocked, unpack_fp4)

__all__ = ["triton_available", "triton_quantize_operand", "triton_quantize_operand_ex",
           "quantize_packed", "pack_fp4", "unpack_fp4", "to_blocked", "from_blocked",
           "dequantize_packed", "decode_scales", "e2m1_codes", "e2m1_decode", "expand_2d_scales"]

# Input dtypes of the kernels (the bits they read: fp4.kernels.amax.IN_KINDS follows this order).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_available(x: Optional[torch.Tensor] = None) -> bool:
    """True iff triton imports and x is a CUDA tensor, or TRITON_INTERPRET=1 is set."""
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return x is not None and bool(x.is_cuda)


def _fold(x: torch.Tensor, axis: int, block_2d: bool):
    """(x as a contiguous [B, R, C] tensor, kernel axis 0/1)."""
    if x.dim() == 0:
        return x.reshape(1, 1, 1), 1
    a = axis % x.dim()
    xc = x.contiguous()
    if block_2d:
        if x.dim() != 2:
            raise ValueError(f"block_2d needs a 2-D tensor, got shape {tuple(x.shape)}")
        return xc.view(1, *x.shape), (1 if a == 1 else 0)
    length = x.shape[a]
    before = math.prod(x.shape[:a])
    after = math.prod(x.shape[a + 1:])
    if after == 1:
        return xc.view(1, before, length), 1
    return xc.view(before, length, after), 0


def triton_quantize_operand_ex(x: torch.Tensor, fmt: str, axis: int, rounding: str = "nearest",
                               scale_mode: Optional[str] = None,
                               generator: Optional[torch.Generator] = None,
                               block_2d: bool = False, hadamard_block: Optional[int] = None,
                               hadamard_signs: Optional[torch.Tensor] = None,
                               return_scales: bool = False):
    """(x_dq, tensor_scale, scale_codes): triton_quantize_operand plus, with return_scales, the
    per-block scale bytes (uint8: E8M0 e + 127 for MX, E4M3 code of s_b for NVFP4) shaped
    [B, R/RB, C/CB] for the folded [B, R, C] view (see packing.py), or None for FP8; for scale
    mode "fp32" the float32 block scales s themselves, same shape (fp32_block_quant.py).

    Arguments are taken as resolved: validating them and choosing between kernel and reference
    is fp4.quantize's job (the dispatcher). Only what the kernel itself needs is checked here."""
    scale_mode = resolve_scale_mode(fmt, rounding, scale_mode)
    fp32_blocks = scale_mode == ScaleMode.fp32
    if scale_mode is not None and scale_mode not in MX_SCALE_MODES and not fp32_blocks:
        raise ValueError(f"no Triton kernel for scale_mode={scale_mode!r} (the kernels implement the MX "
                         f"modes {', '.join(MX_SCALE_MODES)} and fp32); use fp4.quantize with backend 'torch'")
    if fp32_blocks and x.dim() == 0:
        raise IndexError(f"axis {axis} out of range for a tensor of rank 0")  # as the reference
    if hadamard_signs is not None and hadamard_signs.shape != (hadamard_block,):
        raise ValueError(f"signs must have shape ({hadamard_block},), got "
                         f"{tuple(hadamard_signs.shape)}")
    if x.numel() == 0:
        return x.clone(), (None if fmt in MX_FORMATS else torch.ones((), device=x.device)), None
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, KERNEL_DTYPES))}, not {x.dtype}; "
                        "fp4.quantize.quantize_operand sends other dtypes to the torch reference")
    if hadamard_block is not None and hadamard_block > 1:
        hb = hadamard_block
    else:
        hb = None  # a 1-point transform is the identity (scale 1, sign applied below)
        if hadamard_signs is not None:
            x = x * hadamard_signs.to(device=x.device, dtype=x.dtype)
            hadamard_signs = None
    if fp32_blocks:
        return _fp32_blocks(x, MX_ELEMENTS[fmt].name, axis, rounding, generator, hb, hadamard_signs,
                            return_scales)
    x3, kaxis = _fold(x, axis, block_2d)
    if fmt in FP8_DTYPES and hb is None:
        from .fp8_quant import fp8_quantize
        q, s, _ = fp8_quantize(x3, fmt, rounding, generator)
        return q.view(x.shape), s, None
    from .mx_quant import KIND_FP8, KIND_MX, KIND_NVFP4, block_quantize
    if fmt in MX_ELEMENTS:
        kind, elem = KIND_MX, MX_ELEMENTS[fmt].name
    elif fmt == OperandFormat.nvfp4:
        kind, elem = KIND_NVFP4, OPERAND_FORMATS[fmt].element.name
    else:
        kind, elem = KIND_FP8, fmt
    out, ts, scales = block_quantize(x3, kind, elem, kaxis, scale_mode, rounding, generator,
                                     block_2d, hb, hadamard_signs,
                                     write_scales=return_scales and kind != KIND_FP8)
    return out.view(x.shape), ts, scales


def _fp32_blocks(x, elem, axis, rounding, generator, hb, signs, return_scales):
    """Scale mode fp32 (fp32_block_quant.py): x_dq float32, no tensor scale, float32 block scales."""
    from .fp32_block_quant import fp32_block_quantize
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"axis {axis} out of range for a tensor of rank {x.dim()}")
    x3, kaxis = _fold(x, axis, False)
    # The reference's uniforms: its blocked layout is x with the axis moved last, in blocks of 16.
    rest = [n for i, n in enumerate(x.shape) if i != axis % x.dim()]
    ushape = (*rest, -(-x.shape[axis] // FP32_BLOCK), FP32_BLOCK)
    out, scales = fp32_block_quantize(x3, elem, kaxis, rounding, generator, ushape, hb, signs,
                                      write_scales=return_scales)
    return out.view(x.shape), None, scales


def triton_quantize_operand(x: torch.Tensor, fmt: str, axis: int, rounding: str = "nearest",
                            scale_mode: Optional[str] = None,
                            generator: Optional[torch.Generator] = None, block_2d: bool = False,
                            hadamard_block: Optional[int] = None,
                            hadamard_signs: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same arguments and return convention as fp4.quantize.quantize_operand (minus backend)."""
    x_dq, ts, _ = triton_quantize_operand_ex(x, fmt, axis, rounding, scale_mode, generator,
                                             block_2d, hadamard_block, hadamard_signs)
    return x_dq, ts


def quantize_packed(x: torch.Tensor, fmt: str, axis: int = -1, rounding: str = "nearest",
                    scale_mode: Optional[str] = None, generator: Optional[torch.Generator] = None,
                    block_2d: bool = False, hadamard_block: Optional[int] = None,
                    hadamard_signs: Optional[torch.Tensor] = None):
    """A 2-D operand as torch._scaled_mm takes it: (packed uint8 [M, ceil(K/2)], swizzled scale
    bytes (to_blocked), tensor scale or None, x_dq), K the reduction axis `axis`.

    For axis=0 the operand is x^T ([C, R], blocks along R); its codes are packed from the
    transposed x_dq, so x itself is never transposed before quantization.
    """
    if fmt not in FP4_BLOCK or x.dim() != 2:
        raise ValueError(f"quantize_packed takes a 2-D tensor and fmt {' or '.join(FP4_BLOCK)}")
    x_dq, ts, codes = triton_quantize_operand_ex(x, fmt, axis, rounding, scale_mode, generator,
                                                 block_2d, hadamard_block, hadamard_signs,
                                                 return_scales=True)
    codes = codes[0]
    last = axis % 2 == 1
    if block_2d:
        codes = expand_2d_scales(codes if last else codes.t(), x.shape[0] if last else x.shape[1])
    elif not last:
        codes = codes.t()
    operand = x_dq if last else x_dq.t()
    packed = pack_fp4(operand, codes.contiguous(), fmt)
    return packed, to_blocked(codes.contiguous()), ts, x_dq
