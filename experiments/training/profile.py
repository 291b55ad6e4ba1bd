"""`+profile=on`: torch.profiler over a few optimizer steps of the run itself.

Why inside the run: the benchmark (`fp4-ablate bench`) times the runner's TrainStep on synthetic
token ids in a process of its own; `fp4-ablate run` trains the same step on real data inside the
full loop, and on CUDA the two have been measured apart (results/bench/README.md). Only a profile of
the run's own steps says where its time goes, so the loop can take one, torchtitan-style, without a
second loop.

What: steps S .. S + n - 1 (`profile.start_step`, `profile.steps`; S counts optimizer steps from 1
as metrics.jsonl does) run under `torch.profiler.profile` with CPU and, on CUDA, CUDA activities.
When the last of them is done the run directory gets

* `profile.txt`: the profiler's key-averages table, sorted by device time (CPU time on the CPU),
  `profile.row_limit` rows, headed by the steps, their times and the device;
* `profile.json`: the same rows as data ({"steps", "step_times_s", "device", "rows": [{"name",
  "calls", "self_device_ms_per_step", "device_ms_per_step", "self_cpu_ms_per_step",
  "cpu_ms_per_step"}]});
* with `profile.trace=true` also `profile_trace.json.gz`, the Chrome / Perfetto trace.

The profiled steps compute exactly what they would unprofiled (the profiler only records), but run
slower, so the loop leaves them out of the throughput in summary.json (`mean_tokens_per_s`), as it
leaves out the first, untimed steps. A resumed run that restarts past S profiles nothing; one that
stops inside the window writes nothing. Under data parallelism only rank 0 profiles.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from ..rundir import PROFILE_JSON, PROFILE_TABLE, PROFILE_TRACE, atomic_save, atomic_write_json, \
    atomic_write_text


log = logging.getLogger("fp4_experiments.train")


def _ms(us: float, steps: int) -> float:
    return round(us / 1e3 / steps, 4)


def profile_rows(prof, steps: int, device_type: str, row_limit: int) -> List[dict]:
    """The key averages as rows, per optimizer step, most device time (else CPU time) first."""
    cuda = device_type == "cuda"
    rows = []
    for e in prof.key_averages():
        self_dev = getattr(e, "self_device_time_total", 0.0) if cuda else 0.0
        dev = getattr(e, "device_time_total", 0.0) if cuda else 0.0
        rows.append({"name": e.key, "calls": int(e.count),
                     "self_device_ms_per_step": _ms(self_dev, steps),
                     "device_ms_per_step": _ms(dev, steps),
                     "self_cpu_ms_per_step": _ms(e.self_cpu_time_total, steps),
                     "cpu_ms_per_step": _ms(e.cpu_time_total, steps)})
    key = "self_device_ms_per_step" if cuda else "self_cpu_ms_per_step"
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:row_limit]


class StepProfiler:
    """Profiles the optimizer steps start_step .. start_step + steps - 1 of the training loop."""

    def __init__(self, cfg, run_dir: Path, device, first_step: int):
        # cfg None (a rank other than 0): off.
        self.steps = int(cfg.steps) if cfg is not None else 0
        if cfg is not None:
            self.start, self.trace, self.row_limit = int(cfg.start_step), bool(cfg.trace), int(cfg.row_limit)
        self.run_dir, self.device = Path(run_dir), device
        # A resumed run past the window's start does not profile a part of it.
        if self.steps and first_step >= self.start:
            self.steps = 0
        self._prof = None
        self.step_times: List[float] = []

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    @property
    def last(self) -> int:
        return self.start + self.steps - 1

    def covers(self, step: int) -> bool:
        """Is optimizer step `step` (counted from 1) profiled?"""
        return self.enabled and self.start <= step <= self.last

    @contextlib.contextmanager
    def observe(self, loop) -> Iterator[Optional["StepProfiler"]]:
        """Wrap one optimizer step (the one that makes loop.step + 1). Yields this profiler when the
        step is profiled (then `record` its time inside the block), else None."""
        step = loop.step + 1
        if not self.covers(step):
            yield None
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=acts)
            self._prof.__enter__()
        yield self
        if step == self.last and self._prof is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._prof.__exit__(None, None, None)
            self._write(self._prof)
            self._prof = None

    def record(self, dt: float) -> None:
        self.step_times.append(float(dt))

    def _write(self, prof) -> None:
        rows = profile_rows(prof, self.steps, self.device.type, self.row_limit)
        head = {"steps": [self.start, self.last],
                "step_times_s": self.step_times, "device": str(self.device)}
        atomic_write_json(self.run_dir / PROFILE_JSON, {**head, "rows": rows})
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=self.row_limit,
                                          max_name_column_width=70)
        times = ", ".join(f"{t * 1e3:.1f}" for t in self.step_times)
        atomic_write_text(self.run_dir / PROFILE_TABLE,
                          f"# torch.profiler, optimizer steps {self.start}-{self.last}"
                          f" on {self.device}; step times (ms, profiled): {times}; totals below are over"
                          f" all {self.steps} steps\n{table}\n")
        if self.trace:
            self._write_trace(prof)
        log.info("profile of optimizer steps %d-%d: %s", self.start, self.last, self.run_dir / PROFILE_TABLE)

    def _write_trace(self, prof) -> None:
        # The profiler writes its trace to a path only; it is gzipped from there (~10x smaller).
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=self.run_dir, prefix=".profile_trace.")
        os.close(fd)
        try:
            prof.export_chrome_trace(tmp)

            def write(f):
                with open(tmp, "rb") as src, gzip.GzipFile(fileobj=f, mode="wb") as dst:
                    shutil.copyfileobj(src, dst)
            atomic_save(self.run_dir / PROFILE_TRACE, write)
        finally:
            os.remove(tmp)

    def close(self) -> None:
        """Training stopped: a window still open is dropped (its profile would be partial)."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            log.warning("training stopped inside the profiled steps %d-%d: no profile written",
                        self.start, self.last)


def make_profiler(cfg, run_dir: Path, device, first_step: int, is_main: bool) -> StepProfiler:
    return StepProfiler(getattr(cfg, "profile", None) if is_main else None, run_dir, device,
                        first_step)
