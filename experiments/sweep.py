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
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from .gpu_slots import gpu_slot
from .rundir import atomic_write_json, run_dir_for
from .runner import one_line, run_experiment

log = logging.getLogger("fp4_experiments.sweep")

DEFAULT_GRID = ("fp8", "fprop", "dgrad", "wgrad", "wgrad_sr", "wgrad_rht", "wgrad_h16", "wgrad_h16_all")
GRID_KEYS = ("ladder", "stabilizer", "ablation")


def ledger_dir(results_dir: str, sweep_id: str) -> Path:
    return Path(results_dir).parent / "sweeps" / sweep_id / "ledger"


def sweep_job(cfg, job_num: int, overrides: List[str]) -> Dict[str, Any]:
    """One job of a sweep: run (or skip, or resume) and record the outcome; never raise."""
    record: Dict[str, Any] = {"job": job_num, "overrides": overrides,
                              "run_dir": str(run_dir_for(cfg))}
    try:
        summary = _run_on_free_gpu(cfg, overrides)
        record.update(status=summary["status"], line=one_line(summary))
    except Exception as err:  # recorded, not fatal: the rest of the grid still runs
        record.update(status="failed", line=f"{type(err).__name__}: {err}")
        log.exception("job %d failed", job_num)
    if cfg.sweep.id:
        ledger = ledger_dir(cfg.results_dir, cfg.sweep.id)
        atomic_write_json(ledger / f"{job_num:05d}.json", record)
        done = len(list(ledger.glob("*.json")))
        total = cfg.sweep.total or "?"
        print(f"[sweep {done}/{total}] {record['line']}", flush=True)
    return record


def _run_on_free_gpu(cfg, overrides: List[str]) -> Dict[str, Any]:
    import torch
    from omegaconf import open_dict

    n = torch.cuda.device_count() if cfg.hardware.device in ("auto", "cuda") else 0
    per_gpu = cfg.sweep.jobs_per_gpu
    if n * per_gpu <= 1:
        # Waits, rather than fails, while another process trains the same run.
        return run_experiment(cfg, overrides, wait=True)
    with gpu_slot(n * per_gpu, Path(cfg.cache_dir) / "gpu-slots") as slot:
        with open_dict(cfg):
            # Slot k on GPU k mod n: the first n jobs spread over all GPUs before any doubles up.
            cfg.hardware.device = f"cuda:{slot % n}"  # hardware is not part of the run key
        return run_experiment(cfg, overrides, wait=True)


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
