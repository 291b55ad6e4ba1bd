"""Does a short `fp4-ablate diagnose` rank configurations like full training runs do?

Input: a `diagnose.json` (one row per configuration: weight drift, error coherence, ...) and a
report's `table.csv` (one row per configuration: tokens-to-target cost `cost_mean`, equivalent-token
cost `eq_cost_mean`). Configurations are matched by name (`wgrad_sr` <-> ladder wgrad, stabilizer
sr; the FP8 baseline's cost is 0 by definition). Only configurations present in both count.

For each (diagnostic metric, full-run cost) pair: Spearman's rho (scipy.stats.spearmanr), a 95%
interval from Fisher's z with the Fieller-Hartley-Pearson variance 1.06 / (n - 3) (an
approximation; with n ~ 7 it is wide, which is the honest answer), and the exact two-sided
permutation p-value (all n! orderings for n <= 8). Higher metric = predicted costlier.

    python -m fp4_experiments.diagnostics.ranking DIAGNOSE_JSON TABLE_CSV [--metrics a,b] [--model M]

A table of several experiment groups (a report over several models) needs --model; rows of other
formats are their own configurations (nvfp4_wgrad, ufp4_wgrad), as the ablation cells name them.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from scipy import stats

DEFAULT_METRICS = ("weight_drift", "W_err_coherence", "dW_err_coherence", "wgrad.out.rel_err",
                   "mean.out.rel_err")
COSTS = ("cost_mean", "eq_cost_mean")


def config_name(ladder: str, stabilizer: str, fmt: str = "") -> str:
    """The ablation-group name of a table row: (wgrad, sr) -> wgrad_sr, (fp8, none) -> fp8, and a
    format other than the default MXFP4 as the cells name it: (wgrad, none, nvfp4) -> nvfp4_wgrad."""
    name = ladder if stabilizer in ("", "none") else f"{ladder}_{stabilizer}"
    return name if fmt in ("", "mxfp4") else f"{fmt}_{name}"


def diagnostic_metrics(diagnose: dict) -> Dict[str, Dict[str, float]]:
    """config -> metric -> value: the per-configuration rows plus GEMM-output errors (Wgrad, mean)."""
    out = {row["config"]: {k: v for k, v in row.items() if isinstance(v, (int, float))}
           for row in diagnose["configs"]}
    by_config: Dict[str, List[float]] = {}
    for row in diagnose["gemms"]:
        if "out.rel_err" not in row or row["config"] not in out:
            continue
        by_config.setdefault(row["config"], []).append(row["out.rel_err"])
        if row["gemm"] == "wgrad":
            out[row["config"]]["wgrad.out.rel_err"] = row["out.rel_err"]
    for config, errs in by_config.items():
        out[config]["mean.out.rel_err"] = sum(errs) / len(errs)
    return out


def full_run_costs(table_csv: Path, model: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """config -> cost column -> mean cost over seeds (FP8 baseline: 0), for one experiment group.

    A table of several groups (models, budgets) must be narrowed with `model` to one of them: costs
    of different experiments are never ranked together. Raises ValueError naming the choices."""
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if model is not None:
        chosen = [r for r in rows if r.get("model") == model]
        if not chosen:
            raise ValueError(f"--model {model!r}: not in {table_csv}; choose one of "
                             f"{', '.join(sorted({m for m, _ in _groups(rows)}))}")
        rows = chosen
    groups = _groups(rows)
    if len(groups) > 1:
        raise ValueError(f"{table_csv} holds {len(groups)} experiment groups ("
                         + "; ".join(f"model={m}" + (f" group {g.split(':')[0]}" if g else "") for m, g in groups)
                         + "): choose one with --model")
    costs: Dict[str, Dict[str, float]] = {}
    for row in rows:
        name = config_name(row["ladder"], row["stabilizer"], row.get("format", ""))
        if name in costs:
            raise ValueError(f"{table_csv}: two rows of configuration {name} in one group")
        entry = {}
        for col in COSTS:
            value = row.get(col, "")
            if value not in ("", None):
                entry[col] = float(value)
            elif row["ladder"] == "fp8" and row["stabilizer"] == "none" and col == "cost_mean":
                entry[col] = 0.0
        costs[name] = entry
    return costs


def _groups(rows: List[dict]) -> List[Tuple[str, str]]:
    """The (model, group label) pairs of a table's rows: its experiment groups."""
    return sorted({(r.get("model", ""), r.get("group", "")) for r in rows})


def fisher_interval(rho: float, n: int, level: float = 0.95) -> Tuple[float, float]:
    if n <= 3 or abs(rho) >= 1:
        return (float("nan"), float("nan")) if n <= 3 else (rho, rho)
    z, se = math.atanh(rho), math.sqrt(1.06 / (n - 3))
    q = stats.norm.ppf(0.5 + level / 2)
    return math.tanh(z - q * se), math.tanh(z + q * se)


def permutation_p(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Exact two-sided p of |rho| under all orderings of y (None past n = 8: too many)."""
    n = len(x)
    if n > 8:
        return None
    observed = abs(stats.spearmanr(x, y).statistic)
    hits = total = 0
    for perm in itertools.permutations(y):
        total += 1
        hits += abs(stats.spearmanr(x, perm).statistic) >= observed - 1e-12
    return hits / total


def rank_agreement(diagnose: dict, costs: Dict[str, Dict[str, float]],
                   metrics: Sequence[str] = DEFAULT_METRICS) -> List[dict]:
    diag = diagnostic_metrics(diagnose)
    rows = []
    for metric, cost in itertools.product(metrics, COSTS):
        names = [c for c in diag if metric in diag[c] and cost in costs.get(c, {})]
        x = [diag[c][metric] for c in names]
        y = [costs[c][cost] for c in names]
        if len(names) < 3:
            continue
        rho = float(stats.spearmanr(x, y).statistic)
        lo, hi = fisher_interval(rho, len(names))
        rows.append({"metric": metric, "cost": cost, "n": len(names), "rho": rho, "lo": lo, "hi": hi,
                     "p_perm": permutation_p(x, y), "configs": ",".join(names)})
    return rows


def to_markdown(rows: List[dict]) -> str:
    lines = ["| diagnostic | full-run cost | n | Spearman rho | 95% interval (Fisher z) | permutation p |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p = "" if r["p_perm"] is None else f"{r['p_perm']:.3f}"
        lines.append(f"| {r['metric']} | {r['cost']} | {r['n']} | {r['rho']:+.2f} | "
                     f"[{r['lo']:+.2f}, {r['hi']:+.2f}] | {p} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp4_experiments.diagnostics.ranking",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("diagnose_json", type=Path)
    parser.add_argument("table_csv", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--model", help="the experiment group's model, for a table of several groups")
    args = parser.parse_args(argv)
    try:
        costs = full_run_costs(args.table_csv, args.model)
    except ValueError as e:
        parser.error(str(e))
    rows = rank_agreement(json.loads(args.diagnose_json.read_text()), costs,
                          [m for m in args.metrics.split(",") if m])
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
