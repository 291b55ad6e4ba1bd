"""``fp4-ablate report``: the token-cost table, figures and provenance of an ablation sweep.

Pipeline (each step its own module, each testable on synthetic run directories):

1. :mod:`.runs` loads every run directory under ``results_dir`` (docs/design.md section 2),
   keeps the valid finished ones and lists the rest -- corrupt, failed, duplicated or
   still running -- by name with the reason.  None of those enters a statistic.
2. :mod:`.stats` computes per configuration and target: tokens to target (mean, 95%
   t-interval), the extra token cost versus the FP8 baseline *paired by seed*, n/N
   converged.  A missing baseline raises :class:`MissingBaselineError`; runs of one
   model/data with different targets become separate groups with a warning.
3. :mod:`.contrasts` pairs configurations by seed: each ladder step against the rung below it,
   each stabilizer against plain wgrad, h16_all against h16, nvfp4 against mxfp4 and ufp4 against
   ufp4_e2m1 -- on tokens to target (contrasts.csv) and on the equivalent-token cost
   (eq_contrasts.csv, so fixed-budget runs get contrasts too), each a section of report.md.
4. :mod:`.throughput` attaches the step-throughput gain (measured / modeled on hardware
   profiles / user) and the net speedup = gain / (1 + cost).
5. :mod:`.estimator` computes the equivalent-token cost of every finished run -- fixed-budget
   runs without a target included -- against the FP8 curve of its seed (columns ``eq_cost_*``
   of the table, its own section, ``eq_cost.csv`` and the cost-versus-tokens plot).
6. :mod:`.tables` and :mod:`.plots` write table.md / table.csv / table.tex and PNGs;
   ``report.json`` records the provenance (run dirs, their commits and devices, the
   command).  With ``wandb=True`` the table and figures are logged to Weights & Biases
   (honours WANDB_MODE=offline and WANDB_DIR).
7. :mod:`.scaling`, when two or more experiment groups have costs (e.g. one model size each at
   a fixed number of tokens per parameter): each configuration's cost against the quantized-linear
   parameter count and against tokens per parameter, a trend only where three or more sizes
   support one, and any prediction at the paper's size labelled as an extrapolation.

A post-hoc target (``target_ppl``, ``--target-ppl``) gives the fixed-budget runs a tokens to
target before step 2 (:func:`.posthoc.apply_posthoc_target`); the estimator still sees them as the
fixed-budget runs they are.

Every error raised on purpose derives from :class:`ReportError`, so the CLI can print
the message instead of a traceback.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .posthoc import PosthocTarget, apply_posthoc_target, parse_target
from .runs import DEFAULT_RESULTS_DIR, Issue, ReportError, ResultsDirs, load_runs
from .scaling import (PAPER_MODEL, extrapolate, has_points, model_params, scaling_table, trend,
                      to_markdown as scaling_markdown, write_files as scaling_files)
from .stats import UNPAIRED, UNPAIRED_CHOICES, MissingBaselineError, summarize, without_baseline
from .throughput import HardwareProfileError, add_throughput, load_isolated_throughput
from .tables import atomic_write, has_gains, to_csv, to_markdown, write_tables
from ..rundir import process_umask
from .plots import write_eq_plots, write_plots
from .estimator import DEFAULT_WINDOW, parse_window, attach as attach_eq, estimate, to_csv as eq_csv, to_markdown as eq_markdown
from .contrasts import (contrasts, eq_contrasts, eq_to_csv, eq_to_markdown, to_csv as contrasts_csv,
                        to_markdown as contrasts_markdown)
from ..diagnostics.summary import diagnostics_summary

__all__ = ["make_report", "Report", "ReportError", "MissingBaselineError", "HardwareProfileError", "NoRunsError",
           "load_runs", "Issue"]


class NoRunsError(ReportError):
    """No finished, valid run to report on (the message lists what was found instead)."""


class Report(str):
    """The report's Markdown (this object *is* the string) plus what was produced.

    Attributes: ``markdown`` (str), ``out_dir`` (Path), ``files`` ({name: Path}),
    ``table`` (DataFrame, one row per configuration, numeric), ``runs`` (valid runs),
    ``issues`` (excluded or incomplete run dirs), ``warnings`` (list of str),
    ``wandb_dir`` (offline run directory or None), ``estimate`` (the :class:`.estimator.Estimate`),
    ``contrasts`` / ``eq_contrasts`` (the paired contrasts on tokens to target -- absent from a
    report of fixed-budget runs only -- and on the equivalent-token cost).
    """

    def __new__(cls, markdown: str, **attrs):
        obj = super().__new__(cls, markdown)
        obj.__dict__.update(attrs)
        return obj

    @property
    def markdown(self) -> str:
        return str.__str__(self)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _tool_commit() -> Optional[str]:
    # Read-only: which commit of fp4-ablate produced the report (None outside a git checkout).
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _default_out_dir(results_dir: ResultsDirs) -> Path:
    if len(results_dir) == 1 and results_dir[0].name == "runs":
        return results_dir[0].parent / "report"
    return Path("results") / "report"


def _issue_lines(issues: Sequence[Issue]) -> List[str]:
    lines = []
    bad = [i for i in issues if not i.incomplete and not i.calibration]
    running = [i for i in issues if i.incomplete]
    calibration = [i for i in issues if i.calibration]
    if calibration:
        lines += ["## Calibration runs (no target; read by `fp4-ablate calibrate`; not in the tokens-to-target "
                  "table, used by the equivalent-token estimator)", "",
                  ", ".join(f"`{i.name}`" for i in calibration), ""]
    if bad:
        lines += ["## Excluded run directories", ""] + [f"- `{i.name}`: {i.problem}" for i in bad] + [""]
    if running:
        lines += ["## Incomplete runs (no summary yet; not counted)", ""]
        lines += [f"- `{i.name}`: {i.problem}" for i in running] + [""]
    return lines


def _user_args(step_speedup) -> str:
    if step_speedup is None:
        return ""
    if isinstance(step_speedup, Mapping):
        return "".join(f" {k}={v:g}" for k, v in step_speedup.items())
    return f" {step_speedup:g}"


def _eq_only_markdown(eq_runs, issues, est, plot_files, results_dir, eq_paired) -> str:
    lines = ["# fp4-ablate report", "",
             f"Results: `{results_dir}` -- no run with a target, {len(eq_runs)} fixed-budget run(s) over "
             f"{eq_runs['seed'].nunique()} seed(s): no tokens-to-target table (a post-hoc one: `--target-ppl`), "
             "the equivalent-token cost only.", ""]
    lines.append(eq_markdown(est, heading_level=2))
    if not eq_paired.empty:
        lines.append(eq_to_markdown(eq_paired, heading_level=2))
    figs = sorted(plot_files)
    if figs:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    lines += _issue_lines([i for i in issues if not i.calibration])
    return "\n".join(lines)


def _posthoc_lines(posthoc) -> List[str]:
    """The post-hoc target and, per experiment group, the value chosen (calibrate: from which runs)."""
    if posthoc is None:
        return []
    spec, choices = posthoc
    head = f"Post-hoc target (`--target-ppl {spec.describe()}`): "
    if not choices:
        return [head + "no run was trained without a target, so it changed nothing.", ""]
    lines = [head + "the runs trained without a target (fixed budget) get a tokens to target at it, interpolated "
             "between the two evaluations around the first crossing as the training loop does (linear in log "
             "perplexity); not reached: the budget ended above it. Runs trained with a target keep theirs.", ""]
    lines += [f"- {'group `' + c.group + '`: ' if c.group else ''}{c.describe()}" for c in choices]
    return lines + [""]


def _markdown(table, runs, issues, warnings, profs, plot_files, results_dir, step_speedup,
              isolated=None, paired=None, est=None, eq_paired=None, posthoc=None) -> str:
    n_seeds = runs["seed"].nunique()
    lines = ["# fp4-ablate report", "",
             f"Results: `{results_dir}` -- {len(runs)} finished runs over {n_seeds} seed(s), "
             f"{sum(not i.incomplete and not i.calibration for i in issues)} excluded, "
             f"{sum(i.incomplete for i in issues)} incomplete"
             + (f", {sum(i.calibration for i in issues)} calibration runs (no target)"
                if any(i.calibration for i in issues) else "") + ".",
             "",
             "Extra tokens: paired by seed against the FP8 run of the same model, data, target and seed "
             "(mean ± 95% t-interval over seeds). Net speedup = step gain / (1 + extra tokens), "
             "interval from the cost interval. Step gain source: `measured` (native kernels, own tokens/s), "
             "`modeled:<profile>` (datasheet peaks substituted into the measured FP8 step: an upper bound on the "
             "GEMM saving; stabilized rows also pay their stabilizer's *emulated* extra work, which overstates "
             "it off FP4 hardware), "
             "`user` (--step-speedup" + _user_args(step_speedup) + "). Equivalent-token cost: see its "
             "section below (over the same runs as each row; window " +
             (f"{est.window[0]:g},{est.window[1]:g}" if est is not None else "n/a") + ").", ""]
    lines += _posthoc_lines(posthoc)
    shared = int(runs["gpu_shared_by"].max()) if "gpu_shared_by" in runs else 1
    if shared > 1:
        lines += [f"Throughput: runs shared a GPU (up to {shared} at a time, `sweep.jobs_per_gpu`), "
                  "so their tokens/s (column `tokens/s`) depend on their neighbours and are not "
                  "compared; the step gain is modeled from isolated tokens/s (column `tokens/s "
                  "alone`)" + (f": {isolated.describe()}." if isolated else
                              ", none given (--throughput BENCH.json)."), ""]
    elif isolated is not None:
        lines += [f"Isolated tokens/s (column `tokens/s alone`, used for the modeled gain): "
                  f"{isolated.describe()}.", ""]
    if not has_gains(table):
        if isolated is None and step_speedup is None:
            why = ("no isolated bench (`--throughput BENCH.json`, from `fp4-ablate bench`) and no "
                   "`--step-speedup` were given, and the runs' own tokens/s, measured beside whatever "
                   "else the machine ran, give no step gain (a measured gain needs native GEMMs on an "
                   "unshared device)")
        else:
            why = "no configuration has one (the notes column of table.csv says why per row)"
        lines += [f"Step gain and net speedup: left out of the table: {why}.", ""]
    if any(table["baseline_outliers"].astype(bool)) if "baseline_outliers" in table else False:
        lines += ["Baseline outlier (notes): an FP8 seed whose tokens to target lies more than 2.5 robust z "
                  "from the other FP8 seeds of the group (z = (x - median of the others) / (1.4826 x their MAD)); "
                  "every row's cost of that seed is a ratio against it.", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines.append(to_markdown(table, list(profs), heading_level=2))
    if paired is not None and not paired.empty:
        lines.append(contrasts_markdown(paired, heading_level=2))
    if est is not None:
        lines.append(eq_markdown(est, heading_level=2, posthoc=posthoc is not None))
    if eq_paired is not None and not eq_paired.empty:
        lines.append(eq_to_markdown(eq_paired, heading_level=2))
    figs = sorted(plot_files)
    if figs:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    lines += _issue_lines(issues)
    if profs:
        lines += ["## Hardware profiles (vendor datasheet dense peaks, not measurements)", ""]
        for p in profs.values():
            peaks = ", ".join(f"{k} {v:g}" if v is not None else f"{k} n/a" for k, v in p.peak_tflops.items())
            lines.append(f"- {p.name} ({p.vendor}): {peaks} TFLOP/s -- source: {p.source}")
        lines.append("")
    return "\n".join(lines)


def _open_staging(out_dir: Path) -> Path:
    """The fresh sibling directory the whole report is written into, then swapped in."""
    _check_out_dir(out_dir)
    try:
        return _staging_dir(out_dir)
    except OSError as e:
        raise ReportError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None


def _eq_only_report(results_dir: ResultsDirs, out_dir: Path, eq_runs, issues, est) -> "Report":
    """Fixed-budget runs only: the estimator's section and contrasts, eq_cost.csv, eq_contrasts.csv,
    its plot and report.json."""
    eq_paired = eq_contrasts(est)
    staging = _open_staging(out_dir)
    try:
        files = {"eq_cost.csv": atomic_write(staging / "eq_cost.csv", eq_csv(est))}
        if not eq_paired.empty:
            files["eq_contrasts.csv"] = atomic_write(staging / "eq_contrasts.csv", eq_to_csv(eq_paired))
        plot_files = write_eq_plots(est, staging)
        files.update(plot_files)
        markdown = _eq_only_markdown(eq_runs, issues, est, plot_files, results_dir, eq_paired)
        markdown += _scaling_section(staging, est, eq_runs, files)
        diag_markdown, diag_files = diagnostics_summary(eq_runs, staging)  # runs' diagnostics.jsonl, if any
        markdown += "\n" + diag_markdown if diag_markdown else ""
        files.update(diag_files)
        files["report.md"] = atomic_write(staging / "report.md", markdown)
        provenance = {
            "command": shlex.join(sys.argv),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "results_dir": str(results_dir.resolve()), "out_dir": str(out_dir.resolve()),
            "tool_git_commit": _tool_commit(), "eq_window": list(est.window),
            "runs": [{k: r.get(k) for k in ("run", "run_dir", "status", "ladder", "stabilizer", "format", "model",
                                            "data", "seed", "git_commit", "device_name")}
                     for r in eq_runs.to_dict("records")],
            "eq_baselines": {Path(d).name: Path(b).name for d, b in sorted(est.baseline_of.items())},
            "excluded": [{"run_dir": i.run_dir, "problem": i.problem} for i in issues
                         if not i.incomplete and not i.calibration],
            "files": sorted(list(files) + ["report.json"]),
        }
        atomic_write(staging / "report.json", json.dumps(_jsonable(provenance), indent=2) + "\n")
        _swap_in(staging, out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise ReportError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None
        raise
    files = {name: out_dir / name for name in files}
    files["report.json"] = out_dir / "report.json"
    return Report(markdown, out_dir=out_dir, files=files, table=est.table, runs=eq_runs, issues=issues,
                  warnings=[], wandb_dir=None, estimate=est, eq_contrasts=eq_paired)


def _log_wandb(out_dir: Path, csv_text: str, files: Dict[str, Path], markdown: str, provenance: dict):
    import io

    import wandb as wb

    kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(out_dir)}
    run = wb.init(project=os.environ.get("WANDB_PROJECT", "fp4-ablate"), job_type="report",
                  config={"results_dir": provenance["results_dir"], "profiles": provenance["profiles_used"],
                          "step_speedup": provenance["step_speedup"]}, **kwargs)
    try:
        df = pd.read_csv(io.StringIO(csv_text))
        payload = {"report/table": wb.Table(dataframe=df.astype(object).where(df.notna(), None))}
        for name, path in files.items():
            if name.endswith(".png"):
                payload[f"report/{Path(name).stem}"] = wb.Image(str(path))
        payload["report/markdown"] = wb.Html(f"<pre>{markdown}</pre>")
        run.log(payload)
        for r in df.to_dict("records"):
            if isinstance(r.get("net"), float) and math.isfinite(r["net"]):
                run.summary[f"net/{r['label']}/{r['target_ppl']:g}"] = r["net"]
        run_dir = getattr(run, "dir", None)
    finally:
        run.finish()
    return str(Path(run_dir).parent) if run_dir else None


def _check_out_dir(out_dir: Path) -> None:
    """The report replaces out_dir as a whole, so out_dir must be absent, empty or an earlier report."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ReportError(f"cannot write the report to {out_dir}: it exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not any(
            (out_dir / f).exists() for f in ("report.json", "report.md")):
        raise ReportError(f"cannot write the report to {out_dir}: it is a non-empty directory without "
                          "report.json or report.md (not an earlier report), and the report replaces its "
                          "output directory as a whole; choose another --out")


def _staging_dir(out_dir: Path) -> Path:
    """A fresh sibling of out_dir, where the whole report is written before it is swapped in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.new-"))
    os.chmod(staging, 0o777 & ~process_umask())
    return staging


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by staging: old aside (rename), new in (rename), old deleted. Nothing of an
    earlier report survives (a file it had and this one has not would otherwise look current)."""
    aside = None
    if out_dir.exists():
        aside = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, aside)  # onto the empty directory mkdtemp made: atomic on POSIX
    try:
        os.rename(staging, out_dir)
    except OSError:
        if aside is not None:
            os.rename(aside, out_dir)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def make_report(results_dir=DEFAULT_RESULTS_DIR, out_dir=None, profiles=("mi355x", "b200"),
                step_speedup: Union[None, float, Mapping[str, float]] = None, wandb: bool = False,
                throughput=None, eq_window=DEFAULT_WINDOW, target_ppl=None, unpaired="error") -> Report:
    """Build the report for the runs under ``results_dir`` (a directory, or several read as one set:
    a list of them); returns its Markdown as a :class:`Report`.

    ``out_dir`` defaults to ``<results_dir>/../report`` (``results/report``); the whole report is
    written into a fresh sibling directory and then replaces ``out_dir`` (files of an earlier report
    never survive; a non-empty ``out_dir`` that is not a report is refused).  ``profiles``:
    hardware profile names (configs/hardware/profile/) or YAML paths for the modeled gain.
    ``step_speedup``: a user-measured step-throughput gain (a ratio, 1.20 = +20%) for every
    configuration with an FP4 GEMM, or {label or ladder: ratio}.  ``throughput``: a bench JSON
    of isolated tokens/s (needed to model the gain of runs that shared a GPU).  ``eq_window``:
    (a, b), the equivalent-token cost averages each run's evaluations in [a, b] x its tokens
    (:mod:`.estimator`).  ``target_ppl``: a post-hoc target for the runs trained without one -- a
    perplexity, "calibrate" / "calibrate:F" or a :class:`.posthoc.PosthocTarget` (:mod:`.posthoc`).
    ``unpaired``: "error" (a run with no FP8 run of its group and seed raises MissingBaselineError)
    or "exclude" (such runs are left out and listed with the excluded runs: a ladder in progress).  A
    directory of fixed-budget runs only (no target) and no ``target_ppl`` gives a report of the
    equivalent-token cost alone.  Raises ReportError
    subclasses (NoRunsError, MissingBaselineError, HardwareProfileError) with a message.
    """
    results_dir = ResultsDirs(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(results_dir)
    isolated = load_isolated_throughput(throughput) if throughput is not None else None
    posthoc = _posthoc_spec(target_ppl)
    if unpaired not in UNPAIRED_CHOICES:
        raise ReportError(f"unpaired {unpaired!r}: choose one of {', '.join(UNPAIRED_CHOICES)}")
    runs, eq_runs, issues, est, choices = _load_inputs(results_dir, eq_window, posthoc, unpaired)
    if runs.empty:
        return _eq_only_report(results_dir, out_dir, eq_runs, issues, est)
    stats, warnings, baselines = summarize(runs, issues)
    table, profs = add_throughput(stats, runs, profiles, step_speedup, isolated)
    table = attach_eq(table, est)
    paired, eq_paired = contrasts(runs, baselines), eq_contrasts(est)
    posthoc = None if posthoc is None else (posthoc, choices)
    staging = _open_staging(out_dir)
    try:
        files, markdown = _write_outputs(staging, table, runs, eq_runs, issues, warnings, profs, results_dir,
                                         step_speedup, isolated, paired, est, eq_paired, posthoc)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise ReportError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None
        raise
    provenance = _provenance(runs, issues, warnings, baselines, profs, files, est, results_dir,
                             out_dir, step_speedup, isolated, posthoc)
    try:
        _write_json(staging, provenance)
        _swap_in(staging, out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ReportError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None
    files = {name: out_dir / name for name in files}
    files["report.json"] = out_dir / "report.json"
    wandb_dir = None
    if wandb:
        wandb_dir = _log_wandb(out_dir, to_csv(table, list(profs)), files, markdown, provenance)
        provenance["wandb_dir"] = wandb_dir
        _write_json(out_dir, provenance)
    return Report(markdown, out_dir=out_dir, files=files, table=table, runs=runs, issues=issues,
                  warnings=warnings, wandb_dir=wandb_dir, estimate=est, contrasts=paired, eq_contrasts=eq_paired)


def _posthoc_spec(target_ppl) -> Optional[PosthocTarget]:
    if target_ppl is None or isinstance(target_ppl, PosthocTarget):
        return target_ppl
    try:
        return parse_target(str(target_ppl))
    except ValueError as e:
        raise ReportError(f"target_ppl {e}") from None


def _load_inputs(results_dir: ResultsDirs, eq_window, posthoc: Optional[PosthocTarget] = None, unpaired="error"):
    """(runs with a target -- trained or post-hoc --, every finished run as trained for the estimator,
    issues, the estimate, the post-hoc target chosen per group)."""
    results_dir.require()
    eq_runs, eq_issues = load_runs(results_dir, include_completed=True)
    if posthoc is None:
        runs, issues = load_runs(results_dir)
        choices = []
    else:  # every run is a row then: the fixed-budget ones are given the post-hoc target
        (runs, choices), issues = apply_posthoc_target(eq_runs, posthoc), eq_issues
    if unpaired == "exclude" and not eq_runs.empty:
        # Both tables pair by the same rule, so one mask over the finished runs serves both.
        dropped = set(eq_runs.loc[without_baseline(eq_runs), "run_dir"])
        issues = list(issues) + [Issue(d, UNPAIRED) for d in sorted(dropped)]
        eq_runs = eq_runs[~eq_runs["run_dir"].isin(dropped)]
        runs = runs[~runs["run_dir"].isin(dropped)] if not runs.empty else runs
    if eq_runs.empty:
        found = "\n".join(f"  {i.name}: {i.problem}" for i in issues) or "  (no run directories)"
        raise NoRunsError(f"no finished valid runs under {results_dir}:\n{found}")
    try:
        eq_window = parse_window(",".join(f"{float(x)!r}" for x in eq_window))
    except (TypeError, ValueError) as e:
        raise ReportError(f"eq_window {eq_window!r}: {e}") from None
    return runs, eq_runs, issues, estimate(eq_runs, eq_window), choices


def _write_outputs(staging: Path, table, runs, eq_runs, issues, warnings, profs, results_dir, step_speedup,
                   isolated, paired, est, eq_paired, posthoc):
    """Tables, CSVs, plots and report.md into the staging directory: ({name: path}, markdown)."""
    files = write_tables(table, staging, list(profs))
    if not paired.empty:
        files["contrasts.csv"] = atomic_write(staging / "contrasts.csv", contrasts_csv(paired))
    files["eq_cost.csv"] = atomic_write(staging / "eq_cost.csv", eq_csv(est))
    if not eq_paired.empty:
        files["eq_contrasts.csv"] = atomic_write(staging / "eq_contrasts.csv", eq_to_csv(eq_paired))
    plot_files = write_plots(table, runs, staging)
    plot_files.update(write_eq_plots(est, staging))
    files.update(plot_files)
    markdown = _markdown(table, runs, issues, warnings, profs, plot_files, results_dir, step_speedup,
                         isolated, paired, est, eq_paired, posthoc)
    markdown += _scaling_section(staging, est, eq_runs, files)
    # Runs' diagnostics.jsonl, if any: every finished run, fixed-budget ones included (no target needed).
    diag_markdown, diag_files = diagnostics_summary(eq_runs, staging)
    markdown += "\n" + diag_markdown if diag_markdown else ""
    files.update(diag_files)
    files["report.md"] = atomic_write(staging / "report.md", markdown)
    return files, markdown


def _scaling_section(staging: Path, est, eq_runs, files: Dict[str, Path]) -> str:
    """Cost against model size and tokens per parameter across experiment groups (:mod:`.scaling`):
    its Markdown ("" with fewer than two groups that have costs), its files added to ``files``."""
    table = scaling_table(est, eq_runs)
    if not has_points(table):
        return ""
    fits = [trend(table, "params"), trend(table, "tokens_per_param")]
    prediction = extrapolate(fits[0], model_params(PAPER_MODEL), PAPER_MODEL)
    files.update(scaling_files(staging, table, fits, prediction))
    return "\n" + scaling_markdown(table, fits, prediction, heading_level=2)


def _write_json(where: Path, provenance: dict) -> Path:
    return atomic_write(where / "report.json", json.dumps(_jsonable(provenance), indent=2, sort_keys=False) + "\n")


def _provenance(runs, issues, warnings, baselines, profs, files, est, results_dir, out_dir,
                step_speedup, isolated, posthoc=None) -> dict:
    """report.json: what the report was made from and how (command, commits, runs, exclusions)."""
    run_fields = ("run", "run_dir", "status", "ladder", "stabilizer", "format", "model", "data", "seed",
                  "target_ppl", "tokens_to_target", "git_commit", "git_dirty", "device_name", "hostname",
                  "started_at")
    several_groups = runs["group_id"].nunique() > 1
    if several_groups:  # one group: no label, and report.json stays as it was before groups existed
        run_fields += ("group",)
    if posthoc is not None:  # likewise: the key only in reports that were given --target-ppl
        run_fields += ("target_posthoc",)
    provenance = {
        "command": shlex.join(sys.argv),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results_dir": str(results_dir.resolve()),
        "out_dir": str(out_dir.resolve()),
        "tool_git_commit": _tool_commit(),
        "profiles_used": {n: {"vendor": p.vendor, "peak_tflops": dict(p.peak_tflops), "source": p.source}
                          for n, p in profs.items()},
        "step_speedup": step_speedup if not isinstance(step_speedup, Mapping) else dict(step_speedup),
        "throughput": None if isolated is None else {
            "source": isolated.source, "device_name": isolated.device_name,
            "command": isolated.command,
            "tokens_per_s": {"/".join(k): v for k, v in isolated.tokens_per_s.items()}},
        "git_commits": sorted({c for c in runs["git_commit"] if isinstance(c, str) and c}),
        "devices": sorted({d for d in runs["device_name"] if isinstance(d, str) and d}),
        "runs": [dict({k: r.get(k) for k in run_fields}, baseline=Path(baselines[r["run_dir"]]).name)
                 for r in runs.to_dict("records")],
        "excluded": [{"run_dir": i.run_dir, "problem": i.problem} for i in issues
                     if not i.incomplete and not i.calibration],
        "calibration": [i.run_dir for i in issues if i.calibration],
        "eq_window": list(est.window),
        "eq_baselines": {Path(d).name: Path(b).name for d, b in sorted(est.baseline_of.items())},
        "incomplete": [{"run_dir": i.run_dir, "problem": i.problem} for i in issues if i.incomplete],
        "warnings": warnings,
        "files": sorted(list(files) + ["report.json"]),
    }
    if several_groups:
        provenance["groups"] = sorted(runs["group"].unique())
    if posthoc is not None:
        spec, choices = posthoc
        provenance["posthoc_target"] = {
            "argument": spec.describe(),
            "targets": [{"group": c.group, "target_ppl": c.ppl, "fraction": c.fraction, "fp8_ppl": c.fp8_ppl}
                        for c in choices]}
    return provenance
