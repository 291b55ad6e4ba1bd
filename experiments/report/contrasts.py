"""Paired contrasts between configurations: what one rung adds, what a stabilizer or a format changes.

The main table compares every configuration with FP8. The paper's questions are about
neighbours as well: does moving Dgrad to FP4 cost anything on top of Fprop, Wgrad on top of
Dgrad, does a stabilizer make full-FP4 cheaper or dearer than no stabilizer, is NVFP4 cheaper
than MXFP4?  Two rows of the main table cannot answer that by subtraction -- their intervals
share the FP8 baseline's noise and would overlap even for a real difference -- so each contrast
is paired by seed, a over b::

    tokens to target:       d_s = tokens_to_target(a, s) / tokens_to_target(b, s) - 1
    equivalent-token cost:  d_s = (1 + c(a, s)) / (1 + c(b, s)) - 1

with c the estimator's per-run cost (:mod:`.estimator`, ``Estimate.per_run[run_dir].mean``; 1 + c
is the run's tokens over the FP8 tokens for its loss, so the ratio is a's tokens over b's for the
same loss, the second estimator's version of the first).  Over the seeds where both sides have a
value (same comparison group and seed), the mean, the 95% Student-t interval over seeds, and the
seeds its observed spread would need for a +-2% interval (:func:`.stats.seeds_needed`).  A seed
where either side has none (missed the target; no equivalent-token cost) is listed by name with
the reason, never silently dropped.  The equivalent-token contrasts need no target, so an
experiment of fixed-budget runs gets contrasts too.

**Which contrasts** (:data:`CONTRASTS`, one table of ``(a, b, kind)`` over (ladder, stabilizer,
format) triples): each rung from fp8 up against the one below (``ladder step``), every stabilized
wgrad against plain wgrad (``stabilizer``), wgrad+h16_all against wgrad+h16 (``stabilizer
scope``: the same Hadamard on every FP4 GEMM versus Wgrad only), all of these within each FP4
format of the group (format :data:`EACH`); and across formats (``format``), wgrad nvfp4 against
wgrad mxfp4, and wgrad ufp4 against wgrad ufp4_e2m1 (the UFP4 paper's grid against its own
E2M1 baseline).  A rung without an FP4 GEMM matches whatever format its runs were started with
(:func:`.runs.config_format`).  A contrast with no run on a side gives no row.

**Comparison groups.**  Tokens to target: the cost table's (model, data, target, experiment
group); the FP8 side of the first ladder step is each run's own baseline from the cost table, and
with several runs of another configuration and seed (e.g. a re-run under a new key) the first by
directory name is used.  Equivalent-token cost: the estimator's (model, data, experiment group
minus the target, and target or fixed budget), so runs are paired with runs of the same target.

**CSV columns.**  contrasts.csv (tokens to target): model, data, target_ppl, group (only with
several experiment groups), format, contrast, kind, n, mean, lo, hi, seeds_for_2pct, per_seed,
missed.  eq_contrasts.csv (equivalent-token cost): model, data, egroup (only with several
estimator groups), target_ppl (empty: fixed budget, no target), and the same from format on.
``format``: the format of both sides, or "A vs B" for a cross-format contrast; ``contrast``:
"label a vs label b"; ``n``: seeds paired; ``mean``, ``lo``, ``hi``: the mean of d_s and its 95%
t-interval, as fractions (0.05 = +5%; lo and hi empty below two seeds); ``seeds_for_2pct``: seeds
needed for +-0.02 (empty: unknown); ``per_seed``: "seed:d_s" joined by ";"; ``missed``: the seeds
not compared and why, joined by "; ".
"""
from __future__ import annotations

import io
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from tabulate import tabulate

from .estimator import target_or_none
from .runs import config_format
from .stats import GROUP_KEYS, LADDER_ORDER, STABILIZED_ORDER, config_label, mean_ci, seeds_needed

Config = Tuple[str, str, str]  # (ladder, stabilizer, format)
EACH = "*"  # the format of a triple meaning: each FP4 format of the group, the same on both sides
_RUNGS = tuple(r for r in LADDER_ORDER if r != "bf16")
# (a, b, kind): a is measured against b.
CONTRASTS: Tuple[Tuple[Config, Config, str], ...] = (
    tuple(((a, "none", EACH), (b, "none", EACH), "ladder step") for b, a in zip(_RUNGS, _RUNGS[1:]))
    + tuple((("wgrad", s, EACH), ("wgrad", "none", EACH), "stabilizer") for s in STABILIZED_ORDER)
    + ((("wgrad", "h16_all", EACH), ("wgrad", "h16", EACH), "stabilizer scope"),
       (("wgrad", "none", "nvfp4"), ("wgrad", "none", "mxfp4"), "format"),
       (("wgrad", "none", "ufp4"), ("wgrad", "none", "ufp4_e2m1"), "format")))
# A triple is either bound to each format or to its own on both sides, never one of each.
assert all((a[2] == EACH) == (b[2] == EACH) for a, b, _ in CONTRASTS)

CSV_COLUMNS = ("model", "data", "target_ppl", "group", "format", "contrast", "kind", "n", "mean", "lo", "hi",
               "seeds_for_2pct", "per_seed", "missed")
EQ_KEYS = ("model", "data", "egroup", "target_ppl")
EQ_CSV_COLUMNS = EQ_KEYS + CSV_COLUMNS[4:]
_STAT_COLUMNS = CSV_COLUMNS[4:]


def _bind(cfg: Config, fmt: Optional[str]) -> Config:
    ladder, stabilizer, f = cfg
    return ladder, stabilizer, config_format(ladder, fmt if f == EACH else f)


def _pairs(fp4_formats: Sequence[str]) -> List[Tuple[Config, Config, str, str]]:
    """(a, b, kind, format column) of the group: the per-format contrasts format by format, then the
    cross-format ones."""
    out = [(_bind(a, fmt), _bind(b, fmt), kind, fmt) for fmt in fp4_formats
           for a, b, kind in CONTRASTS if a[2] == EACH]
    out += [(_bind(a, None), _bind(b, None), kind, a[2] if a[2] == b[2] else f"{a[2]} vs {b[2]}")
            for a, b, kind in CONTRASTS if a[2] != EACH]
    return out


def _by_seed(runs: pd.DataFrame, cfg: Config) -> Dict[int, dict]:
    ladder, stabilizer, fmt = cfg
    sub = runs[(runs.ladder == ladder) & (runs.stabilizer == stabilizer) & (runs.config_format == fmt)]
    out: Dict[int, dict] = {}
    for r in sorted(sub.to_dict("records"), key=lambda r: r["run"]):
        out.setdefault(int(r["seed"]), r)
    return out


def _label(r: dict) -> str:
    return config_label(r["ladder"], r["stabilizer"], r["config_format"])


def _contrast(a: Dict[int, dict], b: Dict[int, dict], value: Callable[[dict], Optional[float]],
              why: Callable[[dict], str]) -> Tuple[Dict[int, float], List[str]]:
    """Per seed of both sides: value(a) / value(b) - 1, or the seed named with why(run) of the side(s)
    without a value."""
    per_seed, missed = {}, []
    for seed in sorted(set(a) & set(b)):
        va, vb = value(a[seed]), value(b[seed])
        if va is not None and vb is not None:
            per_seed[seed] = va / vb - 1.0
        else:
            who = [why(r) for r, v in ((a[seed], va), (b[seed], vb)) if v is None]
            missed.append(f"seed {seed}: " + ", ".join(who))
    return per_seed, missed


def _group_rows(group: pd.DataFrame, keys: dict, value, why, fp8_side=None) -> List[dict]:
    """The contrast rows of one comparison group. ``fp8_side``: side a's seeds -> the FP8 runs to
    pair them with (the cost table's baselines), instead of the group's FP8 runs."""
    fp4_formats = sorted(group.loc[group.config_format != "", "config_format"].unique())
    rows = []
    for a, b, kind, fmt in _pairs(fp4_formats):
        side_a = _by_seed(group, a)
        side_b = fp8_side(side_a) if fp8_side is not None and b[0] == "fp8" else _by_seed(group, b)
        if not side_a or not side_b:
            continue
        per_seed, missed = _contrast(side_a, side_b, value, why)
        ci = mean_ci(per_seed.values())
        sd = float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) >= 2 else math.nan
        rows.append(dict(keys, format=fmt, kind=kind, contrast=f"{config_label(*a)} vs {config_label(*b)}",
                         n=ci.n, mean=ci.mean, lo=ci.lo, hi=ci.hi, seeds_for_2pct=seeds_needed(sd),
                         per_seed=per_seed, missed=missed))
    return rows


def contrasts(runs: pd.DataFrame, baselines: Dict[str, str]) -> pd.DataFrame:
    """Tokens-to-target contrasts: one row per (comparison group, contrast) with runs on both sides.

    ``baselines`` (run_dir -> its FP8 run_dir, from :func:`.stats.summarize`) pairs the first
    ladder step with the very FP8 run the cost table uses.
    """
    by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}

    def value(r: dict) -> Optional[float]:
        return r["tokens_to_target"] if r["status"] == "reached" else None

    def fp8_side(side_a: Dict[int, dict]) -> Dict[int, dict]:
        return {seed: by_dir[baselines[r["run_dir"]]] for seed, r in side_a.items()}

    rows = []
    for key, group in runs.groupby(list(GROUP_KEYS), sort=True):
        rows += _group_rows(group, dict(zip(GROUP_KEYS, key)), value,
                            lambda r: f"{_label(r)} {r['status']}", fp8_side)
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def eq_contrasts(est) -> pd.DataFrame:
    """Equivalent-token-cost contrasts over the estimator's runs (an :class:`.estimator.Estimate`),
    one row per (estimator group, target or fixed budget, contrast) with runs on both sides."""
    runs = est.runs
    if runs is None or runs.empty:
        return pd.DataFrame(columns=list(EQ_CSV_COLUMNS))
    why_not = est.why or {}

    def value(r: dict) -> Optional[float]:
        c = est.per_run.get(r["run_dir"])
        return 1.0 + c.mean if c is not None and np.isfinite(c.mean) else None

    def why(r: dict) -> str:
        return f"{_label(r)} ({why_not.get(r['run_dir'], 'no equivalent-token cost')})"

    groups: Dict[tuple, List[dict]] = {}
    for r in runs.to_dict("records"):
        groups.setdefault((r["model"], r["data"], r["egroup"], r["target_key"]), []).append(r)
    rows = []
    # Fixed budget (no target) first, then by target, as the estimator's table.
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], -1.0 if target_or_none(k[3]) is None else k[3])):
        keys = dict(zip(EQ_KEYS, key[:3] + (target_or_none(key[3]),)))
        rows += _group_rows(pd.DataFrame(groups[key]), keys, value, why)
    return pd.DataFrame(rows, columns=list(EQ_CSV_COLUMNS))


# ----------------------------------------------------------------------------- output

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


def _sections(table: pd.DataFrame, keys: Sequence[str], title: Callable[[tuple], str]) -> List[str]:
    """One Markdown table per (comparison group, format), in the table's row order."""
    parts = []
    blocks: Dict[tuple, List[dict]] = {}
    for r in table.to_dict("records"):
        blocks.setdefault(tuple(r[k] for k in keys) + (r["format"],), []).append(r)
    for key, rows in blocks.items():
        parts.append(title(key) + ":\n")
        body = [{"contrast (a vs b)": r["contrast"], "kind": r["kind"], "a over b": _cell(r),
                 "interval": _verdict(r), "seeds for ±2%": _seeds(r["seeds_for_2pct"]),
                 "seeds not compared": "; ".join(r["missed"])} for r in rows]
        parts.append(tabulate(body, headers="keys", tablefmt="github", disable_numparse=True) + "\n")
    return parts


def to_markdown(table: pd.DataFrame, heading_level: int = 2) -> str:
    if table.empty:
        return ""

    def title(key: tuple) -> str:
        model, data, target, group, fmt = key
        return f"model={model}, data={data}, target ppl={target:g}{', group ' + group if group else ''}, {fmt}"

    h = "#" * heading_level
    return "\n".join([f"{h} Paired contrasts (extra tokens of a over b, paired by seed, 95% t-interval)\n"]
                     + _sections(table, GROUP_KEYS, title))


def eq_to_markdown(table: pd.DataFrame, heading_level: int = 2) -> str:
    if table.empty:
        return ""

    def title(key: tuple) -> str:
        model, data, egroup, target, fmt = key
        runs = "fixed budget (no target)" if target_or_none(target) is None else f"target ppl={target:g}"
        return f"model={model}, data={data}, {runs}{', group ' + egroup if egroup else ''}, {fmt}"

    h = "#" * heading_level
    intro = (f"{h} Paired contrasts on the equivalent-token cost (a over b, paired by seed, 95% t-interval)\n\n"
             "Per seed d = (1 + cost of a) / (1 + cost of b) - 1, with each run's equivalent-token cost from the "
             "section above: a's tokens over b's for the same loss. Runs are paired within one target (or one "
             "fixed budget) and seed.\n")
    return "\n".join([intro] + _sections(table, EQ_KEYS, title))


def _csv(table: pd.DataFrame, columns: Sequence[str], optional: str) -> str:
    flat = []
    for r in table.to_dict("records"):
        d = dict(r)
        d["per_seed"] = ";".join(f"{s}:{v:.6g}" for s, v in sorted(r["per_seed"].items()))
        d["missed"] = "; ".join(r["missed"])
        d["seeds_for_2pct"] = "" if r["seeds_for_2pct"] is None or r["seeds_for_2pct"] != r["seeds_for_2pct"] \
            else int(r["seeds_for_2pct"])
        flat.append(d)
    # The group column only when the report has several groups (one group: no label).
    cols = [c for c in columns if c != optional or table[optional].astype(bool).any()]
    buf = io.StringIO()
    pd.DataFrame(flat, columns=cols).to_csv(buf, index=False)
    return buf.getvalue()


def to_csv(table: pd.DataFrame) -> str:
    return _csv(table, CSV_COLUMNS, "group")


def eq_to_csv(table: pd.DataFrame) -> str:
    return _csv(table, EQ_CSV_COLUMNS, "egroup")
