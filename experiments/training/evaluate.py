"""Validation loss and the target crossing.

Evaluations are discrete, so the crossing of `train.target_ppl` is interpolated between the
last evaluation above the target (t0, p0) and the first at or below it (t1, p1), linearly in
log-perplexity versus tokens (cross-entropy falls roughly linearly between nearby
evaluations; perplexity, its exponential, does not):

    t* = t0 + (t1 - t0) * (log p0 - log target) / (log p0 - log p1)

Before the first evaluation, (t0, p0) = (0, vocab size): the perplexity of a uniform guess.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..model import causal_lm_loss
from .state import LoopState


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch_size: int, device, autocast, dist=None) -> float:
    """Mean next-token loss over the fixed validation sequences (identical for every run).

    Under ddp / fsdp2 (`dist`) rank r evaluates batches r, r + N, ... and the loss sums are
    all-reduced in float64: each batch's loss is the one-process one, only the summation order
    differs. Every rank runs the same number of forwards (FSDP2 all-gathers are collective): one
    with fewer batches repeats its first one and counts it zero times.
    """
    if dist is not None and dist.enabled:
        return _evaluate_split(model, val, batch_size, device, autocast, dist)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.size(0), batch_size):
        chunk = val[i:i + batch_size].to(device, non_blocking=True)
        with autocast():
            loss = causal_lm_loss(model, chunk[:, :-1], chunk[:, 1:])
        n = chunk[:, 1:].numel()
        total += loss.item() * n
        count += n
    model.train()
    return total / count


def _evaluate_split(model, val: torch.Tensor, batch_size: int, device, autocast, dist) -> float:
    starts = list(range(0, val.size(0), batch_size))
    mine = starts[dist.rank::dist.world_size]
    rounds = -(-len(starts) // dist.world_size)
    model.eval()
    total, count = 0.0, 0
    for k in range(rounds):
        start, weight = (mine[k], 1) if k < len(mine) else (starts[0], 0)
        chunk = val[start:start + batch_size].to(device, non_blocking=True)
        with autocast():
            loss = causal_lm_loss(model, chunk[:, :-1], chunk[:, 1:])
        n = chunk[:, 1:].numel() * weight
        total += loss.item() * n
        count += n
    model.train()
    total, count = dist.all_reduce_sum([total, count], device)
    return total / count


def perplexity(val_loss: float) -> float:
    return math.exp(min(val_loss, 700.0))


def interpolate_crossing(t0: float, p0: float, t1: float, p1: float, target: float) -> float:
    """Tokens at which log-perplexity, linear between (t0, p0) and (t1, p1), equals log target."""
    if not p1 <= target < p0:
        return float(t1)
    frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
    return t0 + (t1 - t0) * frac


def record_evaluation(loop: LoopState, ppl: float, target: Optional[float],
                      vocab_size: int) -> Optional[float]:
    """Enter a (finite) evaluation in `loop`; the interpolated crossing if it reaches `target`."""
    if ppl < loop.best_ppl:
        loop.best_ppl, loop.best_ppl_tokens = ppl, loop.tokens
    prev_t = loop.last_eval_tokens if loop.last_eval_ppl is not None else 0
    prev_p = loop.last_eval_ppl if loop.last_eval_ppl is not None else float(vocab_size)
    loop.last_eval_tokens, loop.last_eval_ppl = loop.tokens, ppl
    loop.evals.append({"tokens": loop.tokens, "ppl": ppl})
    if target is not None and ppl <= target:
        return interpolate_crossing(prev_t, prev_p, loop.tokens, ppl, target)
    return None
