"""What the training loop carries from step to step (checkpointed) and how a run ends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    # Throughput leaves out the first steps (compilation, allocator and autotuning warm-up).
    untimed_steps: int = 10
    timed_tokens: int = 0
    timed_time_s: float = 0.0
    # Where the rest of the wall time goes, over all attempts (summary.json time_s): evaluations,
    # the diagnostics' probes and windows beyond the steps they watch, checkpoint writes.
    eval_time_s: float = 0.0
    diagnostics_time_s: float = 0.0
    checkpoint_time_s: float = 0.0
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
    # torch.compile in this attempt: {backend, compile_s, graphs, graph_breaks}; None when off.
    compile: Optional[Dict[str, Any]] = None
    # The step as a CUDA graph in this attempt (training/graphed.py); None when not considered.
    cuda_graph: Optional[Dict[str, Any]] = None
