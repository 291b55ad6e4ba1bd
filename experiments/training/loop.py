"""The training loop: steps until the token budget, the target or a divergence ends it.

`train()` wires the parts together and nothing else: `setup_training` (optimizer, autocast,
compiled forward, resume), `TrainStep` (one optimizer step), `evaluate` + `record_evaluation`
(validation loss and the target crossing), `DivergenceCheck` (when a run has diverged),
`save_checkpoint`, `TrainLog` (metrics.jsonl, tracker, progress bar). A data-parallel or
compiled variant replaces a part, not the loop.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fp4.linear import NonFiniteError, QuantState
from ..diagnostics.training import TrainingDiagnostics
from .checkpoint import save_checkpoint
from .compile import compile_enabled, dynamo_counts
from .divergence import DivergenceCheck
from .evaluate import evaluate, perplexity, record_evaluation
from .graphed import make_step
from .metrics import TrainLog
from .profile import make_profiler
from .setup import setup_training
from .state import LoopState, Outcome
from .step import TrainStep, advance_clock, lr_at


log = logging.getLogger("fp4_experiments.train")


class Trainer:
    def __init__(self, *, cfg, model, loader, val: torch.Tensor, vocab_size: int,
                 quant_state: QuantState, device, run_dir: Path, resume: bool,
                 on_metrics: Callable[[dict], None], progress=None, dist=None):
        tc = self.tc = cfg.train
        self.dist = dist
        self.model, self.loader, self.val, self.vocab_size = model, loader, val, vocab_size
        self.quant_state, self.device = quant_state, device
        self.setup = setup_training(cfg, model, loader, quant_state, device, run_dir, resume,
                                    dist)
        self.loop: LoopState = self.setup.loop
        self.log = TrainLog(run_dir, self.loop, on_metrics, progress, tc.log_every_steps,
                            write=dist is None or dist.is_main)
        # GEMM diagnostics every diagnostics.every_steps steps (off by default; an observer only).
        self.diagnostics = TrainingDiagnostics(getattr(cfg, "diagnostics", None) if dist is None or dist.is_main
                                               else None, quant_state, run_dir, self.loop.step)
        # torch.profiler over profile.steps steps (off by default; records only).
        self.profiler = make_profiler(cfg, run_dir, device, self.loop.step,
                                      is_main=dist is None or dist.is_main)
        world = dist.world_size if dist is not None else 1
        micro = tc.micro_batch_size or tc.batch_size // world
        plain = TrainStep(model=model, step_model=self.setup.step_model,
                          optimizer=self.setup.optimizer, loader=loader,
                          quant_state=quant_state, autocast=self.setup.autocast,
                          device=device, n_micro=tc.batch_size // (micro * world),
                          grad_clip=tc.grad_clip, dist=dist)
        # On CUDA the step replays as a captured CUDA graph where nothing blocks it (hardware.cuda_graphs).
        self.step, self.cuda_graph = make_step(cfg, plain, model, device, dist)
        self.divergence = DivergenceCheck.from_config(tc, vocab_size)
        self.tokens_per_step = tc.batch_size * cfg.model.seq_len
        # Once the crossing is recorded (and training goes on with stop_at_target=false) it is
        # not looked for again; the crossing is part of the checkpointed loop state.
        self.target = tc.target_ppl if self.loop.tokens_to_target is None else None
        self.compile_backend = (str(cfg.hardware.compile_backend) if compile_enabled(cfg.hardware, device)
                                else None)
        self.first_dts: list = []  # this attempt's first two step times: compilation is in the first
        self.dynamo_before = dynamo_counts()  # the process's counters: this run's are the increase

    def _compile_report(self) -> Optional[dict]:
        """What torch.compile cost this attempt: the first step's time beyond the second's."""
        if self.compile_backend is None:
            return None
        dts = self.first_dts
        compile_s = max(dts[0] - dts[1], 0.0) if len(dts) == 2 else (dts[0] if dts else None)
        now = dynamo_counts()
        report = {"backend": self.compile_backend, "compile_s": compile_s,
                  **{k: now[k] - self.dynamo_before.get(k, 0) for k in now}}
        log.info("torch.compile: %.1f s in the first step, %d graph(s), %d graph break(s)",
                 compile_s or 0.0, report["graphs"], report["graph_breaks"])
        return report

    def run(self) -> Outcome:
        try:
            outcome = self._steps()
        except NonFiniteError as err:
            if self.dist is not None and self.dist.world_size > 1:
                raise  # found on this rank only: the others cannot stop with it (run fails)
            outcome = Outcome("diverged", diverged_at_tokens=self.loop.tokens,
                              diverged_reason=str(err))
        finally:
            self.log.close()
            self.diagnostics.close()
            self.profiler.close()
        if outcome is None:
            outcome = self._budget_spent()
        outcome.compile = self._compile_report()
        outcome.cuda_graph = dict(self.cuda_graph) if self.cuda_graph is not None else None
        loop = self.loop
        log.info("time: steps %.1f s, evaluation %.1f s, diagnostics %.1f s, checkpoints %.1f s",
                 loop.train_time_s, loop.eval_time_s, loop.diagnostics_time_s, loop.checkpoint_time_s)
        if self.tc.keep_final_checkpoint:
            self.save()
        return outcome

    def _steps(self) -> Optional[Outcome]:
        tc, loop = self.tc, self.loop
        next_eval = (loop.tokens // tc.eval_every_tokens + 1) * tc.eval_every_tokens
        self.model.train()
        while loop.tokens < tc.max_tokens:
            # The profiler wraps the diagnostics' timing, so writing a profile is not counted as theirs.
            with self.profiler.observe(loop) as profiling:
                t0 = time.perf_counter()
                with self.diagnostics.observe(loop):
                    r = self.step(lr_at(loop.tokens, tc))
                loop.diagnostics_time_s += max(time.perf_counter() - t0 - r.dt, 0.0)
                if profiling is not None:
                    profiling.record(r.dt)
            if len(self.first_dts) < 2:
                self.first_dts.append(r.dt)
            # A profiled step runs slower than it would unprofiled: out of the throughput.
            advance_clock(loop, self.tokens_per_step, r.dt, timed=profiling is None)
            self.log.step(loop, r, self.tokens_per_step, self.target)
            outcome = self.divergence.after_step(loop, r.loss, r.grad_norm)
            if outcome is not None:
                return outcome
            self.log.train_record(loop, self.loader.epoch, r, self.tokens_per_step)
            if loop.tokens >= next_eval or loop.tokens >= tc.max_tokens:
                next_eval += tc.eval_every_tokens
                t0 = time.perf_counter()
                outcome = self._evaluate()
                loop.eval_time_s += time.perf_counter() - t0
                if outcome is not None and outcome.status == "reached" and not tc.stop_at_target:
                    outcome, self.target = None, None
                if outcome is not None:
                    return outcome
            if loop.step % tc.checkpoint_every_steps == 0:
                self.save()
        return None

    def _evaluate(self) -> Optional[Outcome]:
        """Evaluate, check the validation rules of divergence, look for the target crossing."""
        loop, s = self.loop, self.setup
        if self.dist is None or not self.dist.enabled:
            val_loss = evaluate(s.step_model, self.val, self.tc.eval_batch_size, self.device,
                                s.autocast)
        else:
            # Split over the ranks, the evaluation's calls are counted as one process makes them
            # (one per batch and layer), so the next step's call indices (SR identities) stay
            # those of the one-process run.
            before = self.quant_state.call_counts()
            val_loss = evaluate(s.eval_model, self.val, self.tc.eval_batch_size, self.device,
                                s.autocast, self.dist)
            after = self.quant_state.call_counts()
            self.quant_state.restore_call_counts(before)
            n_batches = -(-self.val.size(0) // self.tc.eval_batch_size)
            self.quant_state.skip_calls({layer: n_batches for layer in after
                                         if after[layer] != before.get(layer, 0)})
        ppl = perplexity(val_loss)
        self.log.eval_record(loop, self.loader.epoch, val_loss, ppl)
        outcome = self.divergence.after_eval(loop, val_loss)
        if outcome is not None:
            return outcome
        crossed = record_evaluation(loop, ppl, self.target, self.vocab_size)
        self.log.eval_progress(loop, self.target)
        if crossed is None:
            return None
        loop.tokens_to_target = crossed
        return Outcome("reached", tokens_to_target=crossed)

    def _budget_spent(self) -> Outcome:
        if self.loop.tokens_to_target is not None:
            return Outcome("reached", tokens_to_target=self.loop.tokens_to_target)
        # Without a target (calibration runs) spending the budget is the plan, not a miss.
        return Outcome("not_reached" if self.tc.target_ppl is not None else "completed")

    def save(self) -> None:
        t0 = time.perf_counter()
        save_checkpoint(self.setup.ckpt_path, self.model, self.setup.optimizer, self.loop,
                        self.loader, self.quant_state, self.device, self.dist)
        # Counted from the next checkpoint on (this one holds the loop state as it was).
        self.loop.checkpoint_time_s += time.perf_counter() - t0


def train(*, cfg, model, loader, val: torch.Tensor, vocab_size: int, quant_state: QuantState,
          device, run_dir: Path, resume: bool, on_metrics: Callable[[dict], None],
          progress=None, dist=None) -> tuple[Outcome, LoopState]:
    """Train `model` to the target (or the budget); the outcome and the final loop state."""
    trainer = Trainer(cfg=cfg, model=model, loader=loader, val=val, vocab_size=vocab_size,
                      quant_state=quant_state, device=device, run_dir=run_dir, resume=resume,
                      on_metrics=on_metrics, progress=progress, dist=dist)
    return trainer.run(), trainer.loop
