"""Tokens to target, the paired extra token cost versus FP8, and the net speedup.

Per configuration (ladder, stabilizer, format, model, data; a rung without an FP4 GEMM has no
format, :func:`.runs.config_format`) and validation-perplexity target, over the seeds that
finished:

* **tokens to target**: mean over the seeds that reached the target, with a 95% Student-t
  interval ``mean +- t_{0.975, n-1} * s / sqrt(n)`` when n >= 2 (s: sample standard
  deviation, ddof=1).  The mean is conditional on converging, which is why the table
  always shows ``converged n/N`` next to it.
* **extra token cost** versus the FP8 baseline, *paired by seed*: for every seed where
  both the configuration and its baseline reached the target,
  ``cost_s = tokens_cfg_s / tokens_fp8_s - 1``; the mean and t-interval are taken over
  those per-seed ratios.  Pairing matters: the seed fixes the initialisation and the data
  order, which move tokens-to-target by several percent on their own, and that shared
  noise cancels in the ratio but not in a ratio of means.
* **net speedup** = step-throughput gain / (1 + cost), the wall-clock speedup to the
  same perplexity: a gain of 1.20 with 8.5% extra tokens nets 1.20 / 1.085 = 1.106,
  i.e. +10.6% (the paper's headline).  Its interval comes from the cost interval with
  the gain held fixed.

The baseline of a run is the ``ladder == "fp8"`` run of the same experiment group (model,
data, target, the FP8 formats and every other experiment key but ladder, stabilizer, format and
seed) and seed (stabilizer "none" preferred: an FP8 run has no FP4 GEMM for it to act on), so
every FP4 format of a group is measured against one FP8 run per seed, whatever format.name that
run was started with (its format changes nothing it computes, :mod:`.runs`).  A run without one
is an error (:class:`MissingBaselineError`) naming every missing (model, data, target, seed),
because a cost against some other seed's baseline would not be paired.  Runs of one model and
data with different targets are never mixed: each target is its own comparison group and
a warning names the targets and runs involved.  A post-hoc target (:func:`.posthoc.apply_posthoc_target`)
is a target like any other here; its rows carry ``target_posthoc`` for the tables to say so.  A
row's ``format`` is the format.name of its runs (";"-joined when an FP8 or BF16 row's seeds were
started with different ones); its ``config_format`` is the identity.

The Student-t quantiles come from scipy.stats; the tests check them against tabulated values.

* **seeds for +-2%** (:func:`seeds_needed`): how many seeds the observed per-seed spread s of a
  paired cost would need for a 95% interval of +-2 points: the smallest n >= 2 with
  ``t_{0.975, n-1} * s / sqrt(n) <= 0.02``, found by counting n up (t depends on n).
* **baseline outliers** (:func:`baseline_outliers`): an FP8 seed whose tokens-to-target lies
  more than 2.5 robust z from the *other* FP8 seeds of its group -- z = (x - median(others)) /
  (1.4826 MAD(others)), leave-one-out so the outlier cannot inflate its own yardstick; needs
  four or more FP8 seeds that reached the target.  Every row paired with such a baseline says
  so in its notes (``baseline_outliers`` {seed: z}): a ratio against an odd denominator moves
  that seed's cost of every row at once.

Comparison groups are experiment groups (:mod:`.runs`: the experiment config minus ladder,
stabilizer, format -- but for its FP8 formats -- and seed), so the baseline search and every table row stay inside one group: an FP8
run with another train.lr is a different experiment, never a baseline.
"""
from __future__ import annotations

import math
import warnings as _warnings
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy.stats import t as _t

from .runs import NO_FP4_LADDERS, Issue, ReportError, formats_of, group_warnings

CONFIG_KEYS = ("ladder", "stabilizer", "config_format", "model", "data")
GROUP_KEYS = ("model", "data", "target_ppl", "group")
# The paper's ladder, then the stabilized full-FP4 rungs; anything else sorts after.
from fp4.names import Ladder, RecipeFormat, Stabilizer, choices
LADDER_ORDER = choices(Ladder)
STABILIZED_ORDER = tuple(s for s in choices(Stabilizer) if s != Stabilizer.none)
# Rows of MXFP4 (and of the format-free fp8 / bf16 rungs) first, then each other format's rows.
FORMAT_ORDER = choices(RecipeFormat)


class MissingBaselineError(ReportError):
    """Runs with no FP8 baseline of the same experiment group (model, data, target, ...) and seed."""

    def __init__(self, missing: Sequence[Tuple[str, str, float, int]], needed_by: Dict[tuple, List[str]],
                 excluded_fp8: Sequence[str] = (), groups: Optional[Dict[tuple, List[str]]] = None):
        self.missing = sorted(missing)
        lines = [f"No FP8 baseline run (ladder=fp8) for {len(self.missing)} "
                 f"(model, data, target_ppl, seed) combination(s):"]
        for combo in self.missing:
            model, data, target, seed = combo
            users = ", ".join(sorted(needed_by.get(combo, [])))
            in_group = "".join(f" group {g}" for g in sorted((groups or {}).get(combo, [])) if g)
            lines.append(f"  model={model} data={data} target_ppl={target:g} seed={seed}{in_group}  "
                         f"(needed by {users})")
        if excluded_fp8:
            lines.append("Excluded fp8 run directories (see the issues list): " + ", ".join(excluded_fp8))
        lines.append("Run the fp8 rung with the same model, data, target and seed, e.g. "
                     "`fp4-ablate run +ladder=fp8 seed=<seed> ...`, then report again.")
        super().__init__("\n".join(lines))


class TargetMismatchWarning(UserWarning):
    """Runs of one model and data were given different perplexity targets."""


class CI(NamedTuple):
    mean: float
    lo: float
    hi: float
    n: int


def t_ppf(p: float, df: float) -> float:
    """Student-t quantile (inverse CDF), e.g. t_ppf(0.975, 4) = 2.776 (scipy.stats.t)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    return float(_t.ppf(p, df))


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function (scipy.stats.t)."""
    return float(_t.cdf(t, df))


def mean_ci(values: Iterable[float], level: float = 0.95) -> CI:
    """Mean and two-sided Student-t interval; the bounds are NaN below two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n == 1:
        return CI(m, math.nan, math.nan, 1)
    half = t_ppf(0.5 + level / 2.0, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return CI(m, m - half, m + half, n)


SEEDS_HALF_WIDTH = 0.02
SEEDS_MAX = 100_000


def seeds_needed(sd: float, half_width: float = SEEDS_HALF_WIDTH, level: float = 0.95,
                 n_max: int = SEEDS_MAX) -> Optional[int]:
    """Seeds a paired cost with per-seed standard deviation ``sd`` needs for a +-half_width interval:
    the smallest n >= 2 with t_{(1+level)/2, n-1} * sd / sqrt(n) <= half_width (iterated, since t
    depends on n). None when sd is unknown (fewer than two seeds) or n would exceed n_max."""
    if sd is None or not np.isfinite(sd) or sd < 0:
        return None
    q = 0.5 + level / 2.0
    for n in range(2, n_max + 1):
        if t_ppf(q, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


OUTLIER_Z = 2.5
MAD_SCALE = 1.4826  # MAD of a normal sample x 1.4826 estimates its standard deviation


def robust_z(values: Dict[int, float]) -> Dict[int, float]:
    """Leave-one-out robust z of each seed's value: (x_s - median(others)) / (1.4826 MAD(others)).

    Needs at least three other seeds (else no z for anyone). MAD 0: +-inf where x_s differs from
    the others' median, 0 where it equals it."""
    v = {s: float(x) for s, x in values.items() if x is not None and np.isfinite(x)}
    if len(v) < 4:
        return {}
    out = {}
    for s, x in v.items():
        others = np.array([y for t, y in v.items() if t != s])
        med = float(np.median(others))
        mad = MAD_SCALE * float(np.median(np.abs(others - med)))
        out[s] = (x - med) / mad if mad > 0 else (0.0 if x == med else math.copysign(math.inf, x - med))
    return out


def baseline_outliers(fp8_tokens: Dict[int, float], z: float = OUTLIER_Z) -> Dict[int, float]:
    """{seed: robust z} of the FP8 seeds whose tokens-to-target is more than ``z`` robust z from the
    other FP8 seeds of the group (:func:`robust_z`)."""
    return {s: v for s, v in robust_z(fp8_tokens).items() if abs(v) > z}


def net_speedup(gain: float, cost: float) -> float:
    """Wall-clock speedup to the same perplexity: step-throughput gain / (1 + extra token cost)."""
    if gain is None or cost is None or not np.isfinite(gain) or not np.isfinite(cost):
        return math.nan
    if 1.0 + cost <= 0:
        # An interval end at or below -100% extra tokens (reaching the target with no tokens):
        # the speedup is unbounded there, not negative.
        return math.inf
    return gain / (1.0 + cost)


def config_rank(ladder: str, stabilizer: str, fmt: str) -> tuple:
    """Sort key: bf16, fp8, fprop, dgrad, wgrad, wgrad+sr/rht/h16/h16_all, then everything else; the
    MXFP4 and format-free ("") rows first, then the rows of each other format in that order."""
    if stabilizer == "none" and ladder in LADDER_ORDER:
        r = LADDER_ORDER.index(ladder)
    elif ladder == "bf16":
        r = 0
    elif ladder == "wgrad" and stabilizer in STABILIZED_ORDER:
        r = len(LADDER_ORDER) + STABILIZED_ORDER.index(stabilizer)
    else:
        r = 100 + (LADDER_ORDER.index(ladder) if ladder in LADDER_ORDER else len(LADDER_ORDER))
    f = FORMAT_ORDER.index(fmt) if fmt in FORMAT_ORDER else (0 if fmt == "" else len(FORMAT_ORDER))
    return (f, r, ladder, stabilizer, fmt)


def config_label(ladder: str, stabilizer: str, fmt: str) -> str:
    """'wgrad+h16 (mxfp4)'; a rung without an FP4 GEMM has no format to name: 'fp8', 'bf16'."""
    label = ladder if stabilizer == "none" else f"{ladder}+{stabilizer}"
    return label if ladder in NO_FP4_LADDERS else f"{label} ({fmt})"


def target_groups(runs: pd.DataFrame) -> List[str]:
    """Warnings for every (model, data) whose runs use more than one target_ppl."""
    warnings = []
    for (model, data), sub in runs.groupby(["model", "data"], sort=True):
        targets = sorted(sub["target_ppl"].unique())
        if len(targets) > 1:
            parts = [f"target_ppl={t:g}: {', '.join(sub[sub.target_ppl == t]['run'])}" for t in targets]
            warnings.append(f"model={model} data={data}: runs use {len(targets)} different target_ppl values, "
                            f"reported as separate groups and never mixed -- " + "; ".join(parts))
    return warnings


UNPAIRED = "no FP8 run of its experiment group and seed (left out by --unpaired exclude)"
UNPAIRED_CHOICES = ("error", "exclude")  # what the report does with such runs (--unpaired)


def _fp8_index(runs: pd.DataFrame) -> Dict[tuple, List[dict]]:
    """(group_id, seed) -> the FP8 runs of that experiment group and seed: the pairing rule."""
    index: Dict[tuple, List[dict]] = {}
    for r in runs[runs["ladder"] == "fp8"].to_dict("records"):
        index.setdefault((r["group_id"], r["seed"]), []).append(r)
    return index


def without_baseline(runs: pd.DataFrame) -> pd.Series:
    """Mask of the runs that have no FP8 run of their experiment group and seed to be paired with
    (assign_baselines' rule), e.g. the seeds of an unfinished ladder whose FP8 run is still to come."""
    have = _fp8_index(runs)
    return pd.Series([(g, s) not in have for g, s in zip(runs["group_id"], runs["seed"])],
                     index=runs.index, dtype=bool)


def assign_baselines(runs: pd.DataFrame, issues: Sequence[Issue] = ()) -> Dict[str, str]:
    """run_dir -> the run_dir of its paired FP8 baseline (same experiment group and seed);
    raises MissingBaselineError."""
    index = _fp8_index(runs)
    out, missing, needed_by, groups = {}, set(), {}, {}
    for r in runs.to_dict("records"):
        combo = (r["model"], r["data"], r["target_ppl"], r["seed"])
        cands = index.get((r["group_id"], r["seed"]))
        if not cands:
            missing.add(combo)
            needed_by.setdefault(combo, []).append(r["run"])
            groups.setdefault(combo, set()).add(r["group"])
            continue
        # One FP8 run per (group, stabilizer, seed) survives the duplicate rule, whatever its format.
        best = min(cands, key=lambda b: (b["stabilizer"] != "none", b["run"]))
        out[r["run_dir"]] = best["run_dir"]
    if missing:
        excluded = [i.name for i in issues if i.name.startswith("fp8-")]
        raise MissingBaselineError(missing, needed_by, excluded, groups)
    return out


def _positive(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x) and x > 0


def _config_row(key: tuple, sub: pd.DataFrame, runs_by_dir: Dict[str, dict], baselines: Dict[str, str],
                outliers: Dict[str, float]) -> dict:
    row = dict(zip(CONFIG_KEYS + ("target_ppl", "group", "group_id"), key))
    row["label"] = config_label(row["ladder"], row["stabilizer"], row["config_format"])
    row["rank"] = config_rank(row["ladder"], row["stabilizer"], row["config_format"])
    recs = sub.sort_values("seed").to_dict("records")
    row["format"] = formats_of(recs)
    row["target_posthoc"] = bool(recs[0].get("target_posthoc", False))
    row["seeds"] = [r["seed"] for r in recs]
    row["n_runs"] = len(recs)
    reached = [r for r in recs if r["status"] == "reached"]
    row["n_reached"] = len(reached)
    row["n_diverged"] = sum(r["status"] == "diverged" for r in recs)
    row["n_not_reached"] = sum(r["status"] == "not_reached" for r in recs)
    tok = mean_ci(r["tokens_to_target"] for r in reached)
    row.update(tokens_mean=tok.mean, tokens_lo=tok.lo, tokens_hi=tok.hi)

    per_seed = {}
    for r in reached:
        base = runs_by_dir[baselines[r["run_dir"]]]
        if base["status"] == "reached":
            per_seed[r["seed"]] = r["tokens_to_target"] / base["tokens_to_target"] - 1.0
    cost = mean_ci(per_seed.values())
    row.update(cost_mean=cost.mean, cost_lo=cost.lo, cost_hi=cost.hi, n_paired=cost.n, cost_per_seed=per_seed)
    # A seed that spent its whole budget without reaching the target is right-censored: its
    # cost is more than tokens_seen / baseline - 1. Leaving it out biases the mean down, so the
    # row also carries the mean with every such seed at its bound -- a lower bound on the mean.
    censored = {}
    for r in recs:
        base = runs_by_dir[baselines[r["run_dir"]]]
        if (r["status"] == "not_reached" and base["status"] == "reached" and _positive(r.get("tokens_seen"))):
            censored[r["seed"]] = r["tokens_seen"] / base["tokens_to_target"] - 1.0
    row["cost_censored"] = censored
    row["cost_mean_bound"] = (float(np.mean(list(per_seed.values()) + list(censored.values())))
                              if censored else math.nan)
    row["baseline_reached"] = sum(runs_by_dir[baselines[r["run_dir"]]]["status"] == "reached" for r in recs)
    sd = float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) >= 2 else math.nan
    row["cost_seeds_for_2pct"] = seeds_needed(sd)
    # This row's seeds whose FP8 baseline is an outlier among the group's FP8 seeds (robust z).
    row["baseline_outliers"] = {int(r["seed"]): outliers[baselines[r["run_dir"]]] for r in recs
                                if baselines[r["run_dir"]] in outliers}

    # What the table prints instead of (or next to) a mean when some seeds did not make it.
    nr = [r for r in recs if r["status"] == "not_reached"]
    if nr:
        best = min(nr, key=lambda r: r["best_ppl"] if np.isfinite(r["best_ppl"]) else math.inf)
        row["best_ppl"], row["best_ppl_tokens"] = best["best_ppl"], best["best_ppl_tokens"]
    else:
        row["best_ppl"], row["best_ppl_tokens"] = math.nan, None
    row["diverged_at"] = [r["diverged_at_tokens"] for r in recs if r["status"] == "diverged"]
    tps = [r["mean_tokens_per_s"] for r in recs if np.isfinite(r["mean_tokens_per_s"])]
    row["tokens_per_s"] = float(np.mean(tps)) if tps else math.nan
    row["run_dirs"] = [r["run_dir"] for r in recs]
    row["baseline_dirs"] = sorted({baselines[r["run_dir"]] for r in recs})
    return row


def _baseline_outlier_dirs(runs_by_dir: Dict[str, dict], baselines: Dict[str, str]) -> Dict[str, float]:
    """{FP8 run_dir: robust z} of the baseline runs that are outliers within their group."""
    by_group: Dict[str, Dict[int, str]] = {}
    for d in set(baselines.values()):
        b = runs_by_dir[d]
        if b["status"] == "reached":
            by_group.setdefault(b["group_id"], {})[int(b["seed"])] = d
    out = {}
    for seeds in by_group.values():
        for s, z in baseline_outliers({s: runs_by_dir[d]["tokens_to_target"] for s, d in seeds.items()}).items():
            out[seeds[s]] = z
    return out


def summarize(runs: pd.DataFrame, issues: Sequence[Issue] = ()) -> Tuple[pd.DataFrame, List[str], Dict[str, str]]:
    """One row per (configuration, target): (stats table, warnings, run_dir -> baseline run_dir).

    Rows are ordered by comparison group (model, data, target, experiment group) and then along
    the ladder.
    """
    if runs.empty:
        raise ReportError("no finished runs to summarize")
    warnings = target_groups(runs)
    for w in warnings:
        _warnings.warn(w, TargetMismatchWarning, stacklevel=2)
    warnings += group_warnings(runs)
    baselines = assign_baselines(runs, issues)
    runs_by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    outliers = _baseline_outlier_dirs(runs_by_dir, baselines)
    rows = [_config_row(key, sub, runs_by_dir, baselines, outliers)
            for key, sub in runs.groupby(list(CONFIG_KEYS + ("target_ppl", "group", "group_id")), sort=False)]
    rows.sort(key=lambda r: (r["model"], r["data"], r["target_ppl"], r["group"], r["rank"]))
    return pd.DataFrame(rows), warnings, baselines
