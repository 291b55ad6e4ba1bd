"""The diagnostics section of `fp4-ablate report`: runs' diagnostics.jsonl, per configuration x GEMM.

Input: every run the report read, with or without a perplexity target (experiments/report/ passes
the fixed-budget runs too: diagnostics do not need a target). Runs without a non-empty
diagnostics.jsonl (or its gzipped copy, diagnostics.jsonl.gz) are not mentioned; no run with one: no section, no files. A configuration is
ladder / stabilizer / format, plus the experiment group's label when the runs belong to several
groups (runs of different models or budgets are never pooled); seeds are pooled.

Two tables, each also written as a CSV, each with a plot over training:

* "gemm" records (every probed step): averaged over layers and probed steps per run, then over the
  runs of a configuration: output relative error, cosine and bias, and each operand's relative
  error, magnitude bias, flushed and clipped fractions (diagnostics.csv; diagnostics.png: output
  relative error against step per GEMM).
* "consistency" records (one per window, GEMM and layer; consistency.py): step-to-step correlation
  and coherence ||sum e_t|| / sum ||e_t|| of the Wgrad output error (error "out") and of the Fprop /
  Dgrad weight-operand errors (error "w"), averaged over layers and windows per run, then over runs,
  per configuration x GEMM x window length k, beside 1/sqrt(k) (what independent errors give), with
  the number of windows (summed over the runs) and of runs (diagnostics_consistency.csv;
  diagnostics_consistency.png: coherence against the window's first step per GEMM).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from fp4.names import GEMM_OPERANDS
from .collect import mean_by
from .consistency import CONSISTENCY
from .training import DIAGNOSTICS, DIAGNOSTICS_GZ

COLUMNS = ("out.rel_err", "out.cos", "out.bias")
OPERAND_COLUMNS = ("rel_err", "bias", "flushed", "clipped")
GEMMS = ("fprop", "dgrad", "wgrad")


def _read(run_dir: Path) -> List[dict]:
    """A run's diagnostics records, from diagnostics.jsonl or, published, diagnostics.jsonl.gz."""
    if (run_dir / DIAGNOSTICS).is_file():
        text = (run_dir / DIAGNOSTICS).read_text()
    elif (run_dir / DIAGNOSTICS_GZ).is_file():
        text = gzip.decompress((run_dir / DIAGNOSTICS_GZ).read_bytes()).decode()
    else:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill
    return records


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"


def _config(run: dict) -> str:
    name = f"{run.get('ladder')}/{run.get('stabilizer')}/{run.get('format')}"
    group = run.get("group")
    return f"{name} ({group})" if isinstance(group, str) and group else name


def _csv(path: Path, table: List[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in t.items()} for t in table])
    path.write_text(buf.getvalue())
    return path


def diagnostics_summary(runs, out_dir: Path) -> Tuple[str, Dict[str, Path]]:
    """(Markdown section, {file name: path}) for the runs (the report's runs DataFrame: run_dir,
    ladder, stabilizer, format, group columns); ("", {}) when no run has diagnostics."""
    gemm_recs: Dict[str, List[dict]] = {}
    cons_recs: Dict[str, List[dict]] = {}
    for r in runs.to_dict("records"):
        records = _read(Path(str(r.get("run_dir", ""))))
        config = _config(r)
        gemm_recs.setdefault(config, []).append([x for x in records if x.get("kind") == "gemm"])
        cons_recs.setdefault(config, []).append([x for x in records if x.get("kind") == CONSISTENCY])
    out_dir = Path(out_dir)
    gemm_lines, gemm_files = _gemm_section(gemm_recs, out_dir)
    cons_lines, cons_files = _consistency_section(cons_recs, out_dir)
    if not gemm_lines and not cons_lines:
        return "", {}
    lines = ["## GEMM quantization diagnostics (diagnostics.jsonl)", "",
             "Runs with and without a perplexity target; seeds pooled. `fp4-ablate diagnose` gives the same "
             "metrics side by side on one state, with weight drift.", ""]
    return "\n".join(lines + gemm_lines + cons_lines) + "\n", {**gemm_files, **cons_files}


def _gemm_section(by_config: Dict[str, List[List[dict]]], out_dir: Path):
    per_run: List[dict] = []
    curves: Dict[Tuple[str, str], Dict[int, List[float]]] = {}
    for config, run_records in by_config.items():
        for records in run_records:
            for row in mean_by(records, ("gemm",)) if records else []:
                per_run.append({"config": config, **row})
            for rec in records:
                if rec.get("out.rel_err") is not None:
                    curves.setdefault((config, rec["gemm"]), {}).setdefault(int(rec["step"]), []).append(
                        rec["out.rel_err"])
    if not per_run:
        return [], {}
    lines = [f"### Per GEMM ({len({p['config'] for p in per_run})} configuration(s))", "",
             "Means over layers, probed steps and runs. Operands a, b in product order (Fprop x,w; Dgrad dy,w; "
             "Wgrad dy,x); out: the GEMM output against the exact float64 product.", "",
             "| config | GEMM | out rel err | out cos | out bias | a rel | a bias | a flush | a clip | b rel | b bias "
             "| b flush | b clip | runs |", "|" + "---|" * 14]
    table = []
    for row in mean_by(per_run, ("config", "gemm")):
        a, b = (str(n) for n in GEMM_OPERANDS[row["gemm"]])
        flat = {"config": row["config"], "gemm": row["gemm"], **{c: row.get(c) for c in COLUMNS}}
        for tag, name in (("a", a), ("b", b)):
            flat[f"{tag}_operand"] = name
            flat.update({f"{tag}.{k}": row.get(f"{name}.{k}") for k in OPERAND_COLUMNS})
        flat["runs"] = row["n"]
        table.append(flat)
        cells = [row["config"], row["gemm"]] + [_fmt(flat[c]) for c in COLUMNS]
        cells += [_fmt(flat[f"{t}.{k}"]) for t in ("a", "b") for k in OPERAND_COLUMNS] + [str(row["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    files = {"diagnostics.csv": _csv(out_dir / "diagnostics.csv", table),
             "diagnostics.png": _plot(out_dir / "diagnostics.png", curves, "output relative error", log=True)}
    lines += ["", "![GEMM output relative error over training](diagnostics.png)", ""]
    return lines, files


def _consistency_rows(by_config: Dict[str, List[List[dict]]]) -> List[dict]:
    """Per configuration x GEMM x error x k: the means over runs of each run's mean over layers and
    windows, the windows summed over runs, and the runs."""
    rows = []
    for config, run_records in by_config.items():
        per_run, windows = [], {}
        for records in run_records:
            slim = [{"gemm": r["gemm"], "error": r.get("error"), "k": r.get("k"), "step_corr": r.get("step_corr"),
                     "coherence": r.get("coherence")} for r in records]
            for row in mean_by(slim, ("gemm", "error", "k")) if slim else []:
                group = (row["gemm"], row["error"], row["k"])
                windows[group] = windows.get(group, 0) + len(
                    {r["first_step"] for r in records if (r["gemm"], r.get("error"), r.get("k")) == group})
                per_run.append(row)
        for row in mean_by(per_run, ("gemm", "error", "k")) if per_run else []:
            group = (row["gemm"], row["error"], row["k"])
            rows.append({"config": config, "gemm": row["gemm"], "error": row["error"], "k": row["k"],
                         "step_corr": row.get("step_corr"), "coherence": row.get("coherence"),
                         "independent": 1 / math.sqrt(row["k"]) if row["k"] else None,
                         "windows": windows[group], "runs": row["n"]})
    rows.sort(key=lambda r: (r["config"], GEMMS.index(r["gemm"]) if r["gemm"] in GEMMS else 9, r["k"] or 0))
    return rows


def _consistency_section(by_config: Dict[str, List[List[dict]]], out_dir: Path):
    rows = _consistency_rows(by_config)
    if not rows:
        return [], {}
    lines = ["### Error consistency across steps", "",
             "Per window of k consecutive steps (`diagnostics.window`): step corr = mean corr(e_t, e_t+1), "
             "coherence = ||sum e_t|| / sum ||e_t|| (1: the same error every step, it accumulates in the weights; "
             "1/sqrt(k): independent errors, they average out). Error out: the Wgrad output dW - dW*; w: the "
             "weight operand as Fprop / Dgrad multiplied it, W_eff - W, in W's own coordinates (their outputs "
             "are per token of different batches, not comparable across steps). Means over layers, windows and "
             "runs.", "",
             "| config | GEMM | error | step corr | coherence | 1/sqrt(k) | k | windows | runs |", "|" + "---|" * 9]
    for r in rows:
        cells = [r["config"], r["gemm"], str(r["error"]), _fmt(r["step_corr"]), _fmt(r["coherence"]),
                 _fmt(r["independent"]), str(r["k"]), str(r["windows"]), str(r["runs"])]
        lines.append("| " + " | ".join(cells) + " |")
    curves: Dict[Tuple[str, str], Dict[int, List[float]]] = {}
    for config, run_records in by_config.items():
        for rec in (x for records in run_records for x in records):
            if rec.get("coherence") is not None:
                curves.setdefault((config, rec["gemm"]), {}).setdefault(int(rec["first_step"]), []).append(
                    rec["coherence"])
    files = {"diagnostics_consistency.csv": _csv(out_dir / "diagnostics_consistency.csv", rows),
             "diagnostics_consistency.png": _plot(out_dir / "diagnostics_consistency.png", curves,
                                                  "error coherence", log=False, xlabel="window's first step")}
    lines += ["", "![Error coherence over training](diagnostics_consistency.png)", ""]
    return lines, files


def _plot(path: Path, curves, what: str, log: bool, xlabel: str = "step") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, gemm in zip(axes, GEMMS):
        for (config, g), by_step in sorted(curves.items()):
            if g != gemm:
                continue
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], marker=".", label=config)
        ax.set_title(f"{gemm}: {what}")
        ax.set_xlabel(xlabel)
        if log:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
