"""One optimizer step: learning rate, micro-batches, gradient clipping, step, quantization clock.

The learning-rate schedule (linear warmup, then cosine to `min_lr_ratio * lr` at
`max_tokens`) depends only on tokens seen and `max_tokens`, never on the target, so every
rung of the ladder follows the same schedule and stopping early changes nothing before the
stop.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from fp4.linear import QuantState
from ..model import causal_lm_loss
from .state import LoopState


def lr_at(tokens: float, train_cfg) -> float:
    peak, floor = train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio
    if tokens < train_cfg.warmup_tokens:
        return peak * (tokens + 1) / max(train_cfg.warmup_tokens, 1)
    span = max(train_cfg.max_tokens - train_cfg.warmup_tokens, 1)
    progress = min((tokens - train_cfg.warmup_tokens) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: float        # mean over the micro-batches
    grad_norm: float   # before clipping
    lr: float
    dt: float          # seconds, synchronized on CUDA


class TrainStep:
    """Callable: one optimizer step over `batch_size // micro_batch_size` micro-batches.

    `model` owns the parameters (clipping, optimizer); `step_model` runs the forward (the same
    module, or its torch.compile wrapper). Under ddp / fsdp2 (`dist`, experiments/distributed.py)
    `model` is the wrapped module and `n_micro` this rank's micro-batches: gradients are reduced
    (averaged over the ranks) on the last micro-batch only, the reported loss is the mean over the
    ranks, and the gradient norm is the global one (DDP's reduced gradients; FSDP2's sharded
    DTensor norm).
    """

    def __init__(self, *, model, step_model, optimizer, loader, quant_state: QuantState,
                 autocast, device, n_micro: int, grad_clip: float, dist=None):
        self.model, self.step_model, self.optimizer = model, step_model, optimizer
        self.loader, self.quant_state, self.autocast = loader, quant_state, autocast
        self.device, self.n_micro, self.grad_clip = device, n_micro, grad_clip
        self.dist = dist if dist is not None and dist.enabled else None

    def _sync(self, last: bool):
        """A context for one micro-batch's backward: reduce gradients only on the last one."""
        mode = self.dist.mode if self.dist is not None else "none"
        if mode == "ddp" and not last:
            return self.model.no_sync()
        if mode == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def __call__(self, lr: float) -> StepResult:
        t0 = time.perf_counter()
        batches = [self.loader.next_batch() for _ in range(self.n_micro)]
        return self.step_from_batches(lr, batches, t0)

    def step_from_batches(self, lr: float, batches, t0: float) -> StepResult:
        """The step on these micro-batches ((input_ids, labels) each); t0 is when the step began."""
        loss_sum = 0.0
        for i, (input_ids, labels) in enumerate(batches):
            input_ids = input_ids.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.dist is None:
                with self.autocast():
                    loss = causal_lm_loss(self.step_model, input_ids, labels) / self.n_micro
                loss.backward()
            else:
                with self._sync(i == self.n_micro - 1):
                    with self.autocast():
                        loss = causal_lm_loss(self.step_model, input_ids, labels) / self.n_micro
                    loss.backward()
            loss_sum += loss.detach()
        return self.finish_step(lr, loss_sum, t0)

    def finish_step(self, lr: float, loss_sum, t0: float, zero_grad: bool = True) -> StepResult:
        """Clip, step the optimizer, advance the quantization clock, synchronize. zero_grad=False
        leaves the gradients in place (a replayed CUDA graph overwrites them: graphed.py)."""
        for group in self.optimizer.param_groups:  # read by the optimizer's step only
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.dist is not None:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (already the global norm)
                grad_norm = grad_norm.full_tensor()
            loss_sum = self.dist.all_reduce_mean_(torch.as_tensor(loss_sum, dtype=torch.float32,
                                                                  device=self.device).clone())
        loss_value, grad_value = float(loss_sum), float(grad_norm)
        self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.quant_state.advance_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(loss_value, grad_value, lr, time.perf_counter() - t0)


def advance_clock(loop: LoopState, tokens_per_step: int, dt: float, timed: bool = True) -> None:
    """Count one finished step: step, tokens, time (throughput skips the untimed first steps, and
    any step the caller says is not `timed`, e.g. a profiled one)."""
    loop.step += 1
    loop.tokens += tokens_per_step
    loop.train_time_s += dt
    if timed and loop.step > loop.untimed_steps:
        loop.timed_tokens += tokens_per_step
        loop.timed_time_s += dt
