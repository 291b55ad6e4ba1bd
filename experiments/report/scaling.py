"""Scaling: how each configuration's equivalent-token cost changes with model size and tokens per parameter.

The same ablation grid run at several model sizes (llama-1m / 3m / 6m at ~12 tokens per
parameter) and at another tokens-per-parameter (llama-20m, 21M-token budget) gives one
experiment group per (model, budget); within each the estimator (:mod:`.estimator`) gives every
configuration an equivalent-token cost versus that group's FP8 run of the same seed.  This module
lines those costs up across groups.  It compares numbers that were each measured against their own
group's FP8 -- it never pairs a run of one group with a run of another.

**Definitions.**

* *Quantized parameters* ``P`` of a run: the weights of the linears whose GEMMs the recipe
  quantizes, i.e. of :func:`fp4_experiments.model.build_llama`'s ``quantized()`` linears: per
  decoder layer q and o (``h * h`` each), k and v (``h * kv_dim`` each, ``kv_dim = h / num_heads *
  num_kv_heads``), gate, up and down (``3 * h * intermediate_size``), times ``num_layers``; plus the
  output head (``vocab * h``) when ``model.quantize_head``.  The embedding is *not* counted even under
  ``model.quantize_embedding``: that fake-quantizes a lookup table, which feeds no GEMM.  This is
  exactly the ``linear_param_count`` summary.json records, which is used when present (it was
  counted on the built model); the formula, on the run's resolved config, is the fallback.
* *Tokens per parameter* of a table row: the mean over its runs (those whose cost entered the
  row) of ``tokens_seen / P`` -- what the cost's window refers to.  For fixed-budget runs that is
  the budget; runs stopped at a target stop earlier, so their tokens per parameter is partly an
  outcome of the configuration.  ``budget_per_param`` (``train.max_tokens / P``) is the design value.
* *Cost* of a row: the estimator's paired mean over seeds and its 95% t-interval.  One row per
  (configuration, experiment group).  FP8 itself has no row: it is each group's reference (cost 0
  by construction; a target FP8 row against its fixed-budget twin is repeatability, reported in
  the estimator's section).  A group without a usable FP8 curve has no costs and is listed as
  skipped.  When one group holds a configuration both as target and as fixed-budget runs (two
  estimator rows), the row with more seeds is kept (ties: the fixed-budget one) and the note says so.

**Trends: cost against log10 x.**  Per configuration, against ``x`` = quantized parameters with
the designed tokens per parameter held (points whose ``budget_per_param`` lies within a factor of
1.25 of the slice's smallest: the design value, because runs stopped at a target end at tokens
that differ by configuration and seed), or against ``x`` = tokens per parameter with the
quantized-parameter count held (equal counts): a least-squares line ``cost = a + b log10 x``.
Each slice is its own fit, so a size trend is never bent by a point trained on another budget.
Log x because sizes and budgets are designed and compared as ratios (1M, 3M, 6M; loss scaling
laws are power laws in both), so equal ratios should weigh equally; ``b`` is the change in cost
per tenfold x.  Points of one slice that differ in data are still fitted, and the fit's note names
the data labels.  Weights ``1/se_i^2``,
``se_i`` backed out of each point's interval (``(hi - lo) / (2 t_{0.975, n_i - 1})``), so a noisy
point moves the line less.  When any point of a fit has no interval (one seed), the fit is
unweighted and says so: mixing known and unknown uncertainties would give the one-seed points an
arbitrary weight.  The weights are taken as relative (the residual scatter sets their scale,
``s^2 = sum w r^2 / (n - 2)``), because the per-point intervals ignore anything that differs
between groups besides x; the slope's 95% interval is ``b +- t_{0.975, n-2} s / sqrt(Sxx_w)``.

**When no trend is fitted.**  With fewer than three distinct x values: two points always lie
exactly on a line, so the line would have zero residual scatter and no interval (n - 2 = 0 degrees
of freedom), and a slope through them is just the difference of the two costs, which the table
already shows.  The reason is returned instead of a slope.  Three points still leave one degree of
freedom (t = 12.7): the interval is honest and wide.

**The extrapolation is not a result.**  :func:`extrapolate` evaluates a fitted line at an x
outside what was measured (e.g. the paper's Llama 3.1 8B, 6.98e9 quantized parameters) with the
95% *prediction* interval of the line, ``+- t_{0.975, n-2} s sqrt(mean(1/w) + 1/sum(w) +
(X0 - Xbar_w)^2 / Sxx_w)`` (a new point as precise as the average measured one).  That interval
only holds if the cost stays linear in log x three decades beyond the data, which nothing measured
here can check -- learning-rate schedules, data and numerics all change with scale -- so every
such number is labelled EXTRAPOLATION, kept out of the table, and it is a prompt for a run at that
size, not a finding.

**Files** (:func:`write_files`): ``scaling.csv`` (the table), ``scaling_trends.csv`` (every fit or
its reason), ``scaling_extrapolation.csv`` (only when asked for), ``scaling_params.png`` and
``scaling_tokens_per_param.png``: cost on a log x axis, colour per configuration, marker per held
slice (so a point of another budget or size is never read as part of a trend), 95% error bars,
the fitted line dashed over its measured range only.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on login nodes and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..rundir import SUMMARY, atomic_write_bytes, read_json  # noqa: E402
from .estimator import Estimate, fmt_eq, target_or_none  # noqa: E402
from .runs import ReportError  # noqa: E402
from .stats import t_ppf  # noqa: E402

XS = ("params", "tokens_per_param")
X_COLUMN = {"params": "quantized_params", "tokens_per_param": "tokens_per_param"}
X_TITLE = {"params": "quantized-linear parameters", "tokens_per_param": "tokens per quantized parameter"}
SLICE_TOL = 1.25  # tokens per parameter within this factor count as "held" in a fit against params
MIN_DISTINCT_X = 3
PAPER_MODEL = "llama3.1-8b"
EXTRAPOLATION = "EXTRAPOLATION (not a measurement)"
COLUMNS = ("configuration", "rank", "ladder", "stabilizer", "format", "egroup_id", "egroup", "model", "data",
           "runs_kind", "quantized_params", "tokens_per_param", "budget_per_param", "eq_cost_mean", "eq_cost_lo",
           "eq_cost_hi", "eq_se", "n_seeds", "seeds", "note")
FIT_COLUMNS = ("configuration", "rank", "x", "held", "n_points", "n_x", "x_min", "x_max", "weighted", "slope",
               "slope_lo", "slope_hi", "intercept", "dof", "reason", "note", "_xbar", "_sxx", "_sumw", "_mean_var",
               "_s2")


# ----------------------------------------------------------------------------- parameter counts

def quantized_params(model: Mapping, vocab_size: Optional[int] = None) -> int:
    """Quantized-linear parameters of a model config (module doc); raises KeyError/ValueError."""
    h, inter, layers = int(model["hidden_size"]), int(model["intermediate_size"]), int(model["num_layers"])
    heads, kv_heads = int(model["num_heads"]), int(model["num_kv_heads"])
    kv_dim = h // heads * kv_heads
    n = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    if model.get("quantize_head"):
        if not vocab_size:
            raise ValueError("model.quantize_head is set but the vocabulary size is unknown")
        n += int(vocab_size) * h
    return n


def model_params(name_or_path: str) -> int:
    """Quantized-linear parameters of configs/model/<name>.yaml (or a YAML path), e.g. the paper's 8B."""
    import yaml
    import fp4_configs

    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = Path(fp4_configs.__file__).resolve().parent / "model" / f"{name_or_path}.yaml"
    return quantized_params(yaml.safe_load(p.read_text()))


def run_params(run: Mapping) -> int:
    """A run's quantized parameters: summary.json's linear_param_count, else the config formula."""
    n = (read_json(Path(run["run_dir"]) / SUMMARY) or {}).get("linear_param_count")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    g = run["group_dict"]
    model = {k[len("model."):]: v for k, v in g.items() if k.startswith("model.")}
    try:
        return quantized_params(model, g.get("tokenizer.vocab_size"))
    except (KeyError, ValueError, TypeError) as e:
        raise ReportError(f"{run['run']}: cannot count its quantized parameters from config.yaml ({e})") from None


# ----------------------------------------------------------------------------- the table

def _se(lo: float, hi: float, n: int) -> float:
    """Standard error behind a 95% t-interval of n values (NaN below two)."""
    if n is None or n < 2 or not (np.isfinite(lo) and np.isfinite(hi)):
        return math.nan
    return (hi - lo) / (2.0 * t_ppf(0.975, n - 1))


def _runs_kind(target) -> str:
    return "fixed budget" if target_or_none(target) is None else f"target ppl {target:g}"


def _pick(sub: pd.DataFrame) -> tuple:
    """Of one configuration's estimator rows in one group, the one kept (module doc) and a note."""
    recs = sorted(sub.to_dict("records"),
                  key=lambda r: (-int(r["eq_n"]), _runs_kind(r["target_ppl"]) != "fixed budget"))
    note = "; ".join(f"{_runs_kind(r['target_ppl'])} row (n={r['eq_n']}) not used" for r in recs[1:])
    return recs[0], note


def _table_row(r: dict, note: str, est: Estimate, by_dir: Mapping[str, dict]) -> dict:
    missing = [d for d in r["run_dirs"] if d not in by_dir]
    if missing:
        raise ReportError(f"scaling_table: {len(missing)} run(s) of the estimate are not in `runs` (pass the "
                          f"runs the estimate was made from), e.g. {Path(missing[0]).name}")
    recs = [by_dir[d] for d in r["run_dirs"]]
    params = {run_params(x) for x in recs}
    if len(params) != 1:
        raise ReportError(f"{r['label']} in {r['egroup'] or r['model']}: runs of one group disagree on the "
                          f"quantized parameter count {sorted(params)}")
    p = params.pop()
    costed = [x for x in recs if x["run_dir"] in est.per_run and np.isfinite(est.per_run[x["run_dir"]].mean)]
    tokens = [float(x["tokens_seen"]) for x in (costed or recs) if x.get("tokens_seen")]
    budget = next((float(x["max_tokens"]) for x in recs if x.get("max_tokens")), math.nan)
    return {"configuration": r["label"], "rank": r["rank"], "ladder": r["ladder"], "stabilizer": r["stabilizer"],
            "format": r["format"], "egroup_id": r["egroup_id"], "egroup": r["egroup"], "model": r["model"],
            "data": r["data"], "runs_kind": _runs_kind(r["target_ppl"]), "quantized_params": p,
            "tokens_per_param": float(np.mean(tokens)) / p if tokens else math.nan, "budget_per_param": budget / p,
            "eq_cost_mean": r["eq_cost_mean"], "eq_cost_lo": r["eq_cost_lo"], "eq_cost_hi": r["eq_cost_hi"],
            "eq_se": _se(r["eq_cost_lo"], r["eq_cost_hi"], r["eq_n"]), "n_seeds": int(r["eq_n"]),
            "seeds": sorted(r["per_seed"]), "note": note}


def scaling_table(est: Estimate, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, experiment group with an FP8 baseline): COLUMNS (module doc).

    ``runs``: the DataFrame the estimate was made from (``load_runs(..., include_completed=True)``).
    ``.attrs["skipped"]``: the groups left out, with why."""
    t = est.table
    if t.empty:
        out = pd.DataFrame(columns=list(COLUMNS))
        out.attrs["skipped"] = []
        return out
    by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    based = set(t.loc[t["is_baseline"].astype(bool), "egroup_id"])
    skipped = [f"{g['model'].iloc[0]}" + (f" ({g['egroup'].iloc[0]})" if g["egroup"].iloc[0] else "")
               + ": no FP8 run with a usable curve, so no cost" for e, g in t.groupby("egroup_id", sort=False)
               if e not in based]
    rows = [_table_row(*_pick(sub), est, by_dir)
            for (e, _), sub in t[t["ladder"] != "fp8"].groupby(["egroup_id", "label"], sort=False) if e in based]
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    if len(out):
        out = out.sort_values(["rank", "quantized_params", "tokens_per_param"], kind="stable").reset_index(drop=True)
    out.attrs["skipped"] = skipped
    return out


def has_points(table: pd.DataFrame) -> bool:
    """Whether there is anything to scale: costs in two or more experiment groups."""
    return bool(len(table)) and table.loc[np.isfinite(table["eq_cost_mean"].astype(float)), "egroup_id"].nunique() > 1


# ----------------------------------------------------------------------------- the fit

def wls(x: Sequence[float], y: Sequence[float], w: Sequence[float]) -> dict:
    """Weighted least squares y = a + b x with relative weights (module doc); needs >= 3 points."""
    x, y, w = (np.asarray(v, dtype=float) for v in (x, y, w))
    sumw = w.sum()
    xbar, ybar = (w * x).sum() / sumw, (w * y).sum() / sumw
    sxx = (w * (x - xbar) ** 2).sum()
    b = (w * (x - xbar) * (y - ybar)).sum() / sxx
    a = ybar - b * xbar
    dof = len(x) - 2
    s2 = float((w * (y - a - b * x) ** 2).sum() / dof)
    half = t_ppf(0.975, dof) * math.sqrt(s2 / sxx)
    return {"slope": float(b), "slope_lo": float(b - half), "slope_hi": float(b + half), "intercept": float(a),
            "dof": dof, "_xbar": float(xbar), "_sxx": float(sxx), "_sumw": float(sumw),
            "_mean_var": float(np.mean(1.0 / w)), "_s2": s2}


def _slices(held: np.ndarray, tol: float) -> List[np.ndarray]:
    """Indices grouped so that each slice's held values lie within a factor tol of its smallest."""
    order = np.argsort(held, kind="stable")
    out: List[List[int]] = []
    for i in order:
        if out and held[i] <= held[out[-1][0]] * tol:
            out[-1].append(int(i))
        else:
            out.append([int(i)])
    return [np.array(s) for s in out]


def _held_text(x: str, held: np.ndarray) -> str:
    if x == "tokens_per_param":
        return f"quantized params {int(held[0]):,}"
    lo, hi = float(held.min()), float(held.max())
    return f"budget/param {lo:.3g}" + (f"-{hi:.3g}" if f"{hi:.3g}" != f"{lo:.3g}" else "")


def _fit_one(label: str, rank, x: str, pts: pd.DataFrame, held: np.ndarray) -> dict:
    xs = pts[X_COLUMN[x]].to_numpy(float)
    y, se = pts["eq_cost_mean"].to_numpy(float), pts["eq_se"].to_numpy(float)
    weighted = bool(np.all(np.isfinite(se) & (se > 0)))
    n_x = len(np.unique(xs))
    row = dict.fromkeys(FIT_COLUMNS, math.nan)
    row.update(configuration=label, rank=rank, x=x, held=_held_text(x, held), n_points=len(xs), n_x=n_x,
               x_min=float(xs.min()), x_max=float(xs.max()), weighted=weighted, reason="", note="")
    if pts["data"].nunique() > 1:
        row["note"] = f"points differ in data ({', '.join(sorted(pts['data'].unique()))}); "
    if n_x < MIN_DISTINCT_X:
        row["reason"] = f"{n_x} distinct x, needs {MIN_DISTINCT_X}"
        return row
    if not weighted:
        row["note"] += (f"unweighted: {int((~np.isfinite(se) | (se <= 0)).sum())} of {len(xs)} points have no "
                        "95% interval (one seed), so every point counts equally")
    row.update(wls(np.log10(xs), y, 1.0 / se ** 2 if weighted else np.ones_like(y)))
    return row


def _held(sub: pd.DataFrame, x: str) -> np.ndarray:
    """What a fit against x holds fixed: the parameter count, or the designed tokens per parameter
    (budget / params, which runs stopped at a target share; tokens_per_param where no budget is known)."""
    if x == "tokens_per_param":
        return sub["quantized_params"].to_numpy(float)
    budget = sub["budget_per_param"].to_numpy(float)
    return np.where(np.isfinite(budget), budget, sub["tokens_per_param"].to_numpy(float))


def trend(table: pd.DataFrame, x: str = "params", tol: float = SLICE_TOL) -> pd.DataFrame:
    """Per configuration and slice of the held variable, the fit of cost against log10 x, or the reason
    there is none (column ``reason``, "" where there is a line); FIT_COLUMNS.  ``x``: "params" (budget
    per parameter held within a factor ``tol``) or "tokens_per_param" (parameter count held exactly)."""
    if x not in XS:
        raise ValueError(f"x must be one of {XS}, got {x!r}")
    rows = []
    ok = table[np.isfinite(table["eq_cost_mean"].astype(float)) & (table[X_COLUMN[x]].astype(float) > 0)]
    for label, sub in ok.groupby("configuration", sort=False):
        held = _held(sub, x)
        for idx in _slices(held, tol if x == "params" else 1.0):
            rows.append(_fit_one(label, sub["rank"].iloc[0], x, sub.iloc[idx], held[idx]))
    out = pd.DataFrame(rows, columns=list(FIT_COLUMNS))
    if len(out):
        out = out.sort_values("rank", kind="stable").reset_index(drop=True)
    return out


def _fitted(fits: pd.DataFrame, **match) -> List[dict]:
    """The rows of ``fits`` that have a line (and match every column=value given)."""
    if not len(fits):
        return []
    keep = np.isfinite(fits["slope"].astype(float))
    for col, v in match.items():
        keep &= fits[col] == v
    return fits[keep].to_dict("records")


def extrapolate(fits: pd.DataFrame, at: float, name: str = "", x: str = "params") -> pd.DataFrame:
    """Each line of ``fits`` against ``x`` evaluated at x = ``at`` with its 95% prediction interval
    (module doc), labelled EXTRAPOLATION when ``at`` is outside the fit's measured x range."""
    rows = []
    for f in _fitted(fits, x=x):
        x0 = math.log10(at)
        pred = f["intercept"] + f["slope"] * x0
        half = t_ppf(0.975, f["dof"]) * math.sqrt(
            f["_s2"] * (f["_mean_var"] + 1.0 / f["_sumw"] + (x0 - f["_xbar"]) ** 2 / f["_sxx"]))
        inside = f["x_min"] <= at <= f["x_max"]
        rows.append({"configuration": f["configuration"], "x": f["x"], "held": f["held"], "at": float(at),
                     "at_name": name, "kind": "interpolation" if inside else EXTRAPOLATION,
                     "measured_range": f"{f['x_min']:.3g}-{f['x_max']:.3g}", "cost": pred,
                     "pred_lo": pred - half, "pred_hi": pred + half})
    return pd.DataFrame(rows, columns=["configuration", "x", "held", "at", "at_name", "kind", "measured_range",
                                       "cost", "pred_lo", "pred_hi"])


# ----------------------------------------------------------------------------- output

def _pct(v: float) -> str:
    return f"{v * 100:+.2f}" if np.isfinite(v) else "n/a"


def _table_md(table: pd.DataFrame) -> str:
    from tabulate import tabulate
    # The group's hash only where model and budget do not tell two groups apart (e.g. another lr).
    ambiguous = table.groupby(["model", "budget_per_param"], dropna=False)["egroup_id"].nunique().max() > 1
    body = [{"configuration": r["configuration"], "model": r["model"], "runs": r["runs_kind"],
             **({"group": r["egroup_id"]} if ambiguous else {}),
             "quantized params": f"{r['quantized_params']:,}", "tokens/param": f"{r['tokens_per_param']:.3g}",
             "budget/param": f"{r['budget_per_param']:.3g}",
             "equivalent-token cost": fmt_eq(r["eq_cost_mean"], r["eq_cost_lo"], r["eq_cost_hi"], r["n_seeds"]),
             "note": r["note"]} for r in table.to_dict("records")]
    return tabulate(body, headers="keys", tablefmt="github", disable_numparse=True)


def _fits_md(fits: pd.DataFrame) -> str:
    """The trends; one-point slices (nothing to fit, the table shows the point) only counted."""
    from tabulate import tabulate
    body = []
    for f in fits[fits["n_points"] > 1].to_dict("records"):
        slope = (f"no fit: {f['reason']}" if not np.isfinite(f["slope"]) else
                 f"{_pct(f['slope'])} [{_pct(f['slope_lo'])}, {_pct(f['slope_hi'])}]")
        body.append({"configuration": f["configuration"], "against": X_TITLE[f["x"]], "held": f["held"],
                     "points (distinct x)": f"{f['n_points']} ({f['n_x']})",
                     "slope of cost (percentage points per tenfold x)": slope,
                     "note": f["note"]})
    parts = [tabulate(body, headers="keys", tablefmt="github", disable_numparse=True) + "\n"] if body else []
    for x, n in fits[fits["n_points"] == 1].groupby("x", sort=False).size().items():
        parts.append(f"Against {X_TITLE[x]}: {n} configuration/held-value pair(s) with a single point, no trend.\n")
    return "\n".join(parts)


def _predictions_md(pred: pd.DataFrame) -> str:
    from tabulate import tabulate
    body = [{"configuration": p["configuration"], "line": f"{X_TITLE[p['x']]}, {p['held']}",
             "at": f"{p['at_name'] + ' ' if p['at_name'] else ''}{p['at']:.3g}", "measured": p["measured_range"],
             "kind": p["kind"], "cost [95% prediction interval]":
                 f"{_pct(p['cost'])}% [{_pct(p['pred_lo'])}, {_pct(p['pred_hi'])}]"} for p in pred.to_dict("records")]
    return tabulate(body, headers="keys", tablefmt="github", disable_numparse=True)


def to_markdown(table: pd.DataFrame, fits: Sequence[pd.DataFrame] = (), predictions: Optional[pd.DataFrame] = None,
                heading_level: int = 2) -> str:
    """The report section: the per-group costs, the trends (or why none), any extrapolation apart."""
    h = "#" * heading_level
    parts = [f"{h} Scaling: cost versus model size and tokens per parameter\n",
             "Each row: one configuration in one experiment group (model, budget), its equivalent-token cost "
             "against that group's own FP8 runs (paired by seed; mean, 95% t-interval). Quantized params: the "
             "weights of the quantized linears (decoder q/k/v/o and MLP, plus the head if quantized). "
             "Tokens/param: tokens the row's runs trained / quantized params (budget/param: train.max_tokens / "
             "quantized params). Trend: weighted least squares of cost against log10 x (weights 1/se^2 from "
             "each point's interval), slope per tenfold x with a 95% t-interval on n-2 degrees of freedom, per "
             "configuration and held value (against params: budget/param within a factor 1.25; against "
             "tokens/param: the same quantized params). No fit below 3 distinct x: through 2 points a line "
             "fits exactly and leaves no scatter to give it an interval.\n"]
    if table.empty:
        return "\n".join(parts + ["No configuration has a cost in a group with an FP8 baseline.\n"])
    parts.append(_table_md(table) + "\n")
    skipped = table.attrs.get("skipped") or []
    if skipped:
        parts.append("Groups left out: " + "; ".join(skipped) + "\n")
    fits = [f for f in fits if len(f)]
    if fits:
        parts.append(_fits_md(pd.concat(fits, ignore_index=True)))
    if predictions is not None and len(predictions):
        parts += [f"{h}# {EXTRAPOLATION}\n",
                  "The fitted lines evaluated outside the measured range, with their 95% prediction interval. "
                  "Valid only if the cost stays linear in log x that far beyond the data, which these runs "
                  "cannot check: not a result, a reason to run that size.\n",
                  _predictions_md(predictions) + "\n"]
    return "\n".join(parts)


def to_csv(df: pd.DataFrame) -> str:
    """Any frame of this module (table, concatenated fits, predictions) as CSV: internals dropped,
    lists joined with ';', numbers unformatted."""
    flat = df.drop(columns=[c for c in df.columns if c.startswith("_") or c == "rank"])
    flat = flat.apply(lambda col: col.map(lambda v: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v))
    buf = io.StringIO()
    flat.to_csv(buf, index=False)
    return buf.getvalue()


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _held_markers(table: pd.DataFrame, x: str) -> tuple:
    """A marker per slice of the held value (as :func:`trend` slices it), so points trained on another
    budget, or of another size, are never read as one trend: ([key per row], {key: marker})."""
    held = _held(table, x)
    keys = [""] * len(table)
    for i, idx in enumerate(_slices(held, SLICE_TOL if x == "params" else 1.0)):
        key = _held_text(x, held[idx])
        for j in idx:
            keys[j] = key
    order = list(dict.fromkeys(keys[j] for j in np.argsort(held, kind="stable")))
    return keys, {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(order)}


def plot(table: pd.DataFrame, fits: pd.DataFrame, x: str, path: Path) -> Path:
    """Cost versus x (log axis): colour = configuration, marker = held value, 95% error bars, fitted lines
    (dashed) where a fit exists."""
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys, markers = _held_markers(table, x)
    labels = list(dict.fromkeys(table["configuration"]))
    for j, r in enumerate(table.to_dict("records")):
        i = labels.index(r["configuration"])
        dodge = 10 ** (0.012 * (i - (len(labels) - 1) / 2))  # configurations side by side at one x
        y, lo, hi = (100 * float(r[k]) for k in ("eq_cost_mean", "eq_cost_lo", "eq_cost_hi"))
        err = [[y - lo], [hi - y]] if np.isfinite(lo) else None
        ax.errorbar([r[X_COLUMN[x]] * dodge], [y], yerr=err, fmt=markers[keys[j]], color=colors[i % len(colors)],
                    capsize=3)
    for i, label in enumerate(labels):
        for f in _fitted(fits, configuration=label):
            gx = np.geomspace(f["x_min"], f["x_max"], 20)
            ax.plot(gx, (f["intercept"] + f["slope"] * np.log10(gx)) * 100, "--", color=colors[i % len(colors)])
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2, label=lab) for i, lab in enumerate(labels)]
    handles += [Line2D([], [], color="0.3", marker=m, ls="", label=k) for k, m in markers.items()]
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(X_TITLE[x] + " (log; configurations offset slightly)")
    ax.set_ylabel("equivalent-token cost vs FP8 (%)")
    ax.set_title(f"cost versus {X_TITLE[x]} (dashed: fit, 3+ distinct x only)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_files(out_dir: Path, table: pd.DataFrame, fits: Sequence[pd.DataFrame] = (),
                predictions: Optional[pd.DataFrame] = None) -> Dict[str, Path]:
    """scaling.csv, scaling_trends.csv, scaling_extrapolation.csv and scaling_<x>.png into out_dir."""
    out_dir = Path(out_dir)
    if table.empty:
        return {}
    files = {"scaling.csv": atomic_write_bytes(out_dir / "scaling.csv", to_csv(table).encode())}
    fits = [f for f in fits if len(f)]
    all_fits = pd.concat(fits, ignore_index=True) if fits else pd.DataFrame(columns=list(FIT_COLUMNS))
    if len(all_fits):
        files["scaling_trends.csv"] = atomic_write_bytes(out_dir / "scaling_trends.csv", to_csv(all_fits).encode())
    if predictions is not None and len(predictions):
        files["scaling_extrapolation.csv"] = atomic_write_bytes(out_dir / "scaling_extrapolation.csv",
                                                                to_csv(predictions).encode())
    for x in XS:
        name = f"scaling_{x}.png"
        files[name] = plot(table, all_fits[all_fits["x"] == x] if len(all_fits) else all_fits, x, out_dir / name)
    return files
