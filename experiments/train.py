"""The training loop: tokens to a validation-perplexity target, resumable and exact.

What is measured is *tokens to target*: the number of training tokens after which the
validation perplexity first falls to `train.target_ppl`. Evaluations are discrete, so the
crossing is interpolated between the last evaluation above the target (t0, p0) and the first
at or below it (t1, p1), linearly in log-perplexity versus tokens (cross-entropy falls roughly
linearly between nearby evaluations; perplexity, its exponential, does not):

    t* = t0 + (t1 - t0) * (log p0 - log target) / (log p0 - log p1)

Before the first evaluation, (t0, p0) = (0, vocab size): the perplexity of a uniform guess.

The learning-rate schedule (linear warmup, then cosine to `min_lr_ratio * lr` at
`max_tokens`) depends only on tokens seen and `max_tokens`, never on the target, so every rung
of the ladder follows the same schedule and stopping early changes nothing before the stop.

Statuses: `reached`; `not_reached` (max_tokens spent); `diverged` (a non-finite loss or
gradient, or the smoothed loss rising past `diverge_loss_ratio` times its best); `completed`
(no target was set: a calibration run). All are results, not errors. Resume: a checkpoint holds model, optimizer, step, data position, every
RNG state and the quantization state; on the CPU a resumed run's metrics equal an
uninterrupted run's exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from fp4.linear import NonFiniteError, QuantState
from .model import causal_lm_loss
from .rundir import CHECKPOINT, MetricsWriter

log = logging.getLogger("fp4_experiments.train")


def lr_at(tokens: float, train_cfg) -> float:
    peak, floor = train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio
    if tokens < train_cfg.warmup_tokens:
        return peak * (tokens + 1) / max(train_cfg.warmup_tokens, 1)
    span = max(train_cfg.max_tokens - train_cfg.warmup_tokens, 1)
    progress = min((tokens - train_cfg.warmup_tokens) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def interpolate_crossing(t0: float, p0: float, t1: float, p1: float, target: float) -> float:
    """Tokens at which log-perplexity, linear between (t0, p0) and (t1, p1), equals log target."""
    if not p1 <= target < p0:
        return float(t1)
    frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
    return t0 + (t1 - t0) * frac


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch_size: int, device, autocast) -> float:
    """Mean next-token loss over the fixed validation sequences (identical for every run)."""
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


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    # Throughput leaves out the first steps (compilation, allocator and autotuning warm-up).
    untimed_steps: int = 10
    timed_tokens: int = 0
    timed_time_s: float = 0.0
    loss_ema: Optional[float] = None
    best_loss_ema: float = float("inf")
    last_eval_tokens: int = 0
    last_eval_ppl: Optional[float] = None
    best_ppl: float = float("inf")
    best_ppl_tokens: int = 0
    tokens_to_target: Optional[float] = None
    evals: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class Outcome:
    status: str
    tokens_to_target: Optional[float] = None
    diverged_at_tokens: Optional[int] = None
    diverged_reason: Optional[str] = None


def _rng_state(device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device) -> None:
    # The checkpoint is loaded with map_location=device, which moves these ByteTensors to the
    # GPU too; the generators take their state as CPU tensors only.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_checkpoint(path: Path, model, optimizer, loop: LoopState, loader,
                    quant_state: QuantState, device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "loop": loop.__dict__, "loader": loader.state_dict(),
        "quant_state": quant_state.state_dict(), "rng": _rng_state(device),
    }, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path, model, optimizer, loader, quant_state: QuantState,
                    device) -> LoopState:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    quant_state.load_state_dict(ckpt["quant_state"])
    _set_rng_state(ckpt["rng"], device)
    return LoopState(**ckpt["loop"])


def make_optimizer(model, train_cfg, device) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D parameters), as in Llama's recipe.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps, fused=fused)


def train(*, cfg, model, loader, val: torch.Tensor, vocab_size: int, quant_state: QuantState,
          device, run_dir: Path, resume: bool, on_metrics: Callable[[dict], None],
          progress=None) -> tuple[Outcome, LoopState]:
    tc = cfg.train
    optimizer = make_optimizer(model, tc, device)
    if device.type == "cuda":
        dtype = getattr(torch, cfg.hardware.autocast_dtype)
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    step_model = torch.compile(model) if cfg.hardware.compile else model

    ckpt_path = run_dir / CHECKPOINT
    loop = LoopState()
    if resume and ckpt_path.exists():
        loop = load_checkpoint(ckpt_path, model, optimizer, loader, quant_state, device)
        log.info("resumed from %s at step %d (%d tokens)", ckpt_path, loop.step, loop.tokens)
    metrics = MetricsWriter(run_dir / "metrics.jsonl",
                            truncate_after_step=loop.step if loop.step else None)
    tokens_per_step = tc.batch_size * cfg.model.seq_len
    micro = tc.micro_batch_size or tc.batch_size
    n_micro = tc.batch_size // micro
    quant_state.check_finite = bool(tc.check_finite)
    # Once the crossing is recorded (and training goes on with stop_at_target=false) it is not
    # looked for again; the crossing is part of the checkpointed loop state.
    target = tc.target_ppl if loop.tokens_to_target is None else None
    outcome: Optional[Outcome] = None
    if progress is not None:
        progress.update(loop.tokens)

    def emit(record: dict) -> None:
        metrics.write(record)
        on_metrics(record)

    def run_eval() -> Optional[Outcome]:
        val_loss = evaluate(step_model, val, tc.eval_batch_size, device, autocast)
        ppl = math.exp(min(val_loss, 700.0))
        emit({"kind": "eval", "step": loop.step, "tokens": loop.tokens,
              "epoch": loader.epoch, "val_loss": val_loss, "val_ppl": ppl})
        if not math.isfinite(val_loss):
            return Outcome("diverged", diverged_at_tokens=loop.tokens,
                           diverged_reason="non-finite validation loss")
        if ppl < loop.best_ppl:
            loop.best_ppl, loop.best_ppl_tokens = ppl, loop.tokens
        prev_t = loop.last_eval_tokens if loop.last_eval_ppl is not None else 0
        prev_p = loop.last_eval_ppl if loop.last_eval_ppl is not None else float(vocab_size)
        loop.last_eval_tokens, loop.last_eval_ppl = loop.tokens, ppl
        loop.evals.append({"tokens": loop.tokens, "ppl": ppl})
        if progress is not None:
            progress.set_postfix_str(_postfix(loop, target), refresh=False)
        if target is not None and ppl <= target:
            loop.tokens_to_target = interpolate_crossing(prev_t, prev_p, loop.tokens, ppl, target)
            return Outcome("reached", tokens_to_target=loop.tokens_to_target)
        return None

    next_eval = (loop.tokens // tc.eval_every_tokens + 1) * tc.eval_every_tokens
    model.train()
    try:
        while loop.tokens < tc.max_tokens:
            lr = lr_at(loop.tokens, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = 0.0
            for _ in range(n_micro):
                input_ids, labels = loader.next_batch()
                input_ids = input_ids.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast():
                    loss = causal_lm_loss(step_model, input_ids, labels) / n_micro
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            loss_value, grad_value = float(loss_sum), float(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            quant_state.advance_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            loop.step += 1
            loop.tokens += tokens_per_step
            loop.train_time_s += dt
            if loop.step > loop.untimed_steps:
                loop.timed_tokens += tokens_per_step
                loop.timed_time_s += dt
            if progress is not None:
                progress.update(tokens_per_step)
                progress.set_postfix_str(f"loss {loss_value:.3f}, " + _postfix(loop, target),
                                         refresh=False)

            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                outcome = Outcome("diverged", diverged_at_tokens=loop.tokens,
                                  diverged_reason=f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {loop.step}")
                break
            a = tc.diverge_ema
            loop.loss_ema = loss_value if loop.loss_ema is None else a * loop.loss_ema + (1 - a) * loss_value
            if loop.tokens > tc.warmup_tokens:
                loop.best_loss_ema = min(loop.best_loss_ema, loop.loss_ema)
                if loop.loss_ema > tc.diverge_loss_ratio * loop.best_loss_ema:
                    outcome = Outcome("diverged", diverged_at_tokens=loop.tokens,
                                      diverged_reason=f"smoothed train loss {loop.loss_ema:.3f} > "
                                      f"{tc.diverge_loss_ratio} x best {loop.best_loss_ema:.3f}")
                    break
            if loop.step % tc.log_every_steps == 0 or loop.step == 1:
                emit({"kind": "train", "step": loop.step, "tokens": loop.tokens,
                      "epoch": loader.epoch, "loss": loss_value, "lr": lr,
                      "grad_norm": grad_value, "tokens_per_s": tokens_per_step / dt,
                      "step_time_s": dt})
            if loop.tokens >= next_eval or loop.tokens >= tc.max_tokens:
                next_eval += tc.eval_every_tokens
                outcome = run_eval()
                if outcome is not None and outcome.status == "reached" and not tc.stop_at_target:
                    outcome, target = None, None
                if outcome is not None:
                    break
            if loop.step % tc.checkpoint_every_steps == 0:
                save_checkpoint(ckpt_path, model, optimizer, loop, loader, quant_state, device)
    except NonFiniteError as err:
        outcome = Outcome("diverged", diverged_at_tokens=loop.tokens, diverged_reason=str(err))
    finally:
        metrics.close()
    if outcome is None and loop.tokens_to_target is not None:
        outcome = Outcome("reached", tokens_to_target=loop.tokens_to_target)
    elif outcome is None:
        # Without a target (calibration runs) spending the budget is the plan, not a miss.
        outcome = Outcome("not_reached" if tc.target_ppl is not None else "completed")
    save_checkpoint(ckpt_path, model, optimizer, loop, loader, quant_state, device)
    return outcome, loop


def _postfix(loop: LoopState, target: Optional[float]) -> str:
    ppl = f"{loop.last_eval_ppl:.2f}" if loop.last_eval_ppl is not None else "-"
    return f"val ppl {ppl}" + (f" / target {target:.2f}" if target is not None else "")
