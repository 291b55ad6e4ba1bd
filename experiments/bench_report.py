"""Ratios, issue 12's targets and the Markdown of `fp4-ablate bench`: pure functions of its rows.

Ratios are taken inside one bench run. A runner row's `x_<peer>` is its median step time over the
peer's on the same model (the compiled peer where there is one, else the eager one; `<= 1.0`: as
fast); `step_ratio_vs_bf16` / `mem_ratio_vs_bf16` compare it with the runner's bf16 row of the same
model and mode. The targets are read against the *compiled* peers only, as the issue states them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .bench_pack import add_pack_ratios
from .bench_steps import LABELS

PEER_KEYS = {"transformers-bf16": "x_transformers_bf16", "torchao-float8": "x_torchao_float8"}
FP4_LABELS = [label for label in LABELS if label not in ("bf16", "fp8")]
TARGETS = [
    {"target": "fp8 step <= torchao float8 step", "kind": "step", "config": "fp8",
     "peer": "torchao-float8", "limit": 1.0},
    {"target": "bf16 step <= 1.02x transformers bf16", "kind": "step", "config": "bf16",
     "peer": "transformers-bf16", "limit": 1.02},
    {"target": "wgrad+h16 step <= 1.15x transformers bf16", "kind": "step", "config": "wgrad+h16",
     "peer": "transformers-bf16", "limit": 1.15},
    {"target": "wgrad+sr step <= 1.25x transformers bf16", "kind": "step", "config": "wgrad+sr",
     "peer": "transformers-bf16", "limit": 1.25},
    {"target": "wgrad+rht step <= 1.25x transformers bf16", "kind": "step", "config": "wgrad+rht",
     "peer": "transformers-bf16", "limit": 1.25},
    {"target": "peak memory <= 1.2x bf16 (worst FP4 configuration)", "kind": "mem", "limit": 1.2},
    {"target": "hardware=cuda compile <= 90 s (slowest configuration)", "kind": "compile",
     "limit": 90.0},
]


def ok(row: Dict) -> bool:
    return "error" not in row and "skipped" not in row and row.get("median_step_s") is not None


def label(row: Dict) -> str:
    """A row's configuration label (rows written before labels existed: ladder[+stabilizer])."""
    if row.get("config"):
        return row["config"]
    stab = row.get("stabilizer", "none")
    return row.get("ladder", "?") if stab == "none" else f"{row.get('ladder')}+{stab}"


def peer_reference(peers: Sequence[Dict], model: str, peer: str,
                   modes: Sequence[str] = ("compile", "eager")) -> Optional[Dict]:
    for mode in modes:
        for r in peers:
            if r.get("model") == model and r.get("peer") == peer and r.get("mode") == mode and ok(r):
                return r
    return None


def _mem_ratio(a: Dict, b: Dict) -> Optional[float]:
    """Peak memory of a over b: reserved where both rows have it (a replayed CUDA graph's tensors
    are reserved, never allocated again: bench_steps.peak_memory), else allocated."""
    if a.get("peak_reserved_bytes") and b.get("peak_reserved_bytes"):
        return a["peak_reserved_bytes"] / b["peak_reserved_bytes"]
    if a.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
        return a["peak_mem_bytes"] / b["peak_mem_bytes"]
    return None


def add_ratios(steps: List[Dict], peers: Sequence[Dict] = (), packing: List[Dict] = ()) -> None:
    """Fill the ratio keys of every measured row, in place."""
    for row in steps:
        if not ok(row):
            continue
        bf16 = next((r for r in steps if r.get("model") == row.get("model") and label(r) == "bf16"
                     and r.get("mode") == row.get("mode") and ok(r)), None)
        if bf16:
            row["step_ratio_vs_bf16"] = row["median_step_s"] / bf16["median_step_s"]
            row["mem_ratio_vs_bf16"] = _mem_ratio(row, bf16)
        for peer, key in PEER_KEYS.items():
            ref = peer_reference(peers, row.get("model"), peer)
            if ref:
                row[key] = row["median_step_s"] / ref["median_step_s"]
                row[f"{key}_mode"] = ref["mode"]
                row[f"mem_{key}"] = _mem_ratio(row, ref)
    for row in peers:
        ref = peer_reference(peers, row.get("model"), "transformers-bf16")
        if ok(row) and ref:
            row["x_transformers_bf16"] = row["median_step_s"] / ref["median_step_s"]
            row["x_transformers_bf16_mode"] = ref["mode"]
    add_pack_ratios(list(packing))


def _why(row: Optional[Dict], what: str) -> str:
    if row is None:
        return f"no {what} row"
    return f"{what}: " + str(row.get("error") or row.get("skipped") or "no timing")


def evaluate_targets(steps: Sequence[Dict], peers: Sequence[Dict]) -> List[Dict]:
    """One row per target x model x mode that has runner rows: measured, limit, met / missed."""
    out: List[Dict] = []
    models = list(dict.fromkeys(r.get("model") for r in steps))
    for t in TARGETS:
        for model in models:
            for mode in ("eager", "compile"):
                rows = [r for r in steps if r.get("model") == model and r.get("mode") == mode]
                if not rows or (t["kind"] == "compile" and mode != "compile"):
                    continue
                res = {"target": t["target"], "model": model, "mode": mode, "limit": t["limit"],
                       "measured": None, "config": t.get("config"), "note": ""}
                if t["kind"] == "step":
                    row = next((r for r in rows if label(r) == t["config"]), None)
                    if row is None:
                        continue
                    ref = next((r for r in peers if r.get("model") == model and
                                r.get("peer") == t["peer"] and r.get("mode") == "compile"), None)
                    if not ok(row):
                        res["note"] = _why(row, "runner row")
                    elif ref is None or not ok(ref):
                        res["note"] = _why(ref, f"compiled {t['peer']}")
                    else:
                        res["measured"] = row["median_step_s"] / ref["median_step_s"]
                elif t["kind"] == "mem":
                    bf16 = next((r for r in rows if label(r) == "bf16" and ok(r)), None)
                    ratios = [(_mem_ratio(r, bf16), label(r)) for r in rows
                              if bf16 and ok(r) and label(r) in FP4_LABELS and _mem_ratio(r, bf16)]
                    if not any(label(r) in FP4_LABELS for r in rows):
                        continue
                    if ratios:
                        res["measured"], res["config"] = max(ratios)
                    else:
                        res["note"] = "no measured bf16 and FP4 rows with peak memory"
                else:
                    slow = [label(r) for r in rows if "gave up" in str(r.get("error", ""))]
                    times = [(r["compile_s"], label(r)) for r in rows
                             if ok(r) and r.get("compile_s") is not None]
                    if slow:
                        res["status"], res["config"] = "missed", ",".join(slow)
                        res["note"] = f"timed out: {', '.join(slow)}"
                    elif times:
                        res["measured"], res["config"] = max(times)
                    else:
                        res["note"] = "no compiled row finished"
                if "status" not in res:
                    res["status"] = ("no data" if res["measured"] is None else
                                     "met" if res["measured"] <= t["limit"] else "missed")
                out.append(res)
    return out


def _f(v, nd: int, suffix: str = "") -> str:
    return "" if v is None else f"{v:.{nd}f}{suffix}"


def _gib(v) -> str:
    return "" if not v else f"{v / 2**30:.2f}"


def _ms(row: Dict) -> str:
    return _f(row.get("median_step_s") and row["median_step_s"] * 1e3, 1)


def _cell(text, limit: int = 160) -> str:
    """One table cell of free text (an error message): one line, no column breaks, bounded."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _failed(cells: List[str], row: Dict, width: int) -> str:
    what = f"error: {row['error']}" if "error" in row else f"skipped: {row.get('skipped', '?')}"
    return "| " + " | ".join(cells + [_cell(what)] + [""] * (width - len(cells) - 1)) + " |"


def _compile_cells(r: Dict) -> List[str]:
    if r.get("compile_s") is None:
        return ["", ""]
    first = f" ({r['first_step_s']:.1f})" if r.get("first_step_s") is not None else ""
    return [_f(r["compile_s"], 1) + first, f"{r.get('graphs_first_step')} / "
            f"{r.get('graph_breaks')} / {r.get('recompiles_after_first_step')}"]


def _peer_x(r: Dict, key: str) -> str:
    v = r.get(key)
    return "" if v is None else _f(v, 3) + (" (eager)" if r.get(f"{key}_mode") == "eager" else "")


def _steps_table(steps: List[Dict]) -> List[str]:
    head = ["model", "config", "mode", "median ms", "tok/s", "peak GiB (alloc / reserved)", "x bf16",
            "x transformers-bf16", "x torchao-float8", "mem x bf16", "compile s (first step s)",
            "graphs / breaks / recompiles", "bit-exact vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 8 + "---|---|"]
    for r in steps:
        graph = " (CUDA graph)" if (r.get("cuda_graph") or {}).get("used") else ""
        cells = [str(r.get("model")), label(r), str(r.get("mode")) + graph]
        if not ok(r):
            lines.append(_failed(cells, r, len(head)))
            continue
        exact = ("check failed" if "check_error" in r else "" if "bit_exact" not in r
                 else "yes" if r["bit_exact"] else "**no**")
        cells += [_ms(r), f"{r['tokens_per_s']:,.0f}", _peaks(r),
                  _f(r.get("step_ratio_vs_bf16"), 3), _peer_x(r, "x_transformers_bf16"),
                  _peer_x(r, "x_torchao_float8"), _f(r.get("mem_ratio_vs_bf16"), 3),
                  *_compile_cells(r), exact]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _peaks(r: Dict) -> str:
    reserved = r.get("peak_reserved_bytes")
    return _gib(r.get("peak_mem_bytes")) + ("" if reserved is None else f" / {_gib(reserved)}")


def _peers_table(peers: List[Dict]) -> List[str]:
    head = ["model", "peer", "mode", "median ms", "tok/s", "peak GiB (alloc / reserved)", "x transformers-bf16",
            "compile s (first step s)", "graphs / breaks / recompiles"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 5 + "---|"]
    for r in peers:
        cells = [str(r.get("model")), str(r.get("peer")), str(r.get("mode"))]
        if not ok(r):
            lines.append(_failed(cells, r, len(head)))
            continue
        cells += [_ms(r), f"{r['tokens_per_s']:,.0f}", _peaks(r),
                  _peer_x(r, "x_transformers_bf16"), *_compile_cells(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets_table(targets: List[Dict]) -> List[str]:
    lines = ["| target | model | mode | configuration | measured | limit | met? |",
             "|---|---|---|---|---:|---:|---|"]
    for t in targets:
        unit = " s" if "compile" in t["target"] else "x"
        measured = _f(t["measured"], 1 if unit == " s" else 3, unit) or _cell(t["note"])
        status = {"met": "met", "missed": "**missed**"}.get(t["status"], t["status"])
        if t["note"] and t["measured"] is not None:
            status += f" ({_cell(t['note'])})"
        lines.append(f"| {t['target']} | {t['model']} | {t['mode']} | {t.get('config') or ''} | "
                     f"{measured} | {t['limit']:g}{unit} | {status} |")
    return lines


def _correctness(steps: List[Dict], checks: List[Dict]) -> List[str]:
    lines = []
    for r in checks + [s for s in steps if "bit_exact" in s or "check_error" in s]:
        what = r.get("check") or f"{r.get('mode')} vs eager"
        if "bit_exact" not in r:
            why = r.get("check_error") or r.get("error") or r.get("skipped") or "not run"
            lines.append(f"- {r.get('model')} {label(r)}, {what}: {_cell(why, 400)}")
            continue
        detail = "" if r["bit_exact"] else (
            f": losses equal {r.get('loss_equal')}, grad norms equal {r.get('grad_norm_equal')}, "
            f"{r.get('grads_differing')} of {r.get('grads_compared')} gradients differ "
            f"(worst {r.get('worst_param')}, max rel. diff {r.get('worst_rel_diff', 0):.2e})")
        lines.append(f"- {r.get('model')} {label(r)}, {what}, {r.get('steps')} step(s): "
                     f"{'bit-exact' if r['bit_exact'] else '**not bit-exact**'}{detail}")
    return lines


def _packing_table(packing: List[Dict]) -> List[str]:
    lines = ["| model | config | mode | jobs | aggregate tok/s | x one job | per-job tok/s | "
             "peak GiB per job |", "|---|---|---|---:|---:|---:|---|---:|"]
    for r in packing:
        cells = [str(r.get("model")), label(r), str(r.get("mode", "eager")), str(r.get("jobs"))]
        if "aggregate_tokens_per_s" not in r:
            lines.append(_failed(cells, r, 8))
            continue
        per = ", ".join(f"{v:,.0f}" for v in r["per_job_tokens_per_s"])
        cells += [f"{r['aggregate_tokens_per_s']:,.0f}", _f(r.get("aggregate_vs_one_job"), 2),
                  per, _gib(r.get("peak_mem_bytes_per_job"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(meta: Dict, kernel_rows: List[Dict], rows: Dict[str, List[Dict]],
           targets: Sequence[Dict] = ()) -> str:
    lines = [f"# fp4-ablate benchmark: {meta['device_name']}", "",
             f"- command: `{meta['command']}`", f"- git commit: {meta['git_commit']}",
             f"- versions: {meta['versions']}", f"- date: {meta['date']}"]
    if meta.get("settings"):
        lines.append(f"- settings: {meta['settings']}")
    lines.append("")
    if kernel_rows:
        lines += ["## Quantization kernels", "",
                  "| op | orientation | impl | median ms | GB/s | % of copy | bit-exact |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in kernel_rows:
            lines.append(f"| {r.get('op')} | {r.get('orientation')} | {r.get('impl')} | "
                         f"{_f(r.get('median_ms'), 3)} | {_f(r.get('gbps'), 0)} | "
                         f"{_f(r.get('pct_copy'), 1)} | {r.get('correct', r.get('error', ''))} |")
        lines.append("")
    steps, peers = rows.get("steps") or [], rows.get("peers") or []
    checks, packing = rows.get("checks") or [], rows.get("packing") or []
    if steps:
        lines += ["## The runner's step", "",
                  "Each row is `fp4-ablate run`'s own training step (the config it composes for "
                  "`model=M train=gpu hardware=auto|cuda +ladder=L +stabilizer=S format=F`, its "
                  "model, and the training loop's TrainStep) on synthetic token ids. eager = "
                  "`hardware=auto`, compile = `hardware=cuda`. x peer = step time / the peer's "
                  "(compiled) step time on the same model: <= 1.000 is as fast. compile s = what the "
                  "untimed steps took beyond steady steps (first step s: time to the first step's "
                  "end, compile included). graphs / breaks / recompiles: dynamo graphs after the "
                  "first step, graph breaks, graphs compiled after the first step.", ""] + _steps_table(steps) + [""]
    if peers:
        lines += ["## Peers (same process, same Llama shape, plain transformers)", ""]
        lines += _peers_table(peers) + [""]
    if targets:
        lines += ["## Issue 12 targets", "", "Measured: step-time ratio to the compiled peer "
                  "(memory: peak over the runner's bf16 row of the same mode; compile: seconds).",
                  ""] + _targets_table(list(targets)) + [""]
    correctness = _correctness(steps, checks)
    if correctness:
        lines += ["## Correctness: compiled vs eager", "",
                  "The first steps of each compiled row against an eager build of the same "
                  "config, same init and batches: losses, gradient norms and every parameter's "
                  "gradient, bit for bit. The eager-vs-eager control says whether eager itself "
                  "repeats.", ""] + correctness + [""]
    if packing:
        lines += ["## Sweep packing (`sweep.jobs_per_gpu`)", "",
                  "J processes on the GPU, each its own runner step loop of the same config (mode "
                  "compile: compiled and replayed as a CUDA graph, as a sweep's runs on CUDA; eager: "
                  "neither).", ""]
        lines += _packing_table(packing) + [""]
    for r in steps:
        if r.get("profile"):
            lines += [f"### Profile: {r['model']} {label(r)} ({r.get('mode')}, 3 steps)", "",
                      "```", r["profile"], "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
