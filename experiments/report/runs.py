"""Load the run directories a sweep leaves under ``results/runs/`` and sort them into experiments.

Reading and checking each directory is the run-directory contract's job
(:func:`fp4_experiments.rundir.load_run`, docs/design.md section 2); this module decides what
the *report* can use.  Why so strict: the report averages tokens-to-target over seeds and pairs
every run with an FP8 baseline, so a single half-written, hand-edited or foreign run would
silently move a mean that is only a few percent wide.  Every directory is therefore either

* **valid**: a row of the returned DataFrame;
* **incomplete**: no ``summary.json`` yet (still training, or killed before the end), or
* **corrupt / unusable**: unparseable or missing files, missing keys, a truncated
  ``metrics.jsonl`` line, a summary whose step count the metrics contradict, a failed run,
  a duplicate ...

and the last two are returned as :class:`Issue` ``(run_dir, problem)`` pairs that the
report prints by name, never folded into any statistic.

**Experiment groups.**  Runs are only ever compared within one experiment: the run's
experiment config (config.yaml minus ``fp4_configs.schema.NON_EXPERIMENT_KEYS``) minus what the
table varies -- the whole ``ladder``, ``stabilizer`` and ``format`` subtrees and ``seed`` (dropping
whole subtrees means a key that is a function of the rung or stabilizer, such as ladder.fp4_gemms,
never splits a group, whether or not a run's config still has it) -- plus the summary's model,
data label and target.  Of the ``format`` subtree, ``format.fp8_forward`` and
``format.fp8_backward`` stay in the group key: they are the FP8 GEMMs' own formats, so they change
the FP8 baseline's numerics, and an FP8 run is the baseline only of runs with its FP8 formats.
The rest of the node (name, scale_mode, nvfp4_2d_weights, ufp4_element) acts only on FP4 GEMMs
(fp4/recipe.py: the FP4 element, block scales and the ufp4 formats' built-in SR and Hadamard are
built per FP4 GEMM; an FP8 GEMM reads fp8_forward / fp8_backward alone; bf16 quantizes nothing),
so ``format`` is *varied*, like the rung: nvfp4 wgrad and mxfp4 wgrad are two rows of one table
against one FP8 baseline.  A configuration is (ladder, stabilizer, format), where a rung without
an FP4 GEMM (:data:`NO_FP4_LADDERS`: fp8, bf16) has no format -- :func:`config_format` is "" for
it, whatever format.name says (tests/experiments/test_report_formats.py trains the FP8 and BF16
rungs in every format and compares the metrics).  Each group is named by a short hash of that dict
and, when a results directory holds several, by the keys in which the groups differ (e.g.
``3f2a9c1d: train.lr=0.01``); the report makes a table, contrasts and plots per group.  Two valid
runs of one group, configuration and seed are duplicates: with the same run key it is the same
experiment twice, otherwise their varied subtrees differ in something the table does not show
(an FP8 run of format=nvfp4 next to one of format=mxfp4: "config differs in format.name"); either
way the newest is kept and the other named.

**Post-hoc target**: :mod:`.posthoc` gives fixed-budget runs a tokens-to-target afterwards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

import pandas as pd

from fp4.names import FP4_GEMMS

from ..rundir import (INCOMPLETE, IncompleteRunError, RunDirError, RunRecord, Status, experiment_dict,
                      load_run as load_run_record, read_config, read_json, run_dirs)

DEFAULT_RESULTS_DIR = Path("results") / "runs"
CALIBRATION = "calibration run"
# What the table varies within an experiment group (dropped from the group key, whole subtrees) ...
VARIED_KEYS = ("ladder", "stabilizer", "format", "seed")
# ... except these keys of the format node: the FP8 GEMMs' formats (module doc).
FORMAT_GROUP_KEYS = ("fp8_forward", "fp8_backward")
# Rungs with no FP4 GEMM: their configuration has no format (config_format "").
NO_FP4_LADDERS = tuple(str(ladder.value) for ladder, gemms in FP4_GEMMS.items() if not gemms)
MAX_LABEL_KEYS = 4


def config_format(ladder: str, fmt: str) -> str:
    """The format as part of a configuration's identity: "" for a rung without an FP4 GEMM."""
    return "" if ladder in NO_FP4_LADDERS else fmt


def trained_without_target(status, target_ppl) -> bool:
    """A fixed-budget run: status completed, or no target (None, or NaN in a runs table's row)."""
    no_target = target_ppl is None or (isinstance(target_ppl, float) and math.isnan(target_ppl))
    return Status(status) == Status.completed or no_target


def formats_of(recs) -> str:
    """A table row's ``format`` column: its runs' format.name, ";"-joined when an FP8 or BF16 row's
    seeds were started with different ones."""
    return ";".join(sorted({r["format"] for r in recs}))


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


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def group_dict(rec: RunRecord) -> Dict[str, Any]:
    """The experiment a run belongs to, as a flat {dotted key: value} dict (see the module doc)."""
    exp = experiment_dict(rec.config) if rec.config else {}
    fmt = exp.get("format")
    for k in VARIED_KEYS:
        exp.pop(k, None)
    kept = {k: fmt[k] for k in FORMAT_GROUP_KEYS if k in fmt} if isinstance(fmt, dict) else {}
    if kept:
        exp["format"] = kept
    flat = _flatten(exp)
    s = rec.summary
    # The summary's identity always counts (a config.yaml may be absent from a hand-made directory).
    flat.update({"model.name": s.model, "data.label": s.data, "train.target_ppl": s.target_ppl})
    return flat


def group_hash(flat: Dict[str, Any]) -> str:
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _value(v: Any) -> str:
    return "(absent)" if v is _ABSENT else (json.dumps(v) if isinstance(v, (list, dict)) else f"{v}")


_ABSENT = object()


def group_labels(dicts: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """{group hash: label}; "" for everything when there is one group (nothing to tell apart)."""
    if len(dicts) <= 1:
        return {h: "" for h in dicts}
    keys = sorted({k for d in dicts.values() for k in d})
    differing = [k for k in keys if len({json.dumps(d.get(k, "\0absent"), sort_keys=True, default=str)
                                         for d in dicts.values()}) > 1]
    out = {}
    for h, d in dicts.items():
        parts = [f"{k}={_value(d.get(k, _ABSENT))}" for k in differing[:MAX_LABEL_KEYS]]
        more = len(differing) - MAX_LABEL_KEYS
        out[h] = f"{h}: " + ", ".join(parts) + (f", +{more} more" if more > 0 else "")
    return out


def _row(rec: RunRecord, include_completed: bool = False) -> Dict[str, Any]:
    """One valid run as a flat dict (a DataFrame row); raises RunFormatError for runs the report
    cannot use (failed runs; calibration runs unless ``include_completed``: the equivalent-token
    estimator reads those, with target_ppl NaN)."""
    s, run_dir = rec.summary, rec.run_dir
    fixed_budget = trained_without_target(s.status, s.target_ppl)
    if fixed_budget and not include_completed:
        raise RunFormatError(f"{CALIBRATION} (no target_ppl, status {s.status}): no tokens-to-target "
                             "to report; `fp4-ablate calibrate` reads it")
    if s.status == Status.failed:
        raise RunFormatError(f"failed run: {s.error or 'no error recorded'} (see traceback.txt)")
    meta = rec.meta
    diverged_at = s.diverged_at_tokens
    if s.status == Status.diverged and diverged_at is None:
        diverged_at = s.tokens_seen
    tps = s.mean_tokens_per_s
    flat = group_dict(rec)
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir.resolve()),
        "run_key": s.run_key or (meta.run_key if meta else None),
        "status": s.status.value,
        "ladder": s.ladder,
        "stabilizer": s.stabilizer,
        "format": s.format,
        "config_format": config_format(s.ladder, s.format),
        "model": s.model,
        "data": s.data,
        "seed": int(s.seed),
        "target_ppl": math.nan if s.target_ppl is None else float(s.target_ppl),
        "target_posthoc": False,
        "max_tokens": s.max_tokens,
        "tokens_to_target": float(s.tokens_to_target) if s.status == Status.reached else math.nan,
        "tokens_seen": s.tokens_seen,
        "best_ppl": float(s.best_ppl) if s.best_ppl is not None else math.nan,
        "best_ppl_tokens": s.best_ppl_tokens,
        "final_ppl": s.final_ppl,
        "diverged_at_tokens": diverged_at,
        "diverged_reason": s.diverged_reason,
        "mean_tokens_per_s": float(tps) if tps is not None and tps > 0 else math.nan,
        "gpu_shared_by": _gpu_shared_by(rec),
        "gemm_paths": dict(s.gemm_paths or {}),
        "gemm_flops_per_token": dict(s.gemm_flops_per_token or {}),
        "device_name": s.device_name or (meta.device_name if meta else None),
        "git_commit": s.git_commit or (meta.git_commit if meta else None),
        "git_dirty": meta.git_dirty if meta else None,
        "hostname": meta.hostname if meta else None,
        "started_at": meta.started_at if meta else None,
        "argv": meta.argv if meta else None,
        "schema_version": s.schema_version,
        "curve": [(float(e["tokens"]), float(e["val_ppl"])) for e in rec.metrics.evals],
        # (tokens, val_loss) of every evaluation, for the equivalent-token estimator (.estimator).
        "loss_curve": [(float(e["tokens"]), float(e["val_loss"]) if isinstance(e.get("val_loss"), (int, float))
                        else math.nan) for e in rec.metrics.evals],
        "n_train_records": len(rec.metrics.train),
        "group_id": group_hash(flat),
        "group_dict": flat,
    }


DATA_KEY = "data.trained_on"  # added to a group's key only where its runs read different data


def data_identity(run_dir) -> str:
    """What a run actually read, from its data.json: token counts and the tokenizer's fingerprint.
    Two runs of one config (say `data.path=dir/*.json.gz`) that found different files differ here."""
    d = read_json(Path(run_dir) / "data.json") or {}
    tok = d.get("tokenizer") or {}
    if not d:
        return "(no data.json)"
    return (f"{d.get('n_train_tokens')} train / {d.get('n_val_tokens')} validation tokens, tokenizer "
            f"{tok.get('name')} {tok.get('fingerprint')}")


def _split_by_data(rows: List[dict]) -> List[dict]:
    """Runs of one experiment group that trained on different data are different experiments: such
    a group's runs get DATA_KEY in their group key, so no table, contrast or baseline pools them
    (and the group labels name the difference). Groups whose runs all read the same data keep
    their key and hash unchanged."""
    by_group: Dict[str, List[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], []).append(r)
    for members in by_group.values():
        ids = [data_identity(r["run_dir"]) for r in members]
        if len(set(ids)) < 2:
            continue
        for r, data in zip(members, ids):
            r["group_dict"] = {**r["group_dict"], DATA_KEY: data}
            r["group_id"] = group_hash(r["group_dict"])
    return rows


def load_run(run_dir: Path, include_completed: bool = False) -> Dict[str, Any]:
    """One valid run as a flat dict (a DataFrame row); raises RunFormatError otherwise."""
    try:
        rec = load_run_record(run_dir)
    except RunDirError as e:
        raise RunFormatError(str(e)) from None
    return _row(rec, include_completed)


def _gpu_shared_by(rec: RunRecord) -> int:
    """How many runs shared the run's GPU (1: alone). Runs from before the summary recorded it
    are read from their config: a sweep job on CUDA with sweep.jobs_per_gpu > 1 shared."""
    if rec.summary.gpu_shared_by is not None:
        return int(rec.summary.gpu_shared_by)
    sweep = (rec.config or {}).get("sweep") or {}
    on_cuda = str(rec.meta.device if rec.meta else "").startswith("cuda")
    if on_cuda and sweep.get("id") and int(sweep.get("jobs_per_gpu") or 1) > 1:
        return int(sweep["jobs_per_gpu"])
    return 1


CELL = ("group_id", "ladder", "stabilizer", "config_format", "seed")


def _drop_duplicates(rows: List[dict], issues: List[Issue]) -> List[dict]:
    # Two finished runs of one experiment group, configuration and seed must not both count as
    # seeds. The newest is kept, by started_at and then by the summary's modification time.
    def newest(r: dict) -> tuple:
        mtime = os.path.getmtime(Path(r["run_dir"]) / "summary.json")
        return (str(r.get("started_at") or ""), mtime, r["run"])

    by_cell: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_cell.setdefault(tuple(r[k] for k in CELL), []).append(r)
    kept = []
    for cell in by_cell.values():
        cell.sort(key=newest)
        keep = cell[-1]
        kept.append(keep)
        for r in cell[:-1]:
            if r["run_key"] and r["run_key"] == keep["run_key"]:
                why = (f"duplicate of {keep['run']} (same run key {r['run_key']}: the same experiment twice, "
                       f"seed {r['seed']}); the newest run is kept")
            else:
                other = _differing_config(r, keep)
                why = (f"duplicate of {keep['run']} (same configuration, experiment group and seed {r['seed']}, "
                       f"but another run key{': config differs in ' + other if other else ''}); "
                       "the newest run is kept")
            issues.append(Issue(r["run_dir"], why))
    return kept


def _differing_config(a: dict, b: dict) -> str:
    ca, cb = (_flatten(experiment_dict(read_config(r["run_dir"]) or {})) for r in (a, b))
    keys = sorted(k for k in set(ca) | set(cb) if ca.get(k, _ABSENT) != cb.get(k, _ABSENT))
    return ", ".join(keys[:6]) + (f", +{len(keys) - 6} more" if len(keys) > 6 else "")


class ResultsDirs(tuple):
    """One or more directories of run directories read as one set of results (a report across two
    ladders, say: each experiment group is still its own table). Formats like a path for the report's
    text: the directories joined by ", "."""

    def __new__(cls, dirs=DEFAULT_RESULTS_DIR):
        items = (dirs,) if isinstance(dirs, (str, os.PathLike)) else tuple(dirs)
        if not items:
            raise ReportError("no results directory given")
        return super().__new__(cls, tuple(Path(d) for d in items))

    def __str__(self) -> str:
        return ", ".join(str(d) for d in self)

    def resolve(self) -> "ResultsDirs":
        return ResultsDirs(d.resolve() for d in self)

    def require(self) -> None:
        """ReportError naming every directory that is not there."""
        missing = [str(d) for d in self if not d.is_dir()]
        if missing:
            raise ReportError(f"no such directory: {', '.join(missing)}")


def load_runs(results_dir=DEFAULT_RESULTS_DIR, include_completed: bool = False) -> Tuple[pd.DataFrame, List[Issue]]:
    """Every run directory under ``results_dir`` (a directory or several, :class:`ResultsDirs`):
    (DataFrame of valid runs, issues).

    A subdirectory counts as a run directory when it holds any of the run files; others
    (a stray ``wandb/``, hidden folders) are ignored.  Rows are sorted by run name and carry
    ``group`` (the experiment group's label, "" when there is only one) and ``group_id``.
    ``include_completed``: fixed-budget runs without a target (status completed, calibration
    runs) become rows too (target_ppl and tokens_to_target NaN) instead of issues; the
    equivalent-token estimator uses them, the tokens-to-target table only once
    :func:`apply_posthoc_target` gave them a target.
    """
    results_dirs = ResultsDirs(results_dir)
    results_dirs.require()
    rows: List[dict] = []
    issues: List[Issue] = []
    for d in (d for root in results_dirs for d in run_dirs(root)):
        try:
            rows.append(load_run(d, include_completed))
        except RunFormatError as e:
            issues.append(Issue(str(d.resolve()), str(e)))
    rows = _drop_duplicates(_split_by_data(rows), issues)
    labels = group_labels({r["group_id"]: r["group_dict"] for r in rows})
    for r in rows:
        r["group"] = labels[r["group_id"]]
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("run", kind="stable").reset_index(drop=True)
    issues.sort(key=lambda i: (i.incomplete, i.name))
    return df, issues


def group_warnings(runs: pd.DataFrame) -> List[str]:
    """One warning when the runs belong to several experiment groups (they are never compared)."""
    if runs.empty or runs["group_id"].nunique() <= 1:
        return []
    parts = [f"{label} ({n} runs)" for label, n in runs.groupby("group", sort=True).size().items()]
    return [f"the runs belong to {len(parts)} experiment groups, each reported on its own and never compared "
            "with another (a group: the experiment config minus ladder, stabilizer, format and seed): " + "; ".join(parts)]
