"""Sweeps: the paper's grid through Hydra's multirun and launchers, idempotent and resumable.

The default grid is the MXFP4 paper's: the ladder fp8 -> fprop -> dgrad -> wgrad with no
stabilizer, plus wgrad with each of sr, rht and h16 (7 cells). It is not a Cartesian product,
so each cell is one option of the `ablation` config group (configs/ablation/), which sets a
ladder rung and a stabilizer; Hydra's basic sweeper then crosses the cells with the seeds and
with whatever else the user sweeps. Giving `+ladder=...` or `+stabilizer=...` replaces the
default grid with their product, as Hydra users expect.

Execution is Hydra's launcher: sequential in-process by default; Hydra's `joblib` launcher with
`sweep.jobs_per_gpu` workers per GPU when that makes more than one (each job locks a free slot
of a GPU, see gpu_slots.py); `submitit_slurm` on a cluster. Each job runs
`run_experiment`, which skips finished runs and resumes interrupted ones (the run directory is
keyed by the experiment config and seed), so re-running a sweep completes only what is missing.
A crashed job is recorded and the sweep goes on; each job writes one ledger file, and the sweep
command reads the ledger at the end to print the outcome and exit non-zero naming failures.

Several GPUs per run
====================
Locally, `sweep.gpus_per_run=K` (K > 1) runs each job's training as a child process,

    <sys.executable> -m torch.distributed.run --standalone --nproc_per_node=K \\
        -m fp4_ablate run <the job's overrides> results_dir=<abs> cache_dir=<abs>

on a group of K consecutive GPUs locked for the run (`gpu_slots.gpu_group`, exclusive against
one-GPU jobs and other groups of any sweep sharing the cache dir), with CUDA_VISIBLE_DEVICES set
to the group; on the CPU the K processes are gloo ranks and nothing is locked (CPU sweeps run
one job at a time). `--standalone` binds the rendezvous to a free port (localhost:0), so groups
side by side never collide. The child inherits the job's stdout; its stderr is passed through
and its tail kept. The job then reads the run's summary.json (rundir's readers) from the run
directory the parent computed, and the ledger records it like an in-process job's; a child that
fails is a `failed` ledger entry with the summary's error or the CLI's message, plus
`stderr_tail`, and the sweep goes on. Before taking GPUs the job skips a finished run and waits
while another process trains the same run (its run lock), as in-process jobs do; one that starts
training it between that check and the child's start makes the child fail `RunLocked` (recorded,
and the next sweep finds it finished). The child holds the group's lock fds too (pass_fds): if
the sweep dies first, its GPUs stay locked until the run ends.

Under a SLURM launcher with several tasks per run (`hydra.launcher.tasks_per_node=K`), every
task runs the job in-process as one rank (distributed.torchrun_env reads the SLURM variables):
the job takes no GPU slot (SLURM gave the task its GPUs) and only rank 0 writes the ledger.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .distributed import torchrun_env
from .gpu_slots import gpu_group, gpu_slot
from .rundir import LOCK, SUMMARY, RunDirError, Summary, atomic_write_json, read_json, run_dir_for
from .runner import one_line, run_experiment

log = logging.getLogger("fp4_experiments.sweep")

DEFAULT_GRID = ("fp8", "fprop", "dgrad", "wgrad", "wgrad_sr", "wgrad_rht", "wgrad_h16", "wgrad_h16_all")
GRID_KEYS = ("ladder", "stabilizer", "ablation")
# torchrun's and torchelastic's per-process variables: a child torchrun must not inherit them.
_DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
             "MASTER_PORT")
STDERR_TAIL_LINES = 40


def ledger_dir(results_dir: str, sweep_id: str) -> Path:
    return Path(results_dir).parent / "sweeps" / sweep_id / "ledger"


class RunProcessFailed(RuntimeError):
    """The torchrun child of a sweep job failed: `line` says why in one line, `stderr_tail` is
    the end of its stderr (both go to the ledger)."""

    def __init__(self, line: str, stderr_tail: str):
        super().__init__(line)
        self.stderr_tail = stderr_tail


def sweep_job(cfg, job_num: int, overrides: List[str]) -> Dict[str, Any]:
    """One job of a sweep: run (or skip, or resume) and record the outcome; never raise."""
    record: Dict[str, Any] = {"job": job_num, "overrides": overrides,
                              "run_dir": str(run_dir_for(cfg))}
    try:
        if int(cfg.sweep.gpus_per_run) > 1:
            summary = _run_on_gpu_group(cfg, overrides)
        else:
            summary = _run_on_free_gpu(cfg, overrides)
        record.update(status=summary["status"], line=one_line(summary))
    except Exception as err:  # recorded, not fatal: the rest of the grid still runs
        record.update(status="failed", line=f"{type(err).__name__}: {err}")
        if isinstance(err, RunProcessFailed):
            record["stderr_tail"] = err.stderr_tail
            log.error("job %d failed: %s", job_num, err)  # its traceback is the child's
        else:
            log.exception("job %d failed", job_num)
    if cfg.sweep.id and _speaks_for_the_job():
        ledger = ledger_dir(cfg.results_dir, cfg.sweep.id)
        atomic_write_json(ledger / f"{job_num:05d}.json", record)
        done = len(list(ledger.glob("*.json")))
        total = cfg.sweep.total or "?"
        print(f"[sweep {done}/{total}] {record['line']}", flush=True)
    return record


def _speaks_for_the_job() -> bool:
    """Rank 0 of a job run by several tasks (SLURM tasks_per_node > 1), or a lone process."""
    env = torchrun_env()
    return env is None or env[0] == 0


def _cuda_gpus(cfg) -> int:
    """GPUs a job may choose among: the visible CUDA devices, 0 for the CPU or a named cuda:N."""
    import torch
    return torch.cuda.device_count() if cfg.hardware.device in ("auto", "cuda") else 0


def _run_on_free_gpu(cfg, overrides: List[str]) -> Dict[str, Any]:
    from omegaconf import open_dict

    n = _cuda_gpus(cfg)
    per_gpu = cfg.sweep.jobs_per_gpu
    # One rank of a multi-task job (SLURM): the launcher gave it its GPU (cuda:LOCAL_RANK), and
    # slot locks in a cache dir shared by several nodes would make their tasks wait on each other.
    if n * per_gpu <= 1 or torchrun_env() is not None:
        # Waits, rather than fails, while another process trains the same run.
        return run_experiment(cfg, overrides, wait=True)
    with gpu_slot(n * per_gpu, Path(cfg.cache_dir) / "gpu-slots", n_gpus=n) as slot:
        with open_dict(cfg):
            # Slot k on GPU k mod n: the first n jobs spread over all GPUs before any doubles up.
            cfg.hardware.device = f"cuda:{slot % n}"  # hardware is not part of the run key
        return run_experiment(cfg, overrides, wait=True)


# -- several GPUs per run: a torchrun child --------------------------------------------------

def _run_on_gpu_group(cfg, overrides: List[str]) -> Dict[str, Any]:
    """The job's run on sweep.gpus_per_run processes (torchrun child); its summary."""
    k = int(cfg.sweep.gpus_per_run)
    if torchrun_env() is not None:  # validation refuses it with a remote launcher; a backstop
        raise RuntimeError(f"sweep.gpus_per_run={k} inside a job that is already one of several "
                           "ranks (SLURM tasks_per_node > 1 or torchrun): it would start "
                           f"{k} processes per rank; leave sweep.gpus_per_run=1 there")
    run_dir = run_dir_for(cfg)
    _wait_while_trained_elsewhere(run_dir)
    finished = None if cfg.sweep.force else finished_summary(run_dir)
    if finished is not None:  # no GPUs taken, no K processes started
        log.info("%s: already finished (%s); skipped. sweep.force=true re-runs it.",
                 run_dir.name, finished["status"])
        return finished
    command = torchrun_command(k, child_overrides(cfg, overrides))
    n = _cuda_gpus(cfg)
    if n == 0:  # the CPU: k gloo ranks
        return run_child(command, run_dir, {}, ())
    with gpu_group(k, n, Path(cfg.cache_dir) / "gpu-slots") as group:
        log.info("%s: GPUs %s (CUDA_VISIBLE_DEVICES=%s)", run_dir.name, group.indices,
                 group.cuda_visible_devices)
        return run_child(command, run_dir, {"CUDA_VISIBLE_DEVICES": group.cuda_visible_devices},
                         group.fds)


def _wait_while_trained_elsewhere(run_dir: Path) -> None:
    """Block while another process holds the run's lock (a lock file exists only where a run
    was started, so a run never started gets no directory from here)."""
    if (run_dir / LOCK).exists():
        from .runlock import run_lock
        with run_lock(run_dir, wait=True):
            pass


def finished_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's summary.json if it is a valid, finished one, else None."""
    data = read_json(Path(run_dir) / SUMMARY)
    if data is None:
        return None
    try:
        return data if Summary.from_dict(data).finished else None
    except RunDirError:
        return None


def torchrun_command(k: int, overrides: Sequence[str]) -> List[str]:
    """`fp4-ablate run` on k local processes, with this interpreter (the same environment)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={k}", "-m", "fp4_ablate", "run", *overrides]


def child_overrides(cfg, overrides: Sequence[str]) -> List[str]:
    """The job's overrides with results_dir and cache_dir pinned to the values this job resolved
    (absolute), so the child finds the run directory computed here even when they interpolate
    (${now:...}) or the child starts elsewhere."""
    pinned = {"results_dir": cfg.results_dir, "cache_dir": cfg.cache_dir}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in pinned]
    return kept + [f"{key}={_hydra_string(os.path.abspath(str(value)))}"
                   for key, value in pinned.items()]


def _hydra_string(value: str) -> str:
    """`value` as a Hydra override value: bare when it is a plain path, else single-quoted."""
    if re.fullmatch(r"[\w./-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(extra)
    return env


def run_child(command: Sequence[str], run_dir: Path, env: Dict[str, str],
              pass_fds: Sequence[int]) -> Dict[str, Any]:
    """Run the torchrun child to its end; the run's finished summary or RunProcessFailed."""
    started = time.time()
    sys.stdout.flush()  # the child writes to the same stdout: keep the lines in order
    proc = subprocess.Popen(list(command), env=_child_env(env), stderr=subprocess.PIPE,
                            text=True, errors="replace", pass_fds=tuple(pass_fds))
    try:
        tail, said = _tee(proc.stderr)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # this job was interrupted: stop the run (torchrun stops its ranks)
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return child_outcome(rc, tail, Path(run_dir), started, said)


def _tee(stream) -> tuple[str, Optional[str]]:
    """Copy `stream` to this process's stderr line by line: (its last lines, the last line the
    CLI itself wrote). `fp4-ablate run` words its refusals "fp4-ablate: ..." / "fp4-ablate run:
    ..." (exit 2, 3); torchrun's failure report after them is longer than the kept tail."""
    last: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
    said = None
    for line in stream:
        sys.stderr.write(line)
        last.append(line)
        if line.startswith("fp4-ablate"):
            said = line.strip()
    sys.stderr.flush()
    return "".join(last), said


def child_outcome(rc: int, stderr_tail: str, run_dir: Path, started: float,
                  said: Optional[str] = None) -> Dict[str, Any]:
    """What a finished child left: the run's summary if it finished, else RunProcessFailed
    naming why in one line (this attempt's failed summary's error, the CLI's own message `said`,
    or the exit code)."""
    summary = finished_summary(run_dir)
    if rc == 0 and summary is not None:
        return summary
    path = run_dir / SUMMARY
    written = read_json(path) if path.exists() and path.stat().st_mtime >= started - 1 else None
    if written and written.get("status") == "failed" and written.get("error"):
        why = written["error"]
    elif rc == 0:
        why = f"exited 0 but left no finished {path}"
    else:
        why = said or "see stderr_tail in the ledger"
    raise RunProcessFailed(f"torchrun exit code {rc}: {why}", stderr_tail)


# -- the ledger ------------------------------------------------------------------------------

def read_ledger(results_dir: str, sweep_id: str) -> List[Dict[str, Any]]:
    out = []
    for path in sorted(ledger_dir(results_dir, sweep_id).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            out.append({"job": path.stem, "status": "failed", "line": f"unreadable ledger {path}"})
    return out


def summarize(records: List[Dict[str, Any]], total: Optional[int]) -> tuple[str, List[Dict]]:
    failed = [r for r in records if r["status"] == "failed"]
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    text = f"sweep finished: {len(records)}/{total or len(records)} jobs ({parts})"
    for r in failed:
        text += f"\n  FAILED job {r['job']} ({' '.join(r['overrides'])}): {r['line']}\n    in {r['run_dir']}"
    return text, failed
