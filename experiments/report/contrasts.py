"""Paired contrasts between neighbouring configurations: what one rung adds, what a stabilizer changes.

The main table compares every configuration with FP8. The paper's questions are about
neighbours as well: does moving Dgrad to FP4 cost anything on top of Fprop, Wgrad on top of
Dgrad, and does a stabilizer make full-FP4 cheaper or dearer than no stabilizer?  Two rows of
the main table cannot answer that by subtraction -- their intervals share the FP8 baseline's
noise and would overlap even for a real difference -- so each contrast is paired by seed::

    d_s = tokens_to_target(a, s) / tokens_to_target(b, s) - 1

over the seeds where both a and b reached the target (same model, data, target, seed), with the
mean and 95% Student-t interval over seeds, and the seeds its observed spread would need for a
+-2% interval (:func:`.stats.seeds_needed`).  The contrasts are the ladder's steps (fprop vs fp8,
dgrad vs fprop, wgrad vs dgrad) and every stabilized wgrad row vs plain wgrad, per FP4 format.
A seed where either side missed the target is listed by name, never silently dropped.  The FP8
side of the first step is each run's own baseline from the cost table; with several runs of
another configuration and seed (e.g. a re-run under a new key) the first by directory name is used.
"""
from __future__ import annotations

import io
from typing import Dict, List, Tuple

import pandas as pd
from tabulate import tabulate

import numpy as np

from .stats import GROUP_KEYS, LADDER_ORDER, STABILIZED_ORDER, config_label, mean_ci, seeds_needed

# (a, b) as (ladder, stabilizer): a is measured against b -- each rung from fp8 up against the one below.
_RUNGS = tuple(r for r in LADDER_ORDER if r != "bf16")
LADDER_STEPS = tuple(((a, "none"), (b, "none")) for b, a in zip(_RUNGS, _RUNGS[1:]))
STABILIZERS = STABILIZED_ORDER
CSV_COLUMNS = ("model", "data", "target_ppl", "group", "format", "contrast", "kind", "n", "mean", "lo", "hi",
               "seeds_for_2pct", "per_seed", "missed")


def _by_seed(runs: pd.DataFrame, ladder: str, stabilizer: str, fmt: str) -> Dict[int, dict]:
    sub = runs[(runs.ladder == ladder) & (runs.stabilizer == stabilizer) & (runs.format == fmt)]
    out: Dict[int, dict] = {}
    for r in sorted(sub.to_dict("records"), key=lambda r: r["run"]):
        out.setdefault(int(r["seed"]), r)
    return out


def _contrast(a: Dict[int, dict], b: Dict[int, dict]) -> Tuple[Dict[int, float], List[str]]:
    per_seed, missed = {}, []
    for seed in sorted(set(a) & set(b)):
        ra, rb = a[seed], b[seed]
        if ra["status"] == "reached" and rb["status"] == "reached":
            per_seed[seed] = ra["tokens_to_target"] / rb["tokens_to_target"] - 1.0
        else:
            who = [f"{config_label(r['ladder'], r['stabilizer'], r['format'])} {r['status']}"
                   for r in (ra, rb) if r["status"] != "reached"]
            missed.append(f"seed {seed}: " + ", ".join(who))
    return per_seed, missed


def contrasts(runs: pd.DataFrame, baselines: Dict[str, str]) -> pd.DataFrame:
    """One row per (comparison group, FP4 format, contrast) that has runs on both sides.

    ``baselines`` (run_dir -> its FP8 run_dir, from :func:`.stats.summarize`) pairs the first
    ladder step with the very FP8 run the cost table uses.
    """
    by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    rows = []
    for key, group in runs.groupby(list(GROUP_KEYS), sort=True):
        fp4 = group[~group.ladder.isin(("fp8", "bf16"))]
        for fmt in sorted(fp4.format.unique()):
            pairs = [(a, b, "ladder step") for a, b in LADDER_STEPS]
            pairs += [(("wgrad", s), ("wgrad", "none"), "stabilizer") for s in STABILIZERS]
            for (la, sa), (lb, sb), kind in pairs:
                side_a = _by_seed(group, la, sa, fmt)
                side_b = ({seed: by_dir[baselines[r["run_dir"]]] for seed, r in side_a.items()}
                          if lb == "fp8" else _by_seed(group, lb, sb, fmt))
                if not side_a or not side_b:
                    continue
                per_seed, missed = _contrast(side_a, side_b)
                ci = mean_ci(per_seed.values())
                sd = float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) >= 2 else float("nan")
                rows.append(dict(zip(GROUP_KEYS, key), format=fmt, kind=kind,
                                 contrast=f"{config_label(la, sa, fmt)} vs {config_label(lb, sb, fmt)}",
                                 n=ci.n, mean=ci.mean, lo=ci.lo, hi=ci.hi, seeds_for_2pct=seeds_needed(sd),
                                 per_seed=per_seed, missed=missed))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def _cell(r: dict) -> str:
    if r["n"] == 0:
        return "n/a"
    s = f"{r['mean'] * 100:+.1f}%"
    return s + (f" [{r['lo'] * 100:+.1f}%, {r['hi'] * 100:+.1f}%]" if r["n"] >= 2 else "") + f" (n={r['n']})"


def _verdict(r: dict) -> str:
    if r["n"] < 2:
        return "too few seeds"
    if r["lo"] > 0:
        return "costlier"
    if r["hi"] < 0:
        return "cheaper"
    return "no difference resolved"


def _seeds(n) -> str:
    return "n/a" if n is None or (isinstance(n, float) and not np.isfinite(n)) else str(int(n))


def to_markdown(table: pd.DataFrame, heading_level: int = 2) -> str:
    if table.empty:
        return ""
    h = "#" * heading_level
    parts = [f"{h} Paired contrasts (extra tokens of a over b, paired by seed, 95% t-interval)\n"]
    for key, sub in table.groupby(list(GROUP_KEYS) + ["format"], sort=True):
        model, data, target, group, fmt = key
        parts.append(f"model={model}, data={data}, target ppl={target:g}"
                     f"{', group ' + group if group else ''}, {fmt}:\n")
        body = [{"contrast (a vs b)": r["contrast"], "kind": r["kind"], "a over b": _cell(r),
                 "interval": _verdict(r), "seeds for ±2%": _seeds(r["seeds_for_2pct"]),
                 "seeds not compared": "; ".join(r["missed"])}
                for r in sub.to_dict("records")]
        parts.append(tabulate(body, headers="keys", tablefmt="github", disable_numparse=True) + "\n")
    return "\n".join(parts)


def to_csv(table: pd.DataFrame) -> str:
    flat = []
    for r in table.to_dict("records"):
        d = dict(r)
        d["per_seed"] = ";".join(f"{s}:{v:.6g}" for s, v in sorted(r["per_seed"].items()))
        d["missed"] = "; ".join(r["missed"])
        d["seeds_for_2pct"] = "" if r["seeds_for_2pct"] is None or r["seeds_for_2pct"] != r["seeds_for_2pct"] \
            else int(r["seeds_for_2pct"])
        flat.append(d)
    # The group column only when the report has several experiment groups (one group: no label).
    cols = [c for c in CSV_COLUMNS if c != "group" or table["group"].astype(bool).any()]
    buf = io.StringIO()
    pd.DataFrame(flat, columns=cols).to_csv(buf, index=False)
    return buf.getvalue()
