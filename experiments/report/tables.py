"""The ablation table: one row per configuration, as Markdown, CSV and LaTeX.

Rows follow the ladder (bf16 reference, fp8, fprop, dgrad, wgrad, then wgrad+sr,
wgrad+rht, wgrad+h16, then anything else), one block per comparison group (model, data,
target perplexity) -- groups with different targets are never merged into one table.

The Markdown and LaTeX cells are for reading: means with their 95% interval, costs and
speedups as signed percentages, and, where no seed reached the target, *why* -- "did not
converge (best ppl X at N tokens)" or "diverged at N tokens" -- instead of an empty cell
that a reader could take for a missing run.  The CSV is for machines: every number is
unformatted (fractions, not percentages; NaN where undefined) so it can be re-plotted or
re-tested without parsing strings.

Every file is written atomically (the run-directory contract's writer), and the report as a
whole is built in a fresh directory that replaces the old one (see make_report).  When no
row has a step-throughput gain (no --throughput bench, no --step-speedup, no valid measured
gain), the Markdown and LaTeX tables leave the gain and net-speedup columns out; the CSV keeps
them, empty.  The CSV's ``group`` column appears only when the report has several experiment
groups, and its ``target_source`` column (``trained`` / ``post-hoc``) only when some rows have a
post-hoc target (``--target-ppl``, :func:`.posthoc.apply_posthoc_target`); the Markdown group titles
say "(post-hoc target ...)" for those (so do the LaTeX ones, which exist only with several groups).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import pandas as pd
from tabulate import tabulate

from ..rundir import atomic_write_bytes

GROUP_KEYS = ("model", "data", "target_ppl", "group")
GAIN_COLUMNS = ("step gain", "net speedup")
EQ_COLUMN = "equivalent-token cost"
DISPLAY_COLUMNS = ("configuration", "seeds finished", "converged", "tokens to target",
                   "extra tokens vs FP8", EQ_COLUMN, "tokens/s", "tokens/s alone", "step gain", "net speedup",
                   "notes")
CSV_COLUMNS = ("model", "data", "target_ppl", "group", "label", "ladder", "stabilizer", "format", "n_runs", "n_reached",
               "n_diverged", "n_not_reached", "seeds", "tokens_mean", "tokens_lo", "tokens_hi", "n_paired",
               "cost_mean", "cost_lo", "cost_hi", "cost_mean_bound", "cost_seeds_for_2pct", "eq_cost_mean", "eq_cost_lo",
               "eq_cost_hi", "eq_n", "eq_seeds_for_2pct", "baseline_outliers", "tokens_per_s", "gpu_shared_by", "tokens_per_s_isolated", "gain", "gain_source", "net", "net_lo",
               "net_hi", "gain_measured", "t_extra_s_per_token", "best_ppl", "best_ppl_tokens", "diverged_at",
               "notes")


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write data to path atomically (the run-directory contract's writer: fsync, umask-respecting mode)."""
    return atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(x)


def fmt_tokens(x: float, ref: float = None) -> str:
    """Tokens with a k/M/B unit chosen from `ref` (default x) and 3 significant figures."""
    ref = x if ref is None else ref
    unit, suffix = 1.0, ""
    for u, s in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(ref) >= u:
            unit, suffix = u, s
            break
    v = abs(ref) / unit
    decimals = max(0, 2 - int(math.floor(math.log10(v)))) if v > 0 else 0
    return f"{x / unit:,.{decimals}f}{suffix}"


def fmt_pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def fmt_ratio_pct(ratio: float) -> str:
    """A ratio such as 1.106 as the signed change it is: "+10.6%"; an infinite one is unbounded."""
    if ratio == math.inf:
        return "unbounded"
    return fmt_pct(ratio - 1.0)


def _no_convergence(row: dict) -> List[str]:
    parts = []
    if row["diverged_at"]:
        parts.append("diverged at " + " / ".join(fmt_tokens(t) if _finite(t) else "?" for t in row["diverged_at"])
                     + " tokens")
    if row["n_not_reached"]:
        if _finite(row["best_ppl"]):
            at = f" at {fmt_tokens(row['best_ppl_tokens'])} tokens" if _finite(row["best_ppl_tokens"]) else ""
            parts.append(f"did not converge (best ppl {row['best_ppl']:.4g}{at})")
        else:
            parts.append("did not converge")
    return parts


def _is_baseline(row: dict) -> bool:
    return row.get("gain_source") == "baseline"


def display_row(row: dict, show_gain: bool = True) -> Dict[str, str]:
    """The human-readable cells of one configuration (show_gain=False: the table has no gain
    columns, so a row's reason for having no gain is said once in the report text instead)."""
    n, k = row["n_runs"], row["n_reached"]
    notes = []
    if k == 0:
        tokens = "; ".join(_no_convergence(row))
    else:
        tokens = fmt_tokens(row["tokens_mean"])
        if _finite(row["tokens_lo"]):
            tokens += " ± " + fmt_tokens((row["tokens_hi"] - row["tokens_lo"]) / 2, ref=row["tokens_mean"])
        elif k == 1:
            tokens += " (n=1)"
        if k < n:
            notes += [f"{len(row['diverged_at']) + row['n_not_reached']} seed(s) missed the target: "
                      + "; ".join(_no_convergence(row))]
    if _is_baseline(row):
        cost = "0 (baseline)"
    elif row["n_paired"] == 0:
        cost = "n/a (did not converge)" if k == 0 else "n/a (baseline did not converge)"
    else:
        cost = fmt_pct(row["cost_mean"])
        cost += (" ± " + f"{(row['cost_hi'] - row['cost_lo']) * 50:.1f}%") if _finite(row["cost_lo"]) else " (n=1)"
        if row["n_paired"] < k:
            notes.append(f"cost paired over {row['n_paired']} of {k} converged seeds (baseline missed the others)")
        censored = row.get("cost_censored") or {}
        if censored:
            if _finite(row["cost_lo"]):  # with one seed the cell already says (n=1)
                cost += f" (n={row['n_paired']})"
            seeds = ", ".join(f"seed {s} > {fmt_pct(c)}" for s, c in sorted(censored.items()))
            notes.append(f"cost over converged seeds only; out of budget: {seeds}; with "
                         f"{'that seed' if len(censored) == 1 else 'those seeds'} at the bound the mean over "
                         f"{row['n_paired'] + len(censored)} seeds is >= {fmt_pct(row['cost_mean_bound'])}")
    if _is_baseline(row):
        gain, net = "baseline", "baseline"
    else:
        gain = f"{fmt_ratio_pct(row['gain'])} ({row['gain_source']})" if _finite(row["gain"]) else "n/a"
        if _finite(row["net"]):
            net = fmt_ratio_pct(row["net"])
            if _finite(row["net_lo"]):
                net += f" [{fmt_ratio_pct(row['net_lo'])}, {fmt_ratio_pct(row['net_hi'])}]"
        else:
            net = "n/a"
    outl = row.get("baseline_outliers") or {}
    if outl:
        notes.append("baseline outlier: " + ", ".join(f"FP8 seed {s} (robust z {z:+.1f})" for s, z in sorted(outl.items())))
    if row.get("gain_note"):
        notes.append(row["gain_note"])
    if show_gain and row.get("gain_missing"):
        notes.append(row["gain_missing"])
    # The runs' own mean tokens/s; "shared" when several runs shared the GPU at a time, and then
    # comparable only within one sweep wave. "alone": the isolated measurement (--throughput).
    tps = f"{row['tokens_per_s']:,.0f}" if _finite(row["tokens_per_s"]) else "n/a"
    if tps != "n/a" and (row.get("gpu_shared_by") or 1) > 1:
        tps += f" (GPU shared by {row['gpu_shared_by']})"
    alone = row.get("tokens_per_s_isolated")
    alone = f"{alone:,.0f}" if _finite(alone) else "n/a"
    eq_n = row.get("eq_n")
    if eq_n is None or (isinstance(eq_n, float) and not math.isfinite(eq_n)):
        eq = "n/a"
    else:
        from .estimator import fmt_eq
        eq = fmt_eq(row["eq_cost_mean"], row["eq_cost_lo"], row["eq_cost_hi"], int(eq_n))
    return dict(zip(DISPLAY_COLUMNS, (row["label"], str(n), f"{k}/{n}", tokens, cost, eq, tps, alone, gain,
                                      net, "; ".join(notes))))


def profile_row(row: dict, profiles: Sequence[str]) -> Dict[str, str]:
    """Modeled gain / net on each hardware profile for one configuration."""
    out = {"configuration": row["label"]}
    for p in profiles:
        g, net = row.get(f"gain_{p}"), row.get(f"net_{p}")
        if _is_baseline(row):
            out[p] = "baseline"
        elif not _finite(g):
            out[p] = "n/a: " + (row.get(f"note_{p}") or "not modeled")
        else:
            out[p] = f"{fmt_ratio_pct(g)} / " + (fmt_ratio_pct(net) if _finite(net) else "n/a")
    return out


POSTHOC_TITLE = " (post-hoc target: crossing interpolated on the validation curves of fixed-budget runs)"


def group_title(key: tuple, posthoc: bool = False) -> str:
    model, data, target, group = key
    return (f"model={model}, data={data}, target ppl={target:g}" + (POSTHOC_TITLE if posthoc else "")
            + (f", group {group}" if group else ""))


def _posthoc(rows: Sequence[dict]) -> bool:
    # One comparison group is all post-hoc or all trained: the group key keeps train.target_ppl.
    return bool(rows and rows[0].get("target_posthoc"))


def has_gains(table: pd.DataFrame) -> bool:
    """Whether any non-baseline row has a step-throughput gain (else the gain columns are left out)."""
    return any(_finite(r.get("gain")) for r in table.to_dict("records") if not _is_baseline(r))


def _display_columns(table: pd.DataFrame) -> List[str]:
    return [c for c in DISPLAY_COLUMNS if (c not in GAIN_COLUMNS or has_gains(table))
            and (c != EQ_COLUMN or "eq_n" in table.columns)]


def _cells(row: dict, cols: Sequence[str]) -> Dict[str, str]:
    d = display_row(row, show_gain=any(c in cols for c in GAIN_COLUMNS))
    return {c: d[c] for c in cols}


def groups(table: pd.DataFrame):
    """(group key, rows) in table order; the table is already sorted by group then ladder."""
    seen: Dict[tuple, List[dict]] = {}
    for r in table.to_dict("records"):
        seen.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    return list(seen.items())


def to_markdown(table: pd.DataFrame, profiles: Sequence[str] = (), heading_level: int = 2) -> str:
    parts = []
    h = "#" * heading_level
    cols = _display_columns(table)
    if not has_gains(table):
        profiles = ()  # nothing modeled: no per-profile table either
    for key, rows in groups(table):
        parts.append(f"{h} {group_title(key, _posthoc(rows))}\n")
        parts.append(tabulate([_cells(r, cols) for r in rows], headers="keys", tablefmt="github",
                              disable_numparse=True) + "\n")
        if profiles:
            parts.append(f"Modeled step gain / net speedup per hardware profile (datasheet peaks):\n")
            parts.append(tabulate([profile_row(r, profiles) for r in rows], headers="keys", tablefmt="github",
                                  disable_numparse=True) + "\n")
    return "\n".join(parts)


def to_csv(table: pd.DataFrame, profiles: Sequence[str] = ()) -> str:
    cols = list(CSV_COLUMNS[:-1]) + [c for p in profiles for c in (f"gain_{p}", f"net_{p}")] + ["notes"]
    if not table["group"].astype(bool).any():
        cols.remove("group")
    posthoc = "target_posthoc" in table and table["target_posthoc"].astype(bool).any()
    if posthoc:
        cols.insert(cols.index("target_ppl") + 1, "target_source")
    flat = []
    for r in table.to_dict("records"):
        d = {c: r.get(c) for c in cols}
        if posthoc:
            d["target_source"] = "post-hoc" if r.get("target_posthoc") else "trained"
        d["seeds"] = ";".join(map(str, r["seeds"]))
        d["diverged_at"] = ";".join(str(t) for t in r["diverged_at"])
        d["baseline_outliers"] = ";".join(f"{s}:{z:.3g}" for s, z in sorted((r.get("baseline_outliers") or {}).items()))
        for c in ("cost_seeds_for_2pct", "eq_seeds_for_2pct", "eq_n"):
            v = r.get(c)
            d[c] = "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else int(v)
        d["notes"] = display_row(r)["notes"]
        flat.append(d)
    buf = io.StringIO()
    pd.DataFrame(flat, columns=cols).to_csv(buf, index=False)
    return buf.getvalue()


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(c, c) for c in str(s))
    return out.replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); one block per comparison group."""
    cols = [c for c in _display_columns(table) if c != "notes"]
    grouped = groups(table)
    lines = [r"% fp4-ablate report table; requires \usepackage{booktabs}",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for i, (key, rows) in enumerate(grouped):
        if len(grouped) > 1:
            if i:
                lines.append(r"\midrule")
            title = latex_escape(group_title(key, _posthoc(rows)))
            lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{title}}}}} \\")
        for r in rows:
            d = _cells(r, cols + ["notes"])
            lines.append(" & ".join(latex_escape(d[c]) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def write_tables(table: pd.DataFrame, out_dir: Union[str, Path], profiles: Sequence[str] = ()) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "table.md": atomic_write(out_dir / "table.md", to_markdown(table, profiles)),
        "table.csv": atomic_write(out_dir / "table.csv", to_csv(table, profiles)),
        "table.tex": atomic_write(out_dir / "table.tex", to_latex(table)),
    }
