"""Load and validate the run directories a sweep leaves under ``results/runs/``.

The contract is docs/design.md section 2: a finished run has ``summary.json`` (written
atomically at the end), ``metrics.jsonl`` (one JSON object per line, "train" and "eval"
records), and usually ``meta.json`` and ``config.yaml``.

Why so strict: the report averages tokens-to-target over seeds and pairs every run with
an FP8 baseline, so a single half-written or hand-edited run would silently move a mean
that is only a few percent wide.  Every directory is therefore either

* **valid**: a row of the returned DataFrame;
* **incomplete**: no ``summary.json`` yet (still training, or killed before the end), or
* **corrupt / unusable**: unparseable or missing files, missing keys, a truncated
  ``metrics.jsonl`` line, a failed run, a duplicate ...

and the last two are returned as :class:`Issue` ``(run_dir, problem)`` pairs that the
report prints by name, never folded into any statistic.  A truncated last line of
``metrics.jsonl`` on a run that *has* a summary means the file was damaged after the
summary was written (the training loop flushes metrics before the summary), so it counts
as corrupt rather than being skipped.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import pandas as pd
import yaml

DEFAULT_RESULTS_DIR = Path("results") / "runs"
STATUSES = ("reached", "not_reached", "diverged", "completed", "failed")
# Keys the statistics cannot do without; the rest of the summary is optional with defaults.
REQUIRED_SUMMARY_KEYS = (
    "status", "ladder", "stabilizer", "format", "model", "data", "seed",
    "target_ppl", "tokens_to_target", "best_ppl", "mean_tokens_per_s",
)
RUN_FILES = ("summary.json", "metrics.jsonl", "meta.json", "config.yaml")
INCOMPLETE = "incomplete"
CALIBRATION = "calibration run"


class ReportError(Exception):
    """Base of every error the report raises on purpose; the CLI prints these as a message."""


class RunFormatError(ReportError):
    """One run directory breaks the run-directory contract (the message says how)."""


class Issue(NamedTuple):
    """A run directory left out of the report, with the reason (printed by name)."""

    run_dir: str
    problem: str

    @property
    def incomplete(self) -> bool:
        return self.problem.startswith(INCOMPLETE)

    @property
    def calibration(self) -> bool:
        """A run without a target (status completed): input to `fp4-ablate calibrate`, not a fault."""
        return self.problem.startswith(CALIBRATION)

    @property
    def name(self) -> str:
        return Path(self.run_dir).name


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise RunFormatError(f"{path.name}: unreadable ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path.name}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_metrics(path: Path) -> Tuple[List[dict], List[dict]]:
    """Parse metrics.jsonl into (train records, eval records); any bad line is an error.

    Blank lines are tolerated (a trailing newline), unknown "kind"s are ignored so the
    training loop may add record types without breaking old reports.
    """
    train, evals = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise RunFormatError(f"metrics.jsonl: unreadable ({e.strerror or e})") from None
    last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            what = "truncated last line" if i == last else "invalid JSON"
            raise RunFormatError(f"metrics.jsonl line {i + 1}: {what} ({e.msg})") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise RunFormatError(f"metrics.jsonl line {i + 1}: not an object with a 'kind'")
        if rec["kind"] == "eval":
            if not all(_is_number(rec.get(k)) for k in ("tokens", "val_ppl")):
                raise RunFormatError(f"metrics.jsonl line {i + 1}: eval record without numeric tokens/val_ppl")
            evals.append(rec)
        elif rec["kind"] == "train":
            train.append(rec)
    return train, evals


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_summary(s: Any) -> None:
    if not isinstance(s, dict):
        raise RunFormatError("summary.json: not a JSON object")
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in s]
    if missing:
        raise RunFormatError(f"summary.json: missing required keys {', '.join(missing)}")
    if s["status"] not in STATUSES:
        raise RunFormatError(f"summary.json: unknown status {s['status']!r} (expected one of {', '.join(STATUSES)})")
    if s["status"] == "completed" or s["target_ppl"] is None:
        raise RunFormatError(f"{CALIBRATION} (no target_ppl, status {s['status']}): no tokens-to-target "
                             "to report; `fp4-ablate calibrate` reads it")
    if s["status"] == "failed":
        raise RunFormatError(f"failed run: {s.get('error') or 'no error recorded'} (see traceback.txt)")
    if not isinstance(s["seed"], int) or isinstance(s["seed"], bool):
        raise RunFormatError(f"summary.json: seed {s['seed']!r} is not an integer")
    if not _is_number(s["target_ppl"]) or s["target_ppl"] <= 0:
        raise RunFormatError(f"summary.json: target_ppl {s['target_ppl']!r} is not a positive number")
    ttt = s["tokens_to_target"]
    if s["status"] == "reached" and (not _is_number(ttt) or not ttt > 0):
        raise RunFormatError(f"summary.json: status 'reached' but tokens_to_target is {ttt!r}")
    for k in ("mean_tokens_per_s", "best_ppl"):
        v = s[k]
        if v is not None and not _is_number(v):
            raise RunFormatError(f"summary.json: {k} {v!r} is not a number")
    for k in ("gemm_paths", "gemm_flops_per_token"):
        if s.get(k) is not None and not isinstance(s[k], dict):
            raise RunFormatError(f"summary.json: {k} is not an object")


def load_run(run_dir: Path) -> Dict[str, Any]:
    """One valid run as a flat dict (a DataFrame row); raises RunFormatError otherwise."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    metrics_path = run_dir / "metrics.jsonl"
    if not summary_path.exists():
        where = ""
        if metrics_path.exists():
            try:
                _, evals = read_metrics(metrics_path)
                if evals:
                    where = f"; last eval at {evals[-1]['tokens']:,.0f} tokens, ppl {evals[-1]['val_ppl']:.4g}"
            except RunFormatError:
                pass  # a half-written line is normal while the loop is still writing
        raise RunFormatError(f"{INCOMPLETE}: no summary.json yet (still running or killed){where}")
    s = _read_json(summary_path)
    _check_summary(s)
    if not metrics_path.exists():
        raise RunFormatError("metrics.jsonl missing")
    train, evals = read_metrics(metrics_path)

    meta: Dict[str, Any] = {}
    if (run_dir / "meta.json").exists():
        try:
            m = _read_json(run_dir / "meta.json")
            meta = m if isinstance(m, dict) else {}
        except RunFormatError:
            meta = {}  # provenance only: fall back to the summary's copies of the fields
    status = s["status"]
    diverged_at = s.get("diverged_at_tokens")
    if status == "diverged" and diverged_at is None:
        diverged_at = s.get("tokens_seen")
    tps = s["mean_tokens_per_s"]
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir.resolve()),
        "status": status,
        "ladder": str(s["ladder"]),
        "stabilizer": str(s["stabilizer"]),
        "format": str(s["format"]),
        "model": str(s["model"]),
        "data": str(s["data"]),
        "seed": int(s["seed"]),
        "target_ppl": float(s["target_ppl"]),
        "max_tokens": s.get("max_tokens"),
        "tokens_to_target": float(s["tokens_to_target"]) if status == "reached" else math.nan,
        "tokens_seen": s.get("tokens_seen"),
        "best_ppl": float(s["best_ppl"]) if s["best_ppl"] is not None else math.nan,
        "best_ppl_tokens": s.get("best_ppl_tokens"),
        "final_ppl": s.get("final_ppl"),
        "diverged_at_tokens": diverged_at,
        "diverged_reason": s.get("diverged_reason"),
        "mean_tokens_per_s": float(tps) if tps is not None and tps > 0 else math.nan,
        "gpu_shared_by": _gpu_shared_by(s, meta, run_dir),
        "gemm_paths": dict(s.get("gemm_paths") or {}),
        "gemm_flops_per_token": dict(s.get("gemm_flops_per_token") or {}),
        "device_name": s.get("device_name") or meta.get("device_name"),
        "git_commit": s.get("git_commit") or meta.get("git_commit"),
        "git_dirty": meta.get("git_dirty"),
        "hostname": meta.get("hostname"),
        "started_at": meta.get("started_at"),
        "argv": meta.get("argv"),
        "curve": [(float(e["tokens"]), float(e["val_ppl"])) for e in evals],
        "n_train_records": len(train),
    }


def _gpu_shared_by(summary: dict, meta: dict, run_dir: Path) -> int:
    """How many runs shared the run's GPU (1: alone). Runs from before the summary recorded it
    are read from their config: a sweep job on CUDA with sweep.jobs_per_gpu > 1 shared."""
    if summary.get("gpu_shared_by") is not None:
        return int(summary["gpu_shared_by"])
    sweep = (read_config(run_dir) or {}).get("sweep") or {}
    on_cuda = str(meta.get("device", "")).startswith("cuda")
    if on_cuda and sweep.get("id") and int(sweep.get("jobs_per_gpu") or 1) > 1:
        return int(sweep["jobs_per_gpu"])
    return 1


def read_config(run_dir: Path) -> Optional[dict]:
    """The run's resolved Hydra config, or None when absent or unparseable."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


IDENTITY = ("ladder", "stabilizer", "format", "model", "data", "target_ppl", "seed")


def _drop_duplicates(rows: List[dict], issues: List[Issue]) -> List[dict]:
    # Two finished runs of one configuration, target and seed (a re-run after a fix, or a
    # changed hyperparameter that altered the key hash) must not both count as seeds.
    # The newest is kept, by started_at and then by the summary's modification time.
    def newest(r: dict) -> tuple:
        mtime = os.path.getmtime(Path(r["run_dir"]) / "summary.json")
        return (str(r.get("started_at") or ""), mtime, r["run"])

    by_id: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_id.setdefault(tuple(r[k] for k in IDENTITY), []).append(r)
    kept = []
    for group in by_id.values():
        group.sort(key=newest)
        keep = group[-1]
        kept.append(keep)
        for r in group[:-1]:
            issues.append(Issue(r["run_dir"], f"duplicate of {keep['run']} (same configuration, target and "
                                              f"seed {r['seed']}); the newest run is kept"))
    return kept


def load_runs(results_dir=DEFAULT_RESULTS_DIR) -> Tuple[pd.DataFrame, List[Issue]]:
    """Every run directory under ``results_dir``: (DataFrame of valid runs, issues).

    A subdirectory counts as a run directory when it holds any of the run files; others
    (a stray ``wandb/``, hidden folders) are ignored.  Rows are sorted by run name.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results directory {results_dir} does not exist (run `fp4-ablate sweep` first)")
    rows: List[dict] = []
    issues: List[Issue] = []
    for d in sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not any((d / f).exists() for f in RUN_FILES):
            continue
        try:
            rows.append(load_run(d))
        except RunFormatError as e:
            issues.append(Issue(str(d.resolve()), str(e)))
    rows = _drop_duplicates(rows, issues)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("run", kind="stable").reset_index(drop=True)
    issues.sort(key=lambda i: (i.incomplete, i.name))
    return df, issues
