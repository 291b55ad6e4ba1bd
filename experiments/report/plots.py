"""Figures of the report (matplotlib, Agg backend, PNG), one set per comparison group.

* ``ppl_<group>.png`` (``<group>``: model, data, target and, with several experiment
  groups, ``_g<hash>``): validation perplexity versus tokens for every configuration, the
  target as a dashed horizontal line.  Left: the whole run on a log axis.  Right: a zoom
  on the last ~40% of tokens with the y-axis around the target, as in the paper's figure
  -- the configurations differ by a few percent of tokens, which is invisible on the full
  view and is exactly where each curve crosses the target.  Each seed is a thin line; with
  two or more seeds the mean of log-perplexity (on the tokens every seed covers, linearly
  interpolated) is drawn bold in the same colour.  A diverged run ends in an ``x``.
* ``cost_<group>.png``: extra token cost versus FP8 per configuration (paired mean over
  seeds), with the 95% t-interval as error bars where n >= 2; configurations without a
  paired cost are listed under the axis instead of being drawn as zero.  Where seeds ran out
  of budget before the target, a hollow triangle marks the mean with those seeds counted at
  their bound (tokens seen / FP8 tokens - 1), a lower bound the bar alone would hide.

* ``eqcost_<model>_<data>[_g<hash>].png``: the equivalent-token cost (:mod:`.estimator`) versus
  tokens, per configuration the mean over seeds at each evaluation (the seeds whose loss there
  is inside the FP8 fit's range) with its 95% t band where two or more seeds have a value; the
  window the table averages is shaded.

PNG bytes are rendered into memory and written atomically like every report file
(the run-directory contract's writer).
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on login nodes and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .tables import atomic_write, group_title, groups  # noqa: E402

ZOOM_FRACTION = 0.4
LATE_FROM = 0.2


def group_slug(key: tuple) -> str:
    model, data, target, group = key
    # With several experiment groups the group's hash keeps their file names apart.
    tail = f"_g{group.split(':')[0]}" if group else ""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", f"{model}_{data}_ppl{target:g}{tail}")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def _mean_curve(curves: List[np.ndarray]):
    # The mean is only drawn where every seed has data, so it never extrapolates a seed.
    start = max(c[0, 0] for c in curves)
    end = min(c[-1, 0] for c in curves)
    grid = np.unique(np.concatenate([c[:, 0] for c in curves]))
    grid = grid[(grid >= start) & (grid <= end)]
    if len(grid) < 2:
        return None
    logs = [np.interp(grid, c[:, 0], np.log(c[:, 1])) for c in curves]
    return grid, np.exp(np.mean(logs, axis=0))


def plot_ppl(rows: List[dict], runs_by_dir: Dict[str, dict], target: float, title: str, path: Path) -> Path:
    fig, (ax_full, ax_zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xmax, zoom_vals, drawn, crossings = 0.0, [], [], []
    for i, row in enumerate(rows):
        color = colors[i % len(colors)]
        curves = []
        for d in row["run_dirs"]:
            run = runs_by_dir[d]
            c = np.asarray(run["curve"], dtype=float).reshape(-1, 2)
            c = c[np.isfinite(c).all(axis=1) & (c[:, 1] > 0)]
            if not len(c):
                continue
            curves.append(c)
            xmax = max(xmax, c[-1, 0])
            for ax in (ax_full, ax_zoom):
                ax.plot(c[:, 0], c[:, 1], color=color, lw=0.9, alpha=0.6)
                if run["status"] == "diverged":
                    ax.plot(c[-1, 0], c[-1, 1], "x", color=color, ms=7)
            if run["status"] == "reached":  # where this seed crossed the target (its tokens_to_target)
                ax_zoom.plot(run["tokens_to_target"], target, "o", color=color, ms=4)
                crossings.append(run["tokens_to_target"])
        if not curves:
            continue
        mean = _mean_curve(curves) if len(curves) > 1 else None
        x, y = mean if mean is not None else (curves[0][:, 0], curves[0][:, 1])
        label = f"{row['label']} (n={len(curves)})"
        # The bold mean only on the full view: with stop_at_target the seeds end at different
        # tokens, and in the zoom the crossings (dots) are what matters, not a truncated mean.
        ax_full.plot(x, y, color=color, lw=2.0 if mean is not None else 1.4, label=label)
        drawn.append(curves)
    # The zoom ends just past the last crossing: a run left going to max_tokens without
    # reaching the target would otherwise stretch the window away from where it matters.
    x1 = min(xmax, 1.08 * max(crossings)) if crossings else xmax
    x0 = (1.0 - ZOOM_FRACTION) * x1
    for curves in drawn:
        for c in curves:
            zoom_vals.extend(c[(c[:, 0] >= x0) & (c[:, 0] <= x1), 1])
    for ax in (ax_full, ax_zoom):
        ax.axhline(target, color="black", ls="--", lw=1.0, label=f"target {target:g}" if ax is ax_full else None)
        ax.set_xlabel("tokens")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    ax_full.set_yscale("log")
    ax_full.set_title(f"{title}: full run")
    if x1 > 0:
        ax_zoom.set_xlim(x0, x1)
    v = np.asarray(zoom_vals, dtype=float)
    v = v[np.isfinite(v)]
    lo = min(v.min(), target) if len(v) else target * 0.95
    hi = max(np.percentile(v, 80), target) if len(v) else target * 1.1
    # Around the target: wide enough to see each crossing, never stretched by a divergence.
    lo, hi = max(lo, target * 0.8), min(max(hi, target * 1.03), target * 1.5)
    pad = 0.05 * (hi - lo)
    ax_zoom.set_ylim(lo - pad, hi + pad)
    ax_zoom.set_title(f"last {ZOOM_FRACTION:.0%} of tokens, around the target")
    ax_full.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_cost(rows: List[dict], title: str, path: Path) -> Path:
    have = [r for r in rows if np.isfinite(r["cost_mean"])]
    missing = [r["label"] for r in rows if not np.isfinite(r["cost_mean"])]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(have) + 2), 4.2))
    x = np.arange(len(have))
    means = np.array([r["cost_mean"] for r in have]) * 100
    err = np.array([[r["cost_mean"] - r["cost_lo"], r["cost_hi"] - r["cost_mean"]] if np.isfinite(r["cost_lo"])
                    else [0.0, 0.0] for r in have]).T.reshape(2, -1) * 100
    bars = ax.bar(x, means, yerr=err, capsize=4, color="#4c72b0", ecolor="black")
    for b, r, m, up in zip(bars, have, means, err[1] if len(have) else []):
        ax.annotate(f"{m:+.1f}%\n(n={r['n_paired']})", (b.get_x() + b.get_width() / 2, max(m + up, 0)),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
    bound = np.array([r.get("cost_mean_bound", np.nan) for r in have], dtype=float) * 100
    if np.isfinite(bound).any():
        ax.scatter(x[np.isfinite(bound)], bound[np.isfinite(bound)], marker="^", facecolors="none",
                   edgecolors="#c44e52", zorder=3, label="lower bound on the mean, out-of-budget seeds at their bound")
        ax.legend(fontsize=7, loc="lower right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [r["label"] for r in have], rotation=30, ha="right")
    ax.set_ylabel("extra tokens to target vs FP8 (%)")
    ax.set_title(f"{title}\npaired by seed, 95% t-interval")
    ax.grid(axis="y", alpha=0.3)
    if missing:
        ax.text(0.0, -0.35, "no paired cost: " + ", ".join(missing), transform=ax.transAxes, fontsize=7)
    return _save(fig, path)


def write_plots(table: pd.DataFrame, runs: pd.DataFrame, out_dir) -> Dict[str, Path]:
    """All figures for all groups; returns {file name: path}."""
    out_dir = Path(out_dir)
    runs_by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    files = {}
    for key, rows in groups(table):
        slug = group_slug(key)
        # A post-hoc target says so in the figure too (short: the full reason is in report.md).
        title = group_title(key) + (" (post-hoc target)" if rows[0].get("target_posthoc") else "")
        for name, fn in ((f"ppl_{slug}.png", lambda p: plot_ppl(rows, runs_by_dir, key[2], title, p)),
                         (f"cost_{slug}.png", lambda p: plot_cost(rows, title, p))):
            files[name] = fn(out_dir / name)
    return files


def eq_slug(model: str, data: str, egroup: str) -> str:
    tail = f"_g{egroup.split(':')[0]}" if egroup else ""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", f"eqcost_{model}_{data}{tail}")


def plot_eq_cost(est, rows: List[dict], title: str, path: Path) -> Path:
    """Equivalent-token cost vs tokens: mean and 95% band over seeds per configuration."""
    from .estimator import cost_curve, target_or_none
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tmax = 0.0
    curves = []
    for i, row in enumerate(rows):
        if row["is_baseline"]:
            continue
        cc = cost_curve(est, row)
        if cc.empty:
            continue
        color = colors[i % len(colors)]
        target = target_or_none(row["target_ppl"])
        kind = ", fixed budget" if target is None else f", target {target:g}"
        if any(r["label"] == row["label"] and r is not row for r in rows):
            kind = " (fixed budget)" if target is None else " (target run)"
        ax.plot(cc["tokens"], cc["mean"] * 100, color=color, lw=1.6,
                label=f"{row['label']}{kind} (n={int(cc['n'].max())})")
        band = cc[cc["n"] >= 2]
        ax.fill_between(band["tokens"], band["lo"] * 100, band["hi"] * 100, color=color, alpha=0.15, lw=0)
        tmax = max(tmax, float(cc["tokens"].max()))
        curves.append(cc)
    # The y-range from the later part of training: in the first evaluations the FP8 loss is nearly
    # flat, D_eq is ill-conditioned there and its huge costs would flatten everything else.
    late = [v for cc in curves for c in ("mean", "lo", "hi")
            for v in cc.loc[cc["tokens"] >= LATE_FROM * tmax, c] if np.isfinite(v)]
    if late:
        lo, hi = min(min(late), 0.0) * 100, max(late) * 100
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        ax.text(0.01, 0.01, f"y-range from tokens >= {LATE_FROM:g} x the longest run (earlier, where FP8 loss is "
                "nearly flat, costs are ill-conditioned and may leave the axes)", transform=ax.transAxes,
                fontsize=6, va="bottom")
    a, b = est.window
    if tmax > 0:
        ax.axvspan(a * tmax, b * tmax, color="grey", alpha=0.08,
                   label=f"window {a:g}-{b:g} x tokens trained (longest run)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("equivalent-token cost vs FP8 (%)  = D / D_eq - 1")
    ax.set_title(f"{title}\nmean over seeds, 95% t band; evaluations outside the FP8 fit's range left out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def write_eq_plots(est, out_dir) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    files = {}
    if est is None or est.table.empty:
        return files
    for (model, data, eg), sub in est.table.groupby(["model", "data", "egroup"], sort=False):
        name = eq_slug(model, data, eg) + ".png"
        title = f"model={model}, data={data}" + (f", group {eg}" if eg else "")
        files[name] = plot_eq_cost(est, sub.to_dict("records"), title, out_dir / name)
    return files
