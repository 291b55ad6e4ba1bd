"""Equivalent-token cost: how many FP8 tokens a configuration's loss is worth, at every evaluation.

Tokens-to-target reads one point of each curve (where it crosses the target) and needs a target.
The estimator reads the whole late curve, and works for fixed-budget runs without a target too
(status ``completed``, e.g. the calibration runs), which the tokens-to-target table leaves out
unless the report gives them a post-hoc target (``--target-ppl``); the estimator reads them as the
fixed-budget runs they are either way.  A row is a configuration (ladder, stabilizer, format; fp8
and bf16 have no format, :func:`.runs.config_format`) of one experiment group and target.

**Definition.**  For each seed s, the FP8 run's validation loss is fitted against log tokens
(below); at each evaluation (D, L) of a configuration's run of seed s the fit is inverted,
``D_eq = tokens the FP8 run of seed s needed to reach loss L``, and

    cost(D) = D / D_eq - 1

(+10%: the configuration needed 10% more tokens than FP8 for the loss it has at D).  A run's cost
is the mean of cost(D) over the evaluations in the *window* ``[a, b] x T`` (T: the tokens the run
trained, ``tokens_seen``; default ``--eq-window 0.5,1.0``, the last half of the run).  The table's
cost is the mean over seeds of those per-seed (paired) costs with a 95% Student-t interval
(:func:`.stats.mean_ci`).  A configuration whose loss curve is L(t / k) of the baseline's L(t)
gets cost k - 1 at every evaluation inside the range, exactly where the fit is exact (at the FP8
run's evaluation points, and everywhere for curves linear in log tokens; tests check both).

**The fit: isotonic, then piecewise linear in log tokens.**  The FP8 evaluations (tokens > 0,
finite loss) are fitted by isotonic regression (pool-adjacent-violators, least squares, loss
non-increasing in tokens), pooled blocks of equal value become one knot at the block's mean log
tokens, and the knots are joined by straight lines in (log tokens, loss).  Why this and not a
monotone PCHIP: evaluation noise makes raw validation loss non-monotone (a seed's loss may rise
by ~0.01 between evaluations), and any inversion needs one D_eq per loss -- the isotonic step is
the least-squares monotone fit, and merging ties makes the knots *strictly* decreasing, so the
inverse is unique.  Linear pieces never overshoot between knots and are exact at the knots, so a
cost is always traceable to two FP8 evaluations; a PCHIP would also need the isotonic step first
and, through the zero slopes it puts at pooled blocks, makes the inverse ill-conditioned exactly
where the loss is flat.  Log tokens, because loss curves are close to power laws, nearly linear in
log tokens between evaluations 524k tokens apart late in training.

**Outside the fitted range nothing is extrapolated.**  The range is the knots' range: from the
first to the last FP8 knot in tokens, i.e. losses between the fit's minimum and maximum.  An
evaluation whose loss is *below* the FP8 fit's minimum (better than the FP8 run ever got) or
*above* its maximum (worse than at the FP8 run's first knot) has no D_eq: it is left out of the
mean and counted (``n_below`` / ``n_above`` per run and row).  A run with no evaluation in range
inside its window has no cost (NaN) and is not a seed of the mean.

**Which FP8 run.**  Per experiment group minus the target (``train.target_ppl`` and
``train.stop_at_target`` dropped from the group key, so a target run and a fixed-budget run of
one experiment are compared) and seed: the FP8 run (stabilizer none) whose evaluations reach
furthest in tokens, ties broken for a fixed-budget run (status completed), then by name.  A
fixed-budget FP8 run covers the whole budget, where a run stopped at the target covers only up to
its crossing, which would leave every evaluation of a configuration better than FP8 out of range.
A target FP8 run then gets a cost against its fixed-budget twin of the same seed: the run-to-run
repeatability of "the same" training (GPU nondeterminism), not zero by construction.

Diverged runs get no cost (they are named in the section); failed, corrupt and incomplete runs
never reach this module (:mod:`.runs`).

**Cost versus tokens (the plot).**  At every evaluation token value, the per-seed costs of a
configuration (every evaluation in range, not only the window) are averaged over the seeds that
have one there, with a 95% t band where two or more do.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .runs import ReportError, formats_of, group_labels
from .stats import config_label, config_rank, mean_ci, seeds_needed

DEFAULT_WINDOW = (0.5, 1.0)
# Dropped from the experiment-group key: a target run and a fixed-budget run are one experiment.
TARGET_KEYS = ("train.target_ppl", "train.stop_at_target")
# A configuration is (ladder, stabilizer, config_format): fp8 / bf16 rows have no format (.runs).
ROW_KEYS = ("egroup_id", "ladder", "stabilizer", "config_format", "model", "data", "target_key")
CSV_COLUMNS = ("model", "data", "egroup", "label", "ladder", "stabilizer", "format", "target_ppl", "n_runs",
               "seeds", "eq_cost_mean", "eq_cost_lo", "eq_cost_hi", "eq_n", "eq_seeds_for_2pct", "n_evals_used",
               "n_below", "n_above", "is_baseline", "per_seed", "left_out")


def parse_window(text: str) -> Tuple[float, float]:
    """'0.5,1.0' -> (0.5, 1.0); raises ValueError unless 0 <= a <= b <= 1."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"{text!r}: expected two fractions A,B such as 0.5,1.0")
    a, b = (float(p) for p in parts)
    if not (0.0 <= a <= b <= 1.0):
        raise ValueError(f"{text!r}: need 0 <= A <= B <= 1 (fractions of the tokens each run trained)")
    return a, b


# ----------------------------------------------------------------------------- the fit

def isotonic_decreasing(y: Sequence[float]) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """Least-squares non-increasing fit (pool adjacent violators), equal weights.

    Returns (fitted values, blocks as (start, stop) index ranges); adjacent blocks have strictly
    decreasing values (ties are pooled too)."""
    blocks: List[List[float]] = []  # [sum, count, start]
    for i, v in enumerate(np.asarray(y, dtype=float)):
        blocks.append([v, 1, i])
        while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] >= blocks[-2][0] / blocks[-2][1]:
            s, c, _ = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    fitted = np.empty(len(y))
    spans = []
    for s, c, start in blocks:
        fitted[start:start + c] = s / c
        spans.append((start, start + c))
    return fitted, spans


@dataclass(frozen=True)
class MonotoneFit:
    """Strictly decreasing piecewise-linear loss(log tokens) through the isotonic knots."""

    log_tokens: np.ndarray  # knots, increasing
    loss: np.ndarray  # knots, strictly decreasing

    @property
    def token_range(self) -> Tuple[float, float]:
        return float(np.exp(self.log_tokens[0])), float(np.exp(self.log_tokens[-1]))

    @property
    def loss_range(self) -> Tuple[float, float]:
        return float(self.loss[-1]), float(self.loss[0])

    def loss_at(self, tokens) -> np.ndarray:
        """The fitted loss at tokens inside the range, NaN outside (no extrapolation)."""
        x = np.log(np.asarray(tokens, dtype=float))
        out = np.interp(x, self.log_tokens, self.loss)
        return np.where((x >= self.log_tokens[0]) & (x <= self.log_tokens[-1]), out, np.nan)

    def tokens_at(self, loss) -> np.ndarray:
        """D_eq: the tokens at which the fit reaches `loss`; NaN outside the fitted loss range."""
        y = np.asarray(loss, dtype=float)
        lo, hi = self.loss_range
        # np.interp needs increasing x: the loss knots reversed.
        x = np.interp(y, self.loss[::-1], self.log_tokens[::-1])
        return np.where(np.isfinite(y) & (y >= lo) & (y <= hi), np.exp(x), np.nan)


def monotone_fit(tokens: Sequence[float], loss: Sequence[float]) -> MonotoneFit:
    """The FP8 curve's fit (module doc); raises ReportError with fewer than two usable knots."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[keep], y[keep]
    order = np.argsort(t, kind="stable")
    x, y = np.log(t[order]), y[order]
    fitted, spans = isotonic_decreasing(y)
    kx = np.array([x[a:b].mean() for a, b in spans])
    ky = np.array([fitted[a] for a, b in spans])
    if len(kx) < 2:
        raise ReportError("FP8 curve has fewer than two distinct decreasing evaluations: nothing to invert")
    return MonotoneFit(kx, ky)


class RunCost(NamedTuple):
    tokens: np.ndarray  # every evaluation's tokens (tokens > 0, finite loss)
    d_eq: np.ndarray  # NaN where out of range
    cost: np.ndarray  # D / D_eq - 1, NaN where out of range
    in_window: np.ndarray  # bool
    mean: float  # over the in-range evaluations of the window; NaN if none
    n_used: int
    n_below: int  # window evaluations with loss below the FP8 fit's minimum
    n_above: int  # ... above its maximum


def run_cost(loss_curve: Sequence[Tuple[float, float]], fit: MonotoneFit, trained_tokens: float,
             window: Tuple[float, float] = DEFAULT_WINDOW) -> RunCost:
    """The equivalent-token cost of one run's evaluations against one FP8 fit (module doc)."""
    c = np.asarray(loss_curve, dtype=float).reshape(-1, 2)
    c = c[np.isfinite(c).all(axis=1) & (c[:, 0] > 0)]
    tokens, loss = c[:, 0], c[:, 1]
    d_eq = fit.tokens_at(loss)
    cost = tokens / d_eq - 1.0
    a, b = window
    in_window = (tokens >= a * trained_tokens * (1 - 1e-12)) & (tokens <= b * trained_tokens * (1 + 1e-12))
    used = in_window & np.isfinite(cost)
    lo, hi = fit.loss_range
    return RunCost(tokens, d_eq, cost, in_window, float(cost[used].mean()) if used.any() else math.nan,
                   int(used.sum()), int((in_window & (loss < lo)).sum()), int((in_window & (loss > hi)).sum()))


# ----------------------------------------------------------------------------- runs -> table

def egroup_id(group_dict: Dict) -> Tuple[str, Dict]:
    d = {k: v for k, v in group_dict.items() if k not in TARGET_KEYS}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8], d


def target_or_none(x) -> Optional[float]:
    """A run's or row's target as a float, None for a fixed budget (no target: None or NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _final_tokens(r: dict) -> float:
    ts = [t for t, _ in r["loss_curve"] if np.isfinite(t)]
    return max(ts) if ts else 0.0


def choose_baselines(runs: pd.DataFrame) -> Dict[Tuple[str, int], dict]:
    """(egroup_id, seed) -> the FP8 run whose curve the estimator inverts (module doc)."""
    out: Dict[Tuple[str, int], dict] = {}
    for r in runs.to_dict("records"):
        if r["ladder"] != "fp8" or r["status"] == "diverged":
            continue
        key = (r["egroup_id"], int(r["seed"]))
        rank = (r["stabilizer"] == "none", _final_tokens(r), r["status"] == "completed", r["run"])
        if key not in out or rank > out[key][0]:
            out[key] = (rank, r)
    return {k: v[1] for k, v in out.items()}


@dataclass
class Estimate:
    table: pd.DataFrame  # one row per (egroup, configuration, target or fixed budget)
    per_run: Dict[str, RunCost]  # run_dir -> its cost
    baseline_of: Dict[str, str]  # run_dir -> FP8 run_dir it was measured against
    window: Tuple[float, float]
    left_out: List[str]  # "run: why", runs with no cost at all
    # The runs estimated, with egroup_id, egroup and target_key columns (for .contrasts.eq_contrasts).
    runs: Optional[pd.DataFrame] = None
    why: Optional[Dict[str, str]] = None  # run_dir -> why it has no (finite) cost


def estimate(runs: pd.DataFrame, window: Tuple[float, float] = DEFAULT_WINDOW) -> Estimate:
    """Every finished run (``load_runs(..., include_completed=True)``) against its FP8 fit."""
    runs = runs.copy()
    ids = [egroup_id(g) for g in runs["group_dict"]]
    runs["egroup_id"] = [i for i, _ in ids]
    labels = group_labels({i: d for i, d in ids})
    runs["egroup"] = [labels[i] for i, _ in ids]
    runs["target_key"] = [target_or_none(t) for t in runs["target_ppl"]]
    baselines = choose_baselines(runs)
    fits: Dict[str, object] = {}
    per_run: Dict[str, RunCost] = {}
    baseline_of: Dict[str, str] = {}
    left_out: List[str] = []
    why: Dict[str, str] = {}
    for r in runs.to_dict("records"):
        base = baselines.get((r["egroup_id"], int(r["seed"])))
        if r["status"] == "diverged":
            why[r["run_dir"]] = "diverged: no equivalent-token cost"
        elif base is None:
            why[r["run_dir"]] = f"no FP8 run of seed {r['seed']} in its experiment group"
        else:
            if base["run_dir"] not in fits:
                try:
                    fits[base["run_dir"]] = monotone_fit(*zip(*base["loss_curve"])) if base["loss_curve"] else None
                except ReportError as e:
                    fits[base["run_dir"]] = str(e)
            fit = fits[base["run_dir"]]
            if not isinstance(fit, MonotoneFit):
                why[r["run_dir"]] = f"FP8 run {base['run']}: {fit or 'no evaluations'}"
            else:
                trained = float(r["tokens_seen"]) if r.get("tokens_seen") else _final_tokens(r)
                per_run[r["run_dir"]] = run_cost(r["loss_curve"], fit, trained, window)
                baseline_of[r["run_dir"]] = base["run_dir"]
                if not np.isfinite(per_run[r["run_dir"]].mean):
                    why[r["run_dir"]] = "no evaluation of its window inside the FP8 fit's range"
        if r["run_dir"] in why:
            left_out.append(f"{r['run']}: {why[r['run_dir']]}")
    rows = []
    for key, sub in runs.groupby(list(ROW_KEYS), sort=False, dropna=False):
        recs = sorted(sub.to_dict("records"), key=lambda r: r["seed"])
        first = recs[0]
        per_seed = {int(r["seed"]): per_run[r["run_dir"]].mean for r in recs
                    if r["run_dir"] in per_run and np.isfinite(per_run[r["run_dir"]].mean)}
        ci = mean_ci(per_seed.values())
        sd = float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) >= 2 else math.nan
        costs = [per_run[r["run_dir"]] for r in recs if r["run_dir"] in per_run]
        rows.append({
            "egroup_id": first["egroup_id"], "egroup": first["egroup"], "model": first["model"],
            "data": first["data"], "ladder": first["ladder"], "stabilizer": first["stabilizer"],
            "format": formats_of(recs), "config_format": first["config_format"],
            "target_ppl": target_or_none(first["target_key"]),
            "label": config_label(first["ladder"], first["stabilizer"], first["config_format"]),
            "rank": config_rank(first["ladder"], first["stabilizer"], first["config_format"]),
            "n_runs": len(recs), "seeds": [int(r["seed"]) for r in recs],
            "eq_cost_mean": ci.mean, "eq_cost_lo": ci.lo, "eq_cost_hi": ci.hi, "eq_n": ci.n,
            "eq_seeds_for_2pct": seeds_needed(sd),
            "n_evals_used": sum(c.n_used for c in costs), "n_below": sum(c.n_below for c in costs),
            "n_above": sum(c.n_above for c in costs),
            "is_baseline": all(baseline_of.get(r["run_dir"]) == r["run_dir"] for r in recs),
            "per_seed": per_seed, "run_dirs": [r["run_dir"] for r in recs],
            "left_out": [f"{r['run']}: {why[r['run_dir']]}" for r in recs if r["run_dir"] in why],
        })
    table = pd.DataFrame(rows)
    if len(table):
        table["_t"] = [(-1.0 if t is None else t) for t in table["target_ppl"]]
        table = table.sort_values(["model", "data", "egroup", "rank", "_t"], kind="stable").drop(columns="_t")
        table = table.reset_index(drop=True)
    return Estimate(table, per_run, baseline_of, window, left_out, runs, why)


def attach(table: pd.DataFrame, est: Estimate) -> pd.DataFrame:
    """Add eq_cost_mean/lo/hi, eq_n (and eq_seeds_for_2pct) to the tokens-to-target table's rows,
    over the very runs of each row."""
    out = []
    for row in table.to_dict("records"):
        vals = [est.per_run[d].mean for d in row["run_dirs"] if d in est.per_run]
        vals = [v for v in vals if np.isfinite(v)]
        ci = mean_ci(vals)
        sd = float(np.std(vals, ddof=1)) if len(vals) >= 2 else math.nan
        row.update(eq_cost_mean=ci.mean, eq_cost_lo=ci.lo, eq_cost_hi=ci.hi, eq_n=ci.n,
                   eq_seeds_for_2pct=seeds_needed(sd))
        out.append(row)
    return pd.DataFrame(out, columns=list(table.columns) + [c for c in ("eq_cost_mean", "eq_cost_lo", "eq_cost_hi",
                                                                      "eq_n", "eq_seeds_for_2pct")
                                                            if c not in table.columns])


def cost_curve(est: Estimate, row: dict) -> pd.DataFrame:
    """Per evaluation token value: mean cost over the row's seeds in range there, 95% t band, n."""
    by_t: Dict[float, List[float]] = {}
    for d in row["run_dirs"]:
        c = est.per_run.get(d)
        if c is None:
            continue
        for t, v in zip(c.tokens, c.cost):
            if np.isfinite(v):
                by_t.setdefault(float(t), []).append(float(v))
    recs = []
    for t in sorted(by_t):
        ci = mean_ci(by_t[t])
        recs.append({"tokens": t, "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n": ci.n})
    return pd.DataFrame(recs, columns=["tokens", "mean", "lo", "hi", "n"])


# ----------------------------------------------------------------------------- output

def fmt_eq(mean: float, lo: float, hi: float, n: int) -> str:
    if not n:
        return "n/a"
    s = f"{mean * 100:+.1f}%"
    if n >= 2 and np.isfinite(lo):
        s += f" [{lo * 100:+.1f}, {hi * 100:+.1f}]"
    return s + f" (n={n})"


def window_text(window: Tuple[float, float]) -> str:
    return f"[{window[0]:g}, {window[1]:g}] x the tokens each run trained"


def to_markdown(est: Estimate, heading_level: int = 2, posthoc: bool = False) -> str:
    """The estimator's section; ``posthoc``: the report gave fixed-budget runs a post-hoc target."""
    from tabulate import tabulate
    h = "#" * heading_level
    parts = [f"{h} Equivalent-token cost (estimator)\n",
             "Per seed, the FP8 run's validation loss is fitted against log tokens (isotonic, then piecewise "
             "linear; no extrapolation), inverted at each evaluation (D, loss) of a run: D_eq = tokens FP8 "
             "needed for that loss, cost = D / D_eq - 1, averaged over the evaluations in the window "
             f"{window_text(est.window)} (`--eq-window`), then mean and 95% t-interval over seeds. "
             "Evaluations whose loss lies outside the FP8 fit's range are left out and counted "
             "(below: better than FP8 ever got; above: worse than its first knot). FP8 curve per seed: the "
             "FP8 run reaching furthest in tokens (a fixed-budget run when there is one), so a target FP8 "
             "row measures the repeatability of the same seed, not zero. Fixed-budget runs (no target) are "
             + ("rows here as the fixed-budget runs they are, whatever post-hoc target the tokens-to-target "
                "table gave them" if posthoc else "rows here though the tokens-to-target table leaves them out")
             + ". `seeds for ±2%`: the smallest n "
             "with t(0.975, n-1) * sd / sqrt(n) <= 0.02 for the observed per-seed sd.\n"]
    if est.table.empty:
        return "\n".join(parts + ["No run has an equivalent-token cost.\n"])
    for (model, data, eg), sub in est.table.groupby(["model", "data", "egroup"], sort=False):
        parts.append(f"model={model}, data={data}" + (f", group {eg}" if eg else "") + ":\n")
        body = []
        for r in sub.to_dict("records"):
            body.append({
                "configuration": r["label"],
                "runs": ("fixed budget (no target)" if target_or_none(r["target_ppl"]) is None
                         else f"target ppl {r['target_ppl']:g}"),
                "equivalent-token cost": ("0 (the FP8 curve itself)" if r["is_baseline"] else
                                          fmt_eq(r["eq_cost_mean"], r["eq_cost_lo"], r["eq_cost_hi"], r["eq_n"])),
                "seeds for ±2%": "" if r["is_baseline"] or r["eq_seeds_for_2pct"] is None else str(r["eq_seeds_for_2pct"]),
                "evaluations used / below / above range": f"{r['n_evals_used']} / {r['n_below']} / {r['n_above']}",
                "per seed": ", ".join(f"s{s} {v * 100:+.1f}%" for s, v in sorted(r["per_seed"].items())),
            })
        parts.append(tabulate(body, headers="keys", tablefmt="github", disable_numparse=True) + "\n")
    if est.left_out:
        parts.append("Runs without an equivalent-token cost: " + "; ".join(est.left_out) + "\n")
    return "\n".join(parts)


def to_csv(est: Estimate) -> str:
    import io
    flat = []
    for r in est.table.to_dict("records"):
        d = {c: r.get(c) for c in CSV_COLUMNS}
        d["seeds"] = ";".join(map(str, r["seeds"]))
        d["per_seed"] = ";".join(f"{s}:{v:.6g}" for s, v in sorted(r["per_seed"].items()))
        d["left_out"] = "; ".join(r["left_out"])
        flat.append(d)
    buf = io.StringIO()
    pd.DataFrame(flat, columns=list(CSV_COLUMNS)).to_csv(buf, index=False)
    return buf.getvalue()
