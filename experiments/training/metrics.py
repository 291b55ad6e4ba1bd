"""Where the loop's records go: metrics.jsonl, the tracker callback and the progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..rundir import METRICS, MetricsWriter
from .state import LoopState
from .step import StepResult


class TrainLog:
    """metrics.jsonl (cut back to the resumed step), `on_metrics` and an optional tqdm bar."""

    def __init__(self, run_dir: Path, loop: LoopState, on_metrics: Callable[[dict], None],
                 progress=None, log_every_steps: int = 10, write: bool = True):
        # write=False (ranks other than 0 of a multi-process run): no metrics.jsonl.
        self.metrics = MetricsWriter(Path(run_dir) / METRICS,
                                     truncate_after_step=loop.step if loop.step else None) \
            if write else None
        self.on_metrics, self.progress, self.log_every_steps = on_metrics, progress, log_every_steps
        if progress is not None:
            progress.update(loop.tokens)

    def emit(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        self.on_metrics(record)

    def step(self, loop: LoopState, r: StepResult, tokens_per_step: int,
             target: Optional[float]) -> None:
        """The progress bar after every step (called before the divergence check)."""
        if self.progress is not None:
            self.progress.update(tokens_per_step)
            self.progress.set_postfix_str(f"loss {r.loss:.3f}, " + postfix(loop, target),
                                          refresh=False)

    def train_record(self, loop: LoopState, epoch: float, r: StepResult,
                     tokens_per_step: int) -> None:
        """A train line on step 1 and every `log_every_steps` steps."""
        if loop.step % self.log_every_steps == 0 or loop.step == 1:
            self.emit({"kind": "train", "step": loop.step, "tokens": loop.tokens,
                       "epoch": epoch, "loss": r.loss, "lr": r.lr,
                       "grad_norm": r.grad_norm, "tokens_per_s": tokens_per_step / r.dt,
                       "step_time_s": r.dt})

    def eval_record(self, loop: LoopState, epoch: float, val_loss: float, ppl: float) -> None:
        self.emit({"kind": "eval", "step": loop.step, "tokens": loop.tokens,
                   "epoch": epoch, "val_loss": val_loss, "val_ppl": ppl})

    def eval_progress(self, loop: LoopState, target: Optional[float]) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(postfix(loop, target), refresh=False)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def postfix(loop: LoopState, target: Optional[float]) -> str:
    ppl = f"{loop.last_eval_ppl:.2f}" if loop.last_eval_ppl is not None else "-"
    return f"val ppl {ppl}" + (f" / target {target:.2f}" if target is not None else "")
