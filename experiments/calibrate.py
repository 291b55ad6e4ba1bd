"""`fp4-ablate calibrate`: derive the perplexity target from FP8 baseline runs, once.

The paper's target is a validation perplexity the FP8 baseline reaches late in training; a
rung's cost is how many more tokens it needs to reach the same value. To choose it for a new
model and data set without tuning toward any answer:

1. run the FP8 baseline with no target over the full budget, for every seed
   (`fp4-ablate sweep +ladder=fp8 train.target_ppl=null sweep.seeds=5 ...`);
2. `fp4-ablate calibrate RESULTS_DIR --fraction 0.7` reads each of those runs' validation curve,
   takes its perplexity at 70% of the token budget (interpolated linearly in log-perplexity
   between the two evaluations around it, the same rule the training loop uses for crossings),
   and averages over seeds in log space (a geometric mean: perplexities are exponentials);
3. it prints the override, e.g. `train.target_ppl=41.87`, and writes `calibration.json`
   beside the runs; use that target, fixed, for every configuration of the sweep.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .rundir import RunDirError, Status, atomic_write_json, load_run, run_dirs


def ppl_at(evals: List[Dict], tokens: float) -> Optional[float]:
    """Validation perplexity at `tokens`, linear in log-ppl between the evaluations around it."""
    pts = sorted((e["tokens"], e["val_ppl"]) for e in evals)
    for (t0, p0), (t1, p1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            if t1 == t0:
                return p1
            w = (tokens - t0) / (t1 - t0)
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return None


class CalibrationError(SystemExit):
    """Calibration impossible; the message says why (the CLI exits 2 with it)."""


def target_from(ppls: List[float]) -> float:
    """The target of a set of FP8 perplexities: their geometric mean (perplexities are exponentials),
    rounded to the 2 decimals calibrate prints in its override."""
    return round(math.exp(sum(math.log(p) for p in ppls) / len(ppls)), 2)


def calibrate(results_dir: Path, fraction: float = 0.7, model: Optional[str] = None,
              data: Optional[str] = None) -> Dict:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise CalibrationError(f"fp4-ablate calibrate: no such directory: {results_dir}")
    rows, skipped = [], []
    for run_dir in run_dirs(results_dir):
        run = run_dir.name
        try:
            rec = load_run(run_dir)  # the run-directory contract's reader (version 1 and 2)
        except RunDirError as e:
            if run.startswith("fp8-"):
                skipped.append(f"{run}: {e}")
            continue
        s = rec.summary
        if s.ladder != "fp8" or s.stabilizer != "none":
            continue
        if (model and s.model != model) or (data and s.data != data):
            continue
        if s.target_ppl is not None or s.status != Status.completed:
            skipped.append(f"{run}: status {s.status}, target {s.target_ppl} "
                           "(calibration needs FP8 runs over the full budget with no target)")
            continue
        at = fraction * s.max_tokens
        p = ppl_at(rec.metrics.evals, at)
        if p is None:
            skipped.append(f"{run}: no evaluations around {at:,.0f} tokens")
            continue
        rows.append({"run": run, "seed": s.seed, "model": s.model, "data": s.data,
                     "max_tokens": s.max_tokens, "ppl": p})
    if not rows:
        raise CalibrationError("fp4-ablate calibrate: no usable FP8 runs in "
                               f"{results_dir}" + "".join(f"\n  skipped {x}" for x in skipped))
    groups = {(r["model"], r["data"], r["max_tokens"]) for r in rows}
    if len(groups) > 1:
        raise CalibrationError("fp4-ablate calibrate: FP8 runs of several configurations "
                               f"{sorted(groups)}; choose one with --model/--data")
    return {"target_ppl": target_from([r["ppl"] for r in rows]), "fraction": fraction, "runs": rows,
            "skipped": skipped, "model": rows[0]["model"], "data": rows[0]["data"],
            "max_tokens": rows[0]["max_tokens"]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fp4-ablate calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", nargs="?", default="results/runs")
    ap.add_argument("--fraction", type=float, default=0.7,
                    help="fraction of the token budget at which the FP8 perplexity is read (0.7)")
    ap.add_argument("--model", help="only runs of this model config")
    ap.add_argument("--data", help="only runs of this data label")
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1:
        ap.error(f"--fraction={args.fraction} must be in (0, 1]")
    try:
        result = calibrate(Path(args.results_dir), args.fraction, args.model, args.data)
    except CalibrationError as err:
        print(err.code, file=sys.stderr)
        return 2
    for r in result["runs"]:
        print(f"  seed {r['seed']}: ppl {r['ppl']:.3f} at {args.fraction:.0%} of "
              f"{r['max_tokens']:,} tokens ({r['run']})")
    for s in result["skipped"]:
        print(f"  skipped {s}", file=sys.stderr)
    out = Path(args.results_dir) / "calibration.json"
    atomic_write_json(out, result)
    print(f"target (geometric mean over {len(result['runs'])} FP8 runs): "
          f"train.target_ppl={result['target_ppl']}\nwritten to {out}")
    return 0
