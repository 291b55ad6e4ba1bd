"""Block Hadamard transform, the rotation applied to GEMM operands before FP4 quantization.

    y_block = (x_block * signs) @ H_b / sqrt(b)

along `axis`, in blocks of b (a power of two), with H_b the Sylvester Hadamard matrix
(H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]). H_b / sqrt(b) is orthonormal and symmetric, and
diag(signs) is orthogonal for signs in {+-1}, so transforming both operands of a GEMM along its
reduction axis with the same block and signs leaves the product unchanged in exact arithmetic:
(X R)(W R)^T = X W^T. Why: the rotation spreads an outlier over its block, so the block amax,
and with it the quantization step, shrinks for the other elements.

Sign cadences (none / fixed / step / call) are chosen by the caller; this module only draws a
vector with `random_signs(block, generator)` from the generator it is handed, so the same seed
gives the same signs.

Numerics: the product is computed in float32 (float64 for float64 inputs) against the
normalized matrix H_b / sqrt(b) (for b = 4^k the normalization is exact, e.g. 0.25 for b = 16)
and the result is cast back to x.dtype. fp4.quantize uses `hadamard_compute` to keep the float32
result when it quantizes right after, as the fused kernel does.

Non-multiple lengths: an axis whose length is not a multiple of b is zero-padded to the next
multiple, transformed, and the pad is cut off, the same rule as quantization blocks (and what a
kernel with masked loads and stores computes). The last, partial block is then *not* an
orthogonal transform (energy that lands on the pad positions is dropped), so the
product-preservation property above holds only for lengths that are multiples of b; the
quantized linear therefore pads both GEMM operands to the block itself and runs the GEMM over
the padded length.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["check_block", "hadamard", "hadamard_compute", "hadamard_matrix", "random_signs", "split_blocks"]


def check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two (1, 2, 4, 8, 16, 32, ...), got {block!r}")


@functools.lru_cache(maxsize=None)
def _sylvester(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def hadamard_matrix(block: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix H_b / sqrt(b) ([b, b], symmetric), cached.

    Treat the result as read-only: it is shared between callers.
    """
    check_block(block)
    return (_sylvester(block) / math.sqrt(block)).to(dtype=dtype, device=device)


def random_signs(block: int, generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """A float32 vector of `block` independent +-1 signs drawn from `generator`."""
    check_block(block)
    if device is None and generator is not None:
        device = generator.device
    bits = torch.randint(0, 2, (block,), generator=generator, device=device)
    return (bits * 2 - 1).to(torch.float32)


def split_blocks(x: torch.Tensor, axis: int, block: int
                 ) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View x as [..., nblocks, block] along `axis` (moved last, zero-padded to a multiple).

    Returns the blocked tensor and a function mapping a same-shaped blocked tensor back to x's
    layout (pad cut off, axis restored).
    """
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"axis {axis} out of range for a tensor of rank {x.dim()}")
    axis = axis % x.dim()
    moved = x.movedim(axis, -1)
    length = moved.shape[-1]
    pad = (-length) % block
    if pad:
        moved = F.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], -1, block)

    def restore(y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*y.shape[:-2], -1)[..., :length]
        return y.movedim(-1, axis)

    return blocks, restore


def hadamard_compute(x: torch.Tensor, block: int = 16, axis: int = -1,
                     signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The transform, returned in its compute dtype (float32, or float64 for float64 x)."""
    check_block(block)
    if x.dim() == 0:
        raise ValueError("hadamard needs a tensor with at least one dimension")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks, restore = split_blocks(x.to(dtype), axis, block)
    if signs is not None:
        if signs.shape != (block,):
            raise ValueError(f"signs must have shape ({block},), got {tuple(signs.shape)}")
        blocks = blocks * signs.to(dtype=dtype, device=x.device)
    return restore(blocks @ hadamard_matrix(block, dtype, x.device))


def hadamard(x: torch.Tensor, block: int = 16, axis: int = -1,
             signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block Hadamard transform of x along `axis`; same shape and dtype as x (see module doc)."""
    return hadamard_compute(x, block, axis, signs).to(x.dtype)
