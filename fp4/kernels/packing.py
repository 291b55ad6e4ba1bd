"""Packed FP4 operands for block-scaled GEMMs (torch._scaled_mm with MXFP4 / NVFP4), plain torch.

Element codes. E2M1 is sign-magnitude: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa;
code k & 7 decodes to E2M1_GRID[k & 7] = 0, .5, 1, 1.5, 2, 3, 4, 6. Two codes share a byte, the
element with the lower index in the *low* nibble (torch.float4_e2m1fn_x2 / cuBLASLt order).

Operand layout. A GEMM operand is [M, K] with K, the reduction axis, last and row-major:
packed codes are uint8 [M, ceil(K/2)], block scales are [M, ceil(K/blk)] bytes -- E8M0
(e + 127, 0xFF = NaN) per 32 for MXFP4, the E4M3 code of s_b per 16 for NVFP4 (the fp32 tensor
scale goes to the GEMM as alpha). An operand whose blocks run along dim 0 (Wgrad's dY and X,
quantized with axis=0) is its transpose: pass x_dq.t() and the scale codes transposed.
A K that is not a multiple of the block is zero-padded (zeros code to 0), as the quantizer's pad.

Scale swizzle. cuBLASLt wants block scales in 128x4 tiles ("to_blocked", as torchao and torch's
tests write it): pad the [M, K/blk] scale matrix to multiples of (128, 4), view it as
[M/128, 128, K/blk/4, 4] tiles, order tiles row-major, and inside a tile lay the 128 rows out as
4 groups of 32: [32, 4 groups, 4 cols], flattened. `from_blocked` inverts it.

Everything here is exact: q = x_dq / scale is an exact float64 division (x_dq holds q * 2^e or
q * s_b exactly), and `dequantize_packed` reproduces x_dq bit for bit (tested round trip).
"""
from __future__ import annotations

import torch

from ..formats import E2M1, E8M0_BIAS, OPERAND_FORMATS
from ..names import OperandFormat

__all__ = ["E2M1_GRID", "e2m1_codes", "e2m1_decode", "pack_fp4", "unpack_fp4", "decode_scales",
           "dequantize_packed", "to_blocked", "from_blocked", "expand_2d_scales"]

# From the one format table (fp4.formats): the E2M1 magnitudes by code, and the block of each
# E2M1 operand format that torch._scaled_mm can multiply (MXFP4 E8M0 / 32, NVFP4 E4M3 / 16).
E2M1_GRID = tuple(E2M1.grid.tolist())
FP4_BLOCK = {str(f): OPERAND_FORMATS[f].block for f in (OperandFormat.mxfp4, OperandFormat.nvfp4)}
_E8M0_NAN_CODE = 255


def _check_fmt(fmt: str) -> int:
    if fmt not in FP4_BLOCK:
        raise ValueError(f"packing supports {', '.join(FP4_BLOCK)}, not {fmt!r}")
    return FP4_BLOCK[fmt]


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 of values on the E2M1 grid (sign bit 3; -0 keeps its sign).

    Values off the grid raise ValueError (packing must never round silently); NaN codes 0.
    """
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=q.device)
    a = q.to(torch.float64).abs()
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    hit = a.unsqueeze(-1) == grid
    if not bool(hit.any(-1).all()):
        raise ValueError("e2m1_codes: value not on the E2M1 grid")
    mag = hit.to(torch.uint8).argmax(-1).to(torch.uint8)
    return mag | (torch.signbit(q).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 E2M1 codes (low 4 bits)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def decode_scales(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 block scales from their bytes: 2^(c - 127) (NaN for 0xFF) or the E4M3 value."""
    _check_fmt(fmt)
    if OPERAND_FORMATS[fmt].block_scale == "e8m0":
        c = codes.to(torch.int64)
        scale = ((c - E8M0_BIAS + 1023) << 52).view(torch.float64)
        return torch.where(c == _E8M0_NAN_CODE, torch.full_like(scale, float("nan")), scale)
    return codes.contiguous().view(torch.float8_e4m3fn).to(torch.float64)


def _blockwise(t: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """[M, K] -> [M, ceil(K/block), block], zero-padded."""
    pad = (-k) % block
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(t.shape[0], -1, block)


def pack_fp4(x_dq: torch.Tensor, scale_codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Packed uint8 [M, ceil(K/2)] codes of x_dq [M, K] (blocks along K) given its scale bytes."""
    block = _check_fmt(fmt)
    m, k = x_dq.shape
    scale = decode_scales(scale_codes, fmt).unsqueeze(-1)
    blocks = _blockwise(x_dq.to(torch.float64), k, block)
    safe = torch.where((scale == 0) | torch.isnan(scale), torch.ones_like(scale), scale)
    q = torch.where(scale == 0, blocks * 0, blocks / safe)
    codes = e2m1_codes(q).reshape(m, -1)[:, : k + (k % 2)]
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 codes [M, k] from packed bytes [M, ceil(k/2)] (low nibble = even index)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def dequantize_packed(packed: torch.Tensor, scale_codes: torch.Tensor, fmt: str, k: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_dq [M, k] (scale included, tensor scale excluded) from packed codes and scale bytes."""
    block = _check_fmt(fmt)
    q = e2m1_decode(unpack_fp4(packed, k)).to(torch.float64)
    m = q.shape[0]
    scale = decode_scales(scale_codes, fmt).unsqueeze(-1)
    x = _blockwise(q, k, block) * scale
    return x.reshape(m, -1)[:, :k].to(dtype)


def expand_2d_scales(tile_codes: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row scale bytes [rows, C/16] from NVFP4 16x16 tile bytes [R/16, C/16] (a tile's
    scale repeated for each of its 16 rows), the layout a 1-D-block GEMM operand takes."""
    return tile_codes.repeat_interleave(FP4_BLOCK[OperandFormat.nvfp4], dim=0)[:rows]


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """cuBLASLt 128x4 swizzle of a [M, K/blk] scale matrix -> flat tensor (padded with 0)."""
    rows, cols = scales.shape
    nrb, ncb = -(-rows // 128), -(-cols // 4)
    padded = scales.new_zeros((nrb * 128, ncb * 4))
    padded[:rows, :cols] = scales
    tiles = padded.view(nrb, 128, ncb, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def from_blocked(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocked: the [rows, cols] scale matrix."""
    nrb, ncb = -(-rows // 128), -(-cols // 4)
    tiles = flat.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(nrb, ncb, 128, 4)
    return tiles.permute(0, 2, 1, 3).reshape(nrb * 128, ncb * 4)[:rows, :cols]
