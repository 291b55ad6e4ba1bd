"""The diagnostics section of `fp4-ablate report`: runs' diagnostics.jsonl, per configuration x GEMM.

For every run of the report that has a non-empty diagnostics.jsonl (training with
`diagnostics.every_steps=N`), its records are averaged over layers and probed steps; runs of one
configuration (ladder / stabilizer / format; seeds pooled) are averaged again. The section is a
Markdown table (configuration x GEMM: output relative error, cosine and bias, and each operand's
relative error, magnitude bias, flushed and clipped fractions), written as diagnostics.csv too, and a
plot of the output relative error over training per GEMM (diagnostics.png). Runs without the file
are not mentioned; no run with it: no section, no files.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Tuple

from fp4.names import GEMM_OPERANDS
from .collect import mean_by
from .training import DIAGNOSTICS

COLUMNS = ("out.rel_err", "out.cos", "out.bias")
OPERAND_COLUMNS = ("rel_err", "bias", "flushed", "clipped")


def _read(path: Path) -> List[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill
    return [r for r in records if r.get("kind") == "gemm"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"


def diagnostics_summary(runs, out_dir: Path) -> Tuple[str, Dict[str, Path]]:
    """(Markdown section, {file name: path}) for the runs (the report's runs DataFrame: run_dir,
    ladder, stabilizer, format columns); ("", {}) when no run has diagnostics."""
    per_run: List[dict] = []
    curves: Dict[Tuple[str, str], Dict[int, List[float]]] = {}
    for r in runs.to_dict("records"):
        path = Path(str(r.get("run_dir", ""))) / DIAGNOSTICS
        if not path.is_file():
            continue
        records = _read(path)
        if not records:
            continue
        config = f"{r.get('ladder')}/{r.get('stabilizer')}/{r.get('format')}"
        for row in mean_by(records, ("gemm",)):
            per_run.append({"config": config, **row})
        for rec in records:
            if rec.get("out.rel_err") is not None:
                curves.setdefault((config, rec["gemm"]), {}).setdefault(int(rec["step"]), []).append(rec["out.rel_err"])
    if not per_run:
        return "", {}
    rows = mean_by(per_run, ("config", "gemm"))
    lines = ["## GEMM quantization diagnostics (diagnostics.jsonl)", "",
             f"{len({(p['config']) for p in per_run})} configuration(s) with diagnostics; means over layers, probed "
             "steps and runs. Operands a, b in product order (Fprop x,w; Dgrad dy,w; Wgrad dy,x); out: the GEMM "
             "output against the exact float64 product. `fp4-ablate diagnose` gives the same metrics side by side "
             "on one state, with error consistency and weight drift.", "",
             "| config | GEMM | out rel err | out cos | out bias | a rel | a bias | a flush | a clip | b rel | b bias "
             "| b flush | b clip | runs |", "|" + "---|" * 14]
    table = []
    for row in rows:
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
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in t.items()} for t in table])
    files = {"diagnostics.csv": out_dir / "diagnostics.csv"}
    files["diagnostics.csv"].write_text(buf.getvalue())
    files["diagnostics.png"] = _plot(out_dir / "diagnostics.png", curves)
    lines += ["", "![GEMM output relative error over training](diagnostics.png)", ""]
    return "\n".join(lines) + "\n", files


def _plot(path: Path, curves) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, gemm in zip(axes, ("fprop", "dgrad", "wgrad")):
        for (config, g), by_step in sorted(curves.items()):
            if g != gemm:
                continue
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], marker=".", label=config)
        ax.set_title(f"{gemm}: output relative error")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
