"""Tokens to target, the paired extra token cost versus FP8, and the net speedup.

Per configuration (ladder, stabilizer, format, model, data) and validation-perplexity
target, over the seeds that finished:

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

The baseline of a run is the ``ladder == "fp8"`` run with the same model, data, target
and seed (stabilizer "none" preferred, then the same format: an FP8 run has no FP4 GEMM,
so neither changes its numerics).  A run without one is an error
(:class:`MissingBaselineError`) naming every missing (model, data, target, seed), because
a cost against some other seed's baseline would not be paired.  Runs of one model and
data with different targets are never mixed: each target is its own comparison group and
a warning names the targets and runs involved.

scipy is not a dependency, so the Student-t quantile is computed here from the
regularized incomplete beta function (Lentz's continued fraction) and inverted by
bisection; the tests check it against tabulated values.
"""
from __future__ import annotations

import math
import warnings as _warnings
from statistics import NormalDist
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .runs import Issue, ReportError

CONFIG_KEYS = ("ladder", "stabilizer", "format", "model", "data")
GROUP_KEYS = ("model", "data", "target_ppl")
# The paper's ladder, then the stabilized full-FP4 rungs; anything else sorts after.
LADDER_ORDER = ("bf16", "fp8", "fprop", "dgrad", "wgrad")
STABILIZED_ORDER = ("sr", "rht", "h16")


class MissingBaselineError(ReportError):
    """Runs with no FP8 baseline of the same model, data, target and seed."""

    def __init__(self, missing: Sequence[Tuple[str, str, float, int]], needed_by: Dict[tuple, List[str]],
                 excluded_fp8: Sequence[str] = ()):
        self.missing = sorted(missing)
        lines = [f"No FP8 baseline run (ladder=fp8) for {len(self.missing)} "
                 f"(model, data, target_ppl, seed) combination(s):"]
        for combo in self.missing:
            model, data, target, seed = combo
            users = ", ".join(sorted(needed_by.get(combo, [])))
            lines.append(f"  model={model} data={data} target_ppl={target:g} seed={seed}  (needed by {users})")
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


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta, modified Lentz (Numerical Recipes 6.4).
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_bt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    bt = math.exp(log_bt)
    # The fraction converges fast only on this side of the mean; use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Student-t quantile (inverse CDF), e.g. t_ppf(0.975, 4) = 2.776."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if df > 1e7:
        return NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    hi = 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection: monotone and robust for every df; 200 halvings is exact to float
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


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
    """Sort key: bf16, fp8, fprop, dgrad, wgrad, wgrad+sr/rht/h16, then everything else."""
    if stabilizer == "none" and ladder in LADDER_ORDER:
        r = LADDER_ORDER.index(ladder)
    elif ladder == "bf16":
        r = 0
    elif ladder == "wgrad" and stabilizer in STABILIZED_ORDER:
        r = len(LADDER_ORDER) + STABILIZED_ORDER.index(stabilizer)
    else:
        r = 100 + (LADDER_ORDER.index(ladder) if ladder in LADDER_ORDER else len(LADDER_ORDER))
    return (r, ladder, stabilizer, fmt != "mxfp4", fmt)


def config_label(ladder: str, stabilizer: str, fmt: str) -> str:
    if ladder in ("bf16", "fp8"):
        label = ladder if stabilizer == "none" else f"{ladder}+{stabilizer}"
        return label if fmt == "mxfp4" else f"{label} ({fmt})"
    label = ladder if stabilizer == "none" else f"{ladder}+{stabilizer}"
    return f"{label} ({fmt})"


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


def assign_baselines(runs: pd.DataFrame, issues: Sequence[Issue] = ()) -> Dict[str, str]:
    """run_dir -> the run_dir of its paired FP8 baseline; raises MissingBaselineError."""
    fp8 = runs[runs["ladder"] == "fp8"]
    index: Dict[tuple, List[dict]] = {}
    for r in fp8.to_dict("records"):
        index.setdefault((r["model"], r["data"], r["target_ppl"], r["seed"]), []).append(r)
    out, missing, needed_by = {}, set(), {}
    for r in runs.to_dict("records"):
        combo = (r["model"], r["data"], r["target_ppl"], r["seed"])
        cands = index.get(combo)
        if not cands:
            missing.add(combo)
            needed_by.setdefault(combo, []).append(r["run"])
            continue
        best = min(cands, key=lambda b: (b["stabilizer"] != "none", b["format"] != r["format"], b["run"]))
        out[r["run_dir"]] = best["run_dir"]
    if missing:
        excluded = [i.name for i in issues if i.name.startswith("fp8-")]
        raise MissingBaselineError(missing, needed_by, excluded)
    return out


def _positive(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x) and x > 0


def _config_row(key: tuple, sub: pd.DataFrame, runs_by_dir: Dict[str, dict], baselines: Dict[str, str]) -> dict:
    row = dict(zip(CONFIG_KEYS + ("target_ppl",), key))
    row["label"] = config_label(row["ladder"], row["stabilizer"], row["format"])
    row["rank"] = config_rank(row["ladder"], row["stabilizer"], row["format"])
    recs = sub.sort_values("seed").to_dict("records")
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


def summarize(runs: pd.DataFrame, issues: Sequence[Issue] = ()) -> Tuple[pd.DataFrame, List[str], Dict[str, str]]:
    """One row per (configuration, target): (stats table, warnings, run_dir -> baseline run_dir).

    Rows are ordered by comparison group (model, data, target) and then along the ladder.
    """
    if runs.empty:
        raise ReportError("no finished runs to summarize")
    warnings = target_groups(runs)
    for w in warnings:
        _warnings.warn(w, TargetMismatchWarning, stacklevel=2)
    baselines = assign_baselines(runs, issues)
    runs_by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    rows = [_config_row(key, sub, runs_by_dir, baselines)
            for key, sub in runs.groupby(list(CONFIG_KEYS + ("target_ppl",)), sort=False)]
    rows.sort(key=lambda r: (r["model"], r["data"], r["target_ppl"], r["rank"]))
    return pd.DataFrame(rows), warnings, baselines
