"""The GEMM probe: an observer that sees every quantized GEMM's operands and output as executed.

A model's QuantState carries an optional probe callback (`state.probe`, None by default; or for a
block: `with state.probe_gemms(callback): ...`). It is per model, never process-wide. Like the GEMM
recorder it is snapshotted when a layer's forward starts, so the Dgrad / Wgrad GEMMs of that forward's
backward report to the same callback. With no probe the only cost is one `is not None` test per GEMM.

`_run_gemm` (fp4/linear.py) calls `probe(obs)` with one GemmObservation after the GEMM has run. The
probe never changes what a GEMM computes: it only reads tensors that the GEMM made anyway, under
torch.no_grad(), and draws no random numbers (the Hadamard transform it recomputes uses the signs the
GEMM used). The bf16 recipe runs F.linear itself and is never probed.

What an observation holds (a, b in product order; names in `operands`, e.g. ("dy", "x") for Wgrad):

    inputs          the high-precision operands as the GEMM received them (natural layout X [T, in],
                    W [out, in], dY [T, out]; before padding and Hadamard)
    quantized_from  what was quantized: `inputs` after the Hadamard padding and transform (float32,
                    as the quantizer sees it); `inputs` themselves when the GEMM has no transform
    quantized       the values the GEMM multiplied: grid values x per-tensor scale (float32), same
                    layout as quantized_from; for a high-precision operand the compute-dtype copy
    output          the GEMM's actual output (compute dtype, bias included)
    exact()         the exact product of the *untransformed* inputs, op(a) . op(b) (+ bias), in
                    float64, computed lazily on first call and cached

Operand metrics compare `quantized` with `quantized_from` (what was quantized); output metrics compare
`output` with `exact()`. With a Hadamard transform both are right: (X R)(W R)^T = X W^T in exact
arithmetic, so the exact untransformed product is the reference of the transformed GEMM too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

__all__ = ["GemmObservation", "Probe"]


@dataclass
class GemmObservation:
    layer: str
    layer_index: int
    gemm: str                      # "fprop" | "dgrad" | "wgrad"
    operands: Tuple[str, str]      # operand names in product order
    axes: Tuple[int, int]          # each operand's reduction (blocking) axis in its natural layout
    step: int
    call: int
    path: str                      # as fp4.linear.gemm_path words it
    spec: object                   # the fp4.recipe.GemmSpec the GEMM ran
    inputs: Tuple[torch.Tensor, torch.Tensor]
    quantized_from: Tuple[torch.Tensor, torch.Tensor]
    quantized: Tuple[torch.Tensor, torch.Tensor]
    output: torch.Tensor
    bias: Optional[torch.Tensor] = None
    _exact: Optional[torch.Tensor] = field(default=None, repr=False)

    def exact(self) -> torch.Tensor:
        """op(a) . op(b) (+ bias) of the untransformed, unquantized inputs, float64; cached."""
        if self._exact is None:
            with torch.no_grad():
                a, b = (t.detach().to(torch.float64) for t in self.inputs)
                a_axis, b_axis = self.axes
                y = (a if a_axis == -1 else a.t()) @ (b if b_axis == 0 else b.t())
                if self.bias is not None:
                    y = y + self.bias.detach().to(torch.float64)
                self._exact = y
        return self._exact


Probe = Callable[[GemmObservation], None]
