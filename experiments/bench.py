"""`fp4-ablate bench`: what the quantization kernels and the emulated training steps cost.

Everything is measured in one process on one GPU and reported as ratios taken inside that
run, so numbers from different machines are never mixed:

1. kernels (`bench_kernels`): each quantizer on an 8192 x 8192 bf16 tensor, both orientations,
   against the device-to-device copy bandwidth measured in the same run, beside the torch
   reference eager and under torch.compile, with a bit-exactness pass on planted hard blocks;
2. training steps: median step time and peak memory of the ~20M and ~150M models at sequence
   length 512 for bf16, fp8, each ladder rung and wgrad with each stabilizer, as ratios to bf16
   (eager for every configuration; compiled for the ones the targets name; and replayed as one
   CUDA graph per step, which removes the host's share of the step: the emulation launches many
   small kernels per GEMM, so an eager step can be bound by Python dispatch, not by the GPU);
3. `results/bench/<device>.md` and `<device>.json` with the device, the versions and the command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from fp4_configs.schema import ModelConfig
from .rundir import atomic_write_json, atomic_write_text, git_commit, versions

STEP_CONFIGS = [("bf16", "none"), ("fp8", "none"), ("fprop", "none"), ("dgrad", "none"),
                ("wgrad", "none"), ("wgrad", "sr"), ("wgrad", "rht"), ("wgrad", "h16")]
COMPILED_CONFIGS = [("bf16", "none"), ("wgrad", "h16"), ("fp8", "none")]


def graphable(ladder: str, stabilizer: str) -> bool:
    """A captured graph replays the same kernels with the same arguments every step, so only
    configurations that draw nothing on the host per step can be graphed faithfully: stochastic
    rounding and random Hadamard signs take fresh seeds from host-side generators each step."""
    from fp4.recipe import Recipe
    return not Recipe(ladder=ladder, stabilizer=stabilizer).random_draws


MODES = ("eager", "compile", "cuda_graph")


def load_model_config(name: str):
    folder = files("fp4_configs") / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(valid)}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(str(path)))


def _train_step(model, x, opt, autocast_cache: bool = True) -> torch.Tensor:
    from .model import causal_lm_loss
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=autocast_cache):
        loss = causal_lm_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    return loss


def _capture_step(model, x, opt, warmup: int) -> "torch.cuda.CUDAGraph":
    """Forward, backward and AdamW of one step as a CUDA graph (PyTorch's whole-network recipe):
    warm up on a side stream, then capture with grads unset so backward allocates them in the
    graph's pool and every replay overwrites them in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            opt.zero_grad(set_to_none=True)
            _train_step(model, x, opt, autocast_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        _train_step(model, x, opt, autocast_cache=False)
    return graph


def bench_step(model_name: str, ladder: str, stabilizer: str, *, batch: int, seq_len: int,
               vocab: int, steps: int, warmup: int, mode: str, device,
               profile: bool = False) -> Dict:
    from fp4.linear import ExecutionConfig, QuantState
    from fp4.recipe import Recipe
    from .model import build_llama

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    torch.manual_seed(0)
    mcfg = load_model_config(model_name)
    mcfg.seq_len = seq_len
    state = QuantState(seed=0, execution=ExecutionConfig(quant_backend="auto", real_fp8=True))
    model, info = build_llama(mcfg, vocab, Recipe(ladder=ladder, stabilizer=stabilizer), state)
    model.to(device)
    graphed = mode == "cuda_graph"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
    fwd = torch.compile(model) if mode == "compile" else model
    x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    if graphed:
        graph = _capture_step(model, x, opt, warmup)
        step, warmup = graph.replay, 1
    else:
        def step():
            _train_step(fwd, x, opt)
            opt.zero_grad(set_to_none=True)
            state.advance_step()
    times: List[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(warmup + steps):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    peak = torch.cuda.max_memory_allocated(device)
    profile_table = None
    if profile:
        # Where the time goes: CUDA time per kernel over 3 more steps, top entries.
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize(device)
        profile_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                                  max_name_column_width=60)
    del model, opt, fwd, step
    torch.cuda.empty_cache()
    return {"model": model_name, "ladder": ladder, "stabilizer": stabilizer, "mode": mode,
            "params": info.param_count, "batch": batch, "seq_len": seq_len,
            "median_step_s": statistics.median(times), "peak_mem_bytes": peak,
            "tokens_per_s": batch * seq_len / statistics.median(times),
            **({"profile": profile_table} if profile_table else {})}


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: Optional[int]):
    """Bound a compiled configuration: a compile that runs away becomes a recorded row."""
    if not seconds:
        yield
        return

    def fire(signum, frame):
        raise _Timeout(f"gave up after {seconds} s (compilation did not finish)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def config_name(ladder: str, stabilizer: str) -> str:
    return ladder if stabilizer == "none" else f"{ladder}+{stabilizer}"


def step_plan(model_name: str, compile_models: List[str], graph_models: List[str],
              configs: Optional[List[str]] = None) -> List[Tuple[str, str, str]]:
    """(ladder, stabilizer, mode) of every step row of one model, optionally only `configs`."""
    plan = [(l, s, "eager") for l, s in STEP_CONFIGS]
    if model_name in compile_models:
        plan += [(l, s, "compile") for l, s in COMPILED_CONFIGS]
    if model_name in graph_models:
        plan += [(l, s, "cuda_graph") for l, s in STEP_CONFIGS if graphable(l, s)]
    if configs:
        known = [config_name(l, s) for l, s in STEP_CONFIGS]
        bad = [c for c in configs if c not in known]
        if bad:
            raise ValueError(f"unknown step configuration(s) {', '.join(bad)}; valid: {', '.join(known)}")
        plan = [p for p in plan if config_name(p[0], p[1]) in configs]
    return plan


def bench_steps(models: List[str], batches: Dict[str, int], seq_len: int, steps: int,
                warmup: int, device, compile_models: List[str],
                profile_model: Optional[str] = None, compile_timeout: Optional[int] = None,
                on_row=None, graph_models: Sequence[str] = (),
                configs: Optional[List[str]] = None) -> List[Dict]:
    rows = []
    for model_name in models:
        for ladder, stab, mode in step_plan(model_name, compile_models, list(graph_models), configs):
            t0 = time.time()
            try:
                profile = (model_name == profile_model and mode == "eager"
                           and (ladder, stab) in (("fp8", "none"), ("wgrad", "h16")))
                with _time_limit(compile_timeout if mode == "compile" else None):
                    row = bench_step(model_name, ladder, stab, batch=batches[model_name],
                                     seq_len=seq_len, vocab=8192, steps=steps, warmup=warmup,
                                     mode=mode, device=device, profile=profile)
            except (Exception, _Timeout) as err:  # recorded in the table: a failure is a result here
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                row = {"model": model_name, "ladder": ladder, "stabilizer": stab, "mode": mode,
                       "error": f"{type(err).__name__}: {err}"[:300]}
            row["wall_s"] = time.time() - t0
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if row.get("profile"):
                print(row["profile"], flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def _mode(row: Dict) -> str:
    # Rows written before the cuda_graph mode existed carry compiled: bool instead of mode.
    return row.get("mode") or ("compile" if row.get("compiled") else "eager")


def add_ratios(rows: List[Dict]) -> None:
    """Ratios to bf16 of the same model and mode, inside this run."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["ladder"] == "bf16"
                    and _mode(r) == _mode(row) and "error" not in r), None)
        if ref and "error" not in row:
            row["step_ratio_vs_bf16"] = row["median_step_s"] / ref["median_step_s"]
            row["mem_ratio_vs_bf16"] = row["peak_mem_bytes"] / ref["peak_mem_bytes"]


def render(meta: Dict, kernel_rows: List[Dict], step_rows: List[Dict]) -> str:
    lines = [f"# fp4-ablate benchmark: {meta['device_name']}", "",
             f"- command: `{meta['command']}`", f"- git commit: {meta['git_commit']}",
             f"- versions: {meta['versions']}", f"- date: {meta['date']}", ""]
    if kernel_rows:
        lines += ["## Quantization kernels", "",
                  "| op | orientation | impl | median ms | GB/s | % of copy | bit-exact |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in kernel_rows:
            lines.append(f"| {r.get('op')} | {r.get('orientation')} | {r.get('impl')} | "
                         f"{_f(r.get('median_ms'), 3)} | {_f(r.get('gbps'), 0)} | "
                         f"{_f(r.get('pct_copy'), 1)} | {r.get('correct', r.get('error', ''))} |")
        lines.append("")
    if step_rows:
        lines += ["## Training steps (AdamW, bf16 autocast, random tokens, vocab 8192)", "",
                  "| model | ladder | stabilizer | mode | median step ms | x bf16 | peak GiB | x bf16 mem | tok/s |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in step_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['ladder']} | {r['stabilizer']} | "
                             f"{_mode(r)} | error: {r['error']} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['ladder']} | {r['stabilizer']} | {_mode(r)} | "
                         f"{r['median_step_s'] * 1e3:.1f} | {_f(r.get('step_ratio_vs_bf16'), 3)} | "
                         f"{r['peak_mem_bytes'] / 2**30:.2f} | {_f(r.get('mem_ratio_vs_bf16'), 3)} | "
                         f"{r['tokens_per_s']:,.0f} |")
        for r in step_rows:
            if r.get("profile"):
                lines += ["", f"### Profile: {r['model']} {r['ladder']}+{r['stabilizer']} "
                          "(eager, 3 steps, sorted by CUDA time)", "", "```", r["profile"], "```"]
    return "\n".join(lines) + "\n"


def _f(v, nd) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fp4-ablate bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--size", type=int, default=8192, help="kernel tensor is SIZE x SIZE bf16")
    ap.add_argument("--models", default="llama-20m,llama-150m")
    ap.add_argument("--batches", default="32,16", help="sequences per step, one per model")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-models", default="llama-150m",
                    help="models whose bf16, fp8 and wgrad+h16 steps are also timed compiled "
                         "('' for none)")
    ap.add_argument("--graph-models", default="llama-150m",
                    help="models whose deterministic configurations are also timed as one CUDA "
                         "graph per step ('' for none)")
    ap.add_argument("--configs", default="",
                    help="only these step configurations, e.g. bf16,fp8,wgrad+h16 ('' for all)")
    ap.add_argument("--name", default="",
                    help="suffix of the output files: <device>[-NAME].md / .json")
    ap.add_argument("--profile-model", default="llama-150m",
                    help="profile the fp8 and wgrad+h16 steps of this model ('' for none)")
    ap.add_argument("--compile-timeout", type=int, default=150,
                    help="seconds a compiled configuration may take before it is recorded as "
                         "timed out (0: no limit)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    configs = [c for c in args.configs.split(",") if c] or None
    try:  # bad names fail here, before any GPU work
        for model_name in models:
            load_model_config(model_name)
            step_plan(model_name, [], [], configs)
    except ValueError as err:
        ap.error(str(err))
    if not torch.cuda.is_available():
        print("fp4-ablate bench: needs a CUDA GPU (the timings it reports are GPU timings); "
              "on the CPU run the tests instead", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    batches = dict(zip(models, (int(b) for b in args.batches.split(","))))
    name = torch.cuda.get_device_name(device)
    meta = {"device_name": name, "versions": versions(), "git_commit": git_commit()[0],
            "command": "fp4-ablate bench " + shlex.join(argv if argv is not None else sys.argv[2:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = Path(args.out)
    slug = name.lower().replace(" ", "-") + (f"-{args.name}" if args.name else "")
    kernel_rows: List[Dict] = []

    def write(step_rows: List[Dict]) -> None:
        # Written after every section and step row, so a run cut short keeps what it measured.
        add_ratios(step_rows)
        atomic_write_json(out / f"{slug}.json", {"meta": meta, "kernels": kernel_rows,
                                                 "steps": step_rows})
        atomic_write_text(out / f"{slug}.md", render(meta, kernel_rows, step_rows))

    if not args.skip_kernels:
        from .bench_kernels import bench_kernels
        kernel_rows = bench_kernels(device="cuda", size=args.size)
        write([])
    step_rows = [] if args.skip_steps else bench_steps(
        models, batches, args.seq_len, args.steps, args.warmup, device,
        [m for m in args.compile_models.split(",") if m], args.profile_model or None,
        args.compile_timeout or None, on_row=write,
        graph_models=[m for m in args.graph_models.split(",") if m],
        configs=configs)
    write(step_rows)
    print(render(meta, kernel_rows, step_rows))
    return 0
