"""Error consistency across optimizer steps: which error of each GEMM is comparable from step to step,
and the window of k consecutive steps over which training measures it.

Why not every GEMM's output error
---------------------------------
The question (the MXFP4 paper's explanation of why Wgrad fails) is whether a GEMM's quantization
error repeats from one step to the next, so that it accumulates in the weights, or is fresh noise
that averages out. That needs an error tensor whose elements mean the same thing at step t and t+1:

    wgrad  "out"  e_t = dW_q - dW*, the Wgrad output error ([out, in]; summed over the step's
                  micro-batches, like the gradient), in weight space whatever the batch: comparable.
    fprop  "w"    e_t = W_eff - W, the error of the weight operand as Fprop multiplied it, and
    dgrad  "w"    the same for Dgrad's copy of W (blocked along out_features, not in_features: a
                  different quantization of the same weight, so a key of its own).

Fprop's output Y and Dgrad's output dX are per token of that step's batch: element i of Y at step t
and at step t+1 belong to different sequences, so their errors are not comparable, and a correlation
of them would measure nothing. The weight operand is the fixed-shape input of those two GEMMs; its
error is what they add at every step (X and dY, like the outputs, are per token).

W_eff is taken in W's own coordinates: with a Hadamard stabilizer the quantizer sees W R (R =
diag(s) H_b / sqrt(b) blockwise along the reduction axis, fp4/transforms.py) and the GEMM computes
X R Q(W R)^T = X (Q(W R) R^T)^T, so W_eff = Q(W R) R^T and e = (Q(W R) - W R) R^T, cut back to W's
unpadded length. Randomized signs redraw R every step or call; left in R's coordinates, two steps'
errors would be decorrelated by the change of basis alone. The probe (fp4/probe.py) hands W R but
not s; since H_b / sqrt(b) is symmetric and orthonormal, (W R) H_b / sqrt(b) = W diag(s), so each
sign s_p (one per position p in the block, shared by all blocks) is the sign of sum W * (W R H) over
the elements at position p: a sum over rows x blocks of squares, exact whenever a column of W at
that position is nonzero (an all-zero one does not matter: its error term multiplies zeros).

Windows (training)
------------------
`Window(first, k)` collects the steps first .. first + k - 1 into an ErrorConsistency in float32
(metrics.py: the running sum and the previous step's error per (GEMM, layer), plus the open step's
accumulator) and, once its last step is done, gives one record per (GEMM, layer):

    {"kind": "consistency", "step": last, "first_step", "last_step", "layer", "layer_index",
     "gemm", "error": "out" | "w", "step_corr", "coherence", "k"}

"step" is the last step, so a resumed run's cut-back of diagnostics.jsonl (records after the
checkpoint's step go) removes a window that had not ended by the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fp4.transforms import hadamard_compute, hadamard_matrix, split_blocks
from .metrics import ErrorConsistency

CONSISTENCY = "consistency"
# The error each GEMM's consistency is measured on (module docstring).
ERROR_OF = {"wgrad": "out", "fprop": "w", "dgrad": "w"}


def hadamard_signs(w: torch.Tensor, transformed: torch.Tensor, block: int, axis: int) -> torch.Tensor:
    """The sign vector s ([block], float32 +-1) of `transformed` = (w * s) H_b / sqrt(b) along `axis`
    (w zero-padded to whole blocks), read off as in the module docstring."""
    signed = hadamard_compute(transformed, block, axis)  # (w * s) H H = w * s: H orthonormal, symmetric
    wb, _ = split_blocks(w.detach().to(torch.float64), axis, block)
    sb, _ = split_blocks(signed.to(torch.float64), axis, block)
    dot = (wb * sb).reshape(-1, block).sum(0)
    return torch.where(dot < 0, -1.0, 1.0).to(torch.float32)


def untransform(e: torch.Tensor, block: int, axis: int, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """e R^T along `axis` (a length that is a multiple of `block`): the inverse of the transform."""
    blocks, restore = split_blocks(e, axis, block)
    x = blocks @ hadamard_matrix(block, e.dtype, e.device)
    return restore(x * signs.to(e.dtype) if signs is not None else x)


@torch.no_grad()
def weight_error(obs) -> torch.Tensor:
    """W_eff - W of an Fprop or Dgrad observation, float32, in W's layout [out, in]."""
    w, from_, q = obs.inputs[1], obs.quantized_from[1], obs.quantized[1]
    e = q.to(torch.float32) - from_.to(torch.float32)
    h = obs.spec.hadamard
    if h is None:
        return e
    axis = obs.axes[1]
    signs = None if h.signs == "none" else hadamard_signs(w, from_, h.block, axis)
    return untransform(e, h.block, axis, signs).narrow(axis, 0, w.shape[axis])


@torch.no_grad()
def feed(tracker: ErrorConsistency, obs) -> None:
    """Add one observation's comparable error to `tracker`, keyed (gemm, layer, layer_index): the
    Wgrad output error of every call (a step's calls add up, like its gradient); the weight-operand
    error of Fprop and Dgrad at the step's first call of the layer only (the weights do not change
    within a step: later micro-batches would add the same error again, or under per-call signs another
    rotation of it). "First" is the first one seen, not call index 0: an evaluation between two steps
    advances the call counter of the next one."""
    key = (obs.gemm, obs.layer, obs.layer_index)
    if obs.gemm == "wgrad":
        tracker.add(key, (obs.output.to(torch.float64) - obs.exact()).to(torch.float32))
    elif not tracker.in_step(key):
        tracker.add(key, weight_error(obs))


class ConsistencyProbe:
    """An fp4 probe that feeds `tracker` the comparable errors of the selected layers' GEMMs."""

    def __init__(self, tracker: ErrorConsistency, selected: Callable[[str, int], bool]):
        self.tracker, self.selected = tracker, selected

    def __call__(self, obs) -> None:
        if not self.selected(obs.layer, obs.layer_index):
            return
        feed(self.tracker, obs)


@dataclass
class Window:
    """k consecutive optimizer steps from `first`; `next_step` is the step it expects next."""

    first: int
    k: int
    tracker: ErrorConsistency = field(default_factory=lambda: ErrorConsistency(torch.float32))

    def __post_init__(self):
        self.next_step = self.first

    @property
    def last(self) -> int:
        return self.first + self.k - 1

    def end_step(self, step: int) -> bool:
        """Close optimizer step `step`; True once the window's last step is done."""
        self.tracker.end_step()
        self.next_step = step + 1
        return step == self.last

    def records(self) -> List[Dict[str, object]]:
        out = []
        for key, (corr, coh) in self.tracker.results().items():
            gemm, layer, index = key
            out.append({"kind": CONSISTENCY, "step": self.last, "first_step": self.first, "last_step": self.last,
                        "layer": layer, "layer_index": index, "gemm": gemm, "error": ERROR_OF[gemm],
                        "step_corr": corr, "coherence": coh, "k": self.tracker.steps(key)})
        return out
