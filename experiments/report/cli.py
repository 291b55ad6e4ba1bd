"""`fp4-ablate report [RESULTS_DIR]`: argument parsing for make_report; errors become messages."""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from . import ReportError, make_report
from .estimator import parse_window
from .posthoc import parse_target
from .runs import DEFAULT_RESULTS_DIR
from .stats import UNPAIRED_CHOICES


def _parse_step_speedup(ap: argparse.ArgumentParser, items: Optional[List[str]]):
    """None, one ratio for every FP4 configuration, or {KEY: ratio} ('*' for the rest)."""
    if not items:
        return None
    gains: Dict[str, float] = {}
    for item in items:
        key, _, value = item.rpartition("=")
        key = key.strip() or "*"
        try:
            ratio = float(value)
        except ValueError:
            ap.error(f"--step-speedup {item!r}: {value!r} is not a number (a ratio such as 1.20, "
                     f"or KEY=1.20 with KEY a ladder such as wgrad, or wgrad+h16)")
        if not ratio > 0:
            ap.error(f"--step-speedup {item!r}: the gain must be > 0 (a ratio, e.g. 1.20)")
        if key in gains:
            ap.error(f"--step-speedup gives {key!r} twice")
        gains[key] = ratio
    return gains["*"] if list(gains) == ["*"] else gains


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fp4-ablate report",
        description="The token-cost table (markdown, CSV, LaTeX) and plots of the runs under "
                    "RESULTS_DIR: tokens to target with 95%% intervals over seeds, extra-token "
                    "cost paired by seed against the FP8 baseline, step-throughput gain and net "
                    "speedup.")
    ap.add_argument("results_dir", nargs="*", default=[str(DEFAULT_RESULTS_DIR)],
                    help="directory of run directories (default: results/runs); several are read as one "
                         "set (each experiment group still its own table; the scaling section spans them)")
    ap.add_argument("--out", help="report directory (default: RESULTS_DIR/../report)")
    ap.add_argument("--profile", action="append", dest="profiles", metavar="NAME",
                    help="hardware profile for the modeled step gain (configs/hardware/profile/"
                         "NAME.yaml or a YAML path); repeat for several (default: mi355x, b200)")
    ap.add_argument("--step-speedup", action="append", metavar="[KEY=]X",
                    help="a measured step-throughput gain to use instead (ratio: 1.20 = +20%%); "
                         "KEY=X for one configuration (KEY: a ladder such as wgrad, which covers its "
                         "stabilizers, or wgrad+h16, or * for the rest); repeat for several")
    ap.add_argument("--throughput", metavar="BENCH.json",
                    help="isolated tokens/s per configuration (an `fp4-ablate bench` JSON) for the "
                         "modeled gain; needed when the runs shared a GPU (sweep.jobs_per_gpu > 1)")
    ap.add_argument("--eq-window", default="0.5,1.0", metavar="A,B",
                    help="equivalent-token cost: average each run's evaluations in [A, B] x the tokens it "
                         "trained, 0 <= A <= B <= 1 (default %(default)s: the last half; 0,1: every "
                         "evaluation; 0.9,1: the end only; 1,1: the final evaluation only)")
    ap.add_argument("--target-ppl", metavar="T|calibrate[:F]",
                    help="post-hoc target for the runs trained without one (fixed budget): their tokens to "
                         "target at perplexity T, interpolated on their validation curve as training does; "
                         "calibrate[:F]: T per experiment group by `fp4-ablate calibrate --fraction F`'s rule "
                         "over its FP8 runs (default F 0.7). Runs trained with a target keep theirs")
    ap.add_argument("--unpaired", choices=UNPAIRED_CHOICES, default="error",
                    help="runs with no FP8 run of their experiment group and seed: error (default) or "
                         "exclude (leave them out, listed with the excluded runs: a ladder in progress)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    args = ap.parse_args(argv)
    step_speedup = _parse_step_speedup(ap, args.step_speedup)
    try:
        eq_window = parse_window(args.eq_window)
    except ValueError as e:
        ap.error(f"--eq-window {e}")
    # Checked here, before anything is read or written: a bad value exits 2 with the usage.
    try:
        target = parse_target(args.target_ppl) if args.target_ppl is not None else None
    except ValueError as e:
        ap.error(f"--target-ppl {e}")
    try:
        report = make_report(args.results_dir, out_dir=args.out,
                             profiles=tuple(args.profiles or ("mi355x", "b200")),
                             step_speedup=step_speedup, wandb=args.wandb,
                             throughput=args.throughput, eq_window=eq_window, target_ppl=target,
                             unpaired=args.unpaired)
    except ReportError as err:
        print(f"fp4-ablate report: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"\nwritten to {report.out_dir}: " + ", ".join(sorted(report.files)))
    return 0
