"""`fp4-ablate bench`: what the quantization kernels and the runner's training steps cost, beside
the training stacks a researcher would use instead.

Everything is measured in one process on one GPU and reported as ratios taken inside that run, so
numbers from different machines are never mixed:

1. kernels (`bench_kernels`): each quantizer timed on a 4 x 8192 x 8192 bf16 tensor (checked on
   8192 x 8192), both orientations,
   against the device-to-device copy bandwidth measured in the same run, beside the torch
   reference eager and under torch.compile, with a bit-exactness pass on planted hard blocks;
2. the runner's own step (`bench_steps`: the config `fp4-ablate run` composes, its model, and the
   training loop's TrainStep, on synthetic batches) for bf16, fp8, each ladder rung, wgrad with each
   stabilizer and wgrad in NVFP4 and UFP4: eager (`hardware=auto`) and compiled (`hardware=cuda`),
   with median step time, tokens/s, peak memory, compile time, graph breaks and recompiles, and for
   compiled rows a correctness pass (the first steps' loss and gradients equal to eager's, bit for bit);
3. the peers (`bench_peers`), same process, same Llama shape: plain `transformers` bf16 and torchao
   float8 (tensorwise), both compiled; every runner row as step-time ratios to them, and issue 12's
   targets as a met / missed table;
4. sweep packing (`bench_pack`): aggregate tokens/s of J concurrent runner step loops on the GPU,
   as `sweep.jobs_per_gpu=J` runs them;
5. `results/bench/<device>.md` and `<device>.json` with the device, the versions, the command and
   the commit, rewritten after every row so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from fp4_configs.schema import ModelConfig
from .bench_report import add_ratios, evaluate_targets, render
from .bench_steps import LABELS, parse_config
from .rundir import atomic_write_json, atomic_write_text, git_commit, versions

COMPILE_CONFIGS = ["bf16", "fp8", "wgrad", "wgrad+sr", "wgrad+rht", "wgrad+h16"]
MIN_ROW_S = 20  # a row is not started with less of the time budget left


def load_model_config(name: str):
    folder = files("fp4_configs") / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(valid)}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(str(path)))


SECTIONS = ("eager", "peers", "compile", "pack")
MODES = ("eager", "compile")  # how a step runs: the runner's rows and the peers' alike


def plan(models: Sequence[str], configs: Sequence[str], *, eager_models: Sequence[str] = (),
         compile_models: Sequence[str] = (), compile_configs: Sequence[str] = (),
         peers: Sequence[str] = (), peer_models: Sequence[str] = (),
         peer_modes: Sequence[str] = ("compile",), check: bool = True,
         pack_jobs: Sequence[int] = (), pack_model: str = "llama-20m", pack_config: str = "fp8",
         pack_mode: str = "compile", order: Sequence[str] = SECTIONS) -> List[Dict]:
    """Every row of the bench, in the order they run: section by section (`order`), each over the
    models in turn. eager: the eager runner rows; peers; compile: the eager-vs-eager control of the
    correctness pass, then the compiled runner rows; pack: the sweep-packing rows (pack_mode:
    compile = what a sweep's `fp4-ablate run` jobs do on CUDA, compiled and replayed as a CUDA
    graph; eager = hardware.compile=false, no graph)."""
    from .bench_peers import PEERS
    for label in [*configs, *compile_configs, *([pack_config] if pack_jobs else [])]:
        parse_config(label)  # ValueError naming the valid ones
    bad = [p for p in peers if p not in PEERS] + [f"mode {m}" for m in peer_modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown peer(s) {', '.join(bad)}; valid: {', '.join(PEERS)} "
                         "(modes: eager, compile)")
    if pack_mode not in MODES:
        raise ValueError(f"unknown pack mode {pack_mode!r}; valid: {', '.join(MODES)}")
    bad = [s for s in order if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    jobs: List[Dict] = []
    for section in order:
        for m in models:
            if section == "eager" and m in eager_models:
                jobs += [{"kind": "runner", "model": m, "config": c, "mode": "eager"} for c in configs]
            if section == "peers" and m in peer_models:
                jobs += [{"kind": "peer", "model": m, "peer": p, "mode": pm}
                         for pm in peer_modes for p in peers]
            if section == "compile" and m in compile_models and compile_configs:
                if check:
                    jobs.append({"kind": "check", "model": m, "config": compile_configs[0],
                                 "mode": "eager"})
                jobs += [{"kind": "runner", "model": m, "config": c, "mode": "compile"}
                         for c in compile_configs]
        if section == "pack":
            jobs += [{"kind": "pack", "model": pack_model, "config": pack_config, "mode": pack_mode,
                      "jobs": int(j)} for j in pack_jobs]
    return jobs


class _Timeout(BaseException):
    """Not an Exception: nothing on the way (torch.compile's error handling) may swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: Optional[float]):
    """Bound a row: a compile or a step that runs away becomes a recorded row."""
    if not seconds:
        yield
        return
    seconds = max(int(seconds), 1)

    def fire(signum, frame):
        raise _Timeout(f"gave up after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def identity(job: Dict) -> Dict:
    """The keys a row has even when it failed (what the tables and the report read)."""
    row = {k: job[k] for k in ("kind", "model", "mode") if k in job}
    if job["kind"] in ("runner", "check", "pack"):
        fmt, ladder, stab = parse_config(job["config"])
        row.update(config=job["config"], format=fmt, ladder=ladder, stabilizer=stab)
    if job["kind"] == "peer":
        row["peer"] = job["peer"]
    if job["kind"] == "pack":
        row["jobs"] = job["jobs"]
    return row


def run_job(job: Dict, args) -> Dict:
    """One row of the plan (no time limit here; see run_plan)."""
    from . import bench_pack, bench_peers, bench_steps
    shape = {"batch": args.batch_of.get(job["model"]), "seq_len": args.seq_len or None,
             "vocab": args.vocab}
    runner_args = {**shape, "micro": args.micro_batch or None, "extra": args.override}
    if job["kind"] == "runner":
        return bench_steps.runner_row(
            job["model"], job["config"], job["mode"], steps=args.steps, warmup=args.warmup,
            check_steps=args.check_steps if job["mode"] == "compile" else 0,
            profile=job["model"] == args.profile_model and job["mode"] in args.profile_modes
            and job["config"] in args.profile_configs, **runner_args)
    if job["kind"] == "check":
        return bench_steps.eager_repeatable(job["model"], job["config"], args.check_steps, **runner_args)
    if job["kind"] == "peer":
        return bench_peers.peer_row(job["model"], job["peer"], job["mode"], steps=args.steps,
                                    warmup=args.warmup, **shape)
    overrides = bench_steps.config_overrides(job["model"], job["config"], job["mode"], **runner_args)
    return bench_pack.pack_row(job["jobs"], overrides, seconds=args.pack_seconds,
                               warmup=args.warmup, label=job["config"], model=job["model"])


def run_plan(jobs: List[Dict], args, on_row=None, runner=run_job) -> Dict[str, List[Dict]]:
    """Run every job under its time limit and the overall budget; rows by section."""
    out: Dict[str, List[Dict]] = {"steps": [], "peers": [], "checks": [], "packing": []}
    section = {"runner": "steps", "peer": "peers", "check": "checks", "pack": "packing"}
    end = time.time() + args.time_budget if args.time_budget else None
    for job in jobs:
        t0 = time.time()
        row = identity(job)
        left = None if end is None else end - t0
        if left is not None and left < MIN_ROW_S:
            row["skipped"] = f"time budget ({args.time_budget} s) spent"
        else:
            compiled = job.get("mode") == "compile"
            limits = [x for x in (args.compile_timeout if compiled else args.row_timeout, left) if x]
            limit = min(limits) if limits else None
            try:
                with _time_limit(limit):
                    row = {**row, **runner(job, args)}
            except (Exception, _Timeout) as err:  # recorded in the table: a failure is a result
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                _cleanup()
        row["wall_s"] = time.time() - t0
        print(json.dumps({k: v for k, v in row.items()
                          if k not in ("profile", "overrides", "step_times_s")}), flush=True)
        if row.get("profile"):
            print(row["profile"], flush=True)
        out[section[job["kind"]]].append(row)
        if on_row is not None:
            on_row(out)
    return out


def _cleanup() -> None:
    import gc
    import torch._dynamo
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _names(value: str, default: Sequence[str]) -> List[str]:
    if value == "all":
        return list(default)
    return [v.strip() for v in value.split(",") if v.strip()]


def _gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fp4-ablate bench", description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--out", default="results/bench")
    a("--name", default="", help="suffix of the output files: <device>[-NAME].md / .json")
    a("--size", type=int, default=8192, help="kernel tensor: 4 * SIZE x SIZE bf16 timed, SIZE x SIZE checked")
    a("--skip-kernels", action="store_true")
    a("--skip-steps", action="store_true", help="kernels only: no runner, peer or packing rows")
    a("--models", default="llama-20m,llama-150m")
    a("--batches", default="", help="sequences per step, one per model ('': train=gpu's, 64)")
    a("--seq-len", type=int, default=0, help="tokens per sequence (0: the model's own)")
    a("--micro-batch", type=int, default=0, help="train.micro_batch_size (0: the whole batch)")
    a("--vocab", type=int, default=8192, help="tokenizer.vocab_size of the synthetic tokens")
    a("--steps", type=int, default=8, help="timed steps per row (median reported)")
    a("--warmup", type=int, default=2, help="untimed steps before them")
    a("--configs", default="all", help=f"eager runner rows ('all': {','.join(LABELS)})")
    a("--eager-models", default="all", help="models with eager runner rows ('all': --models)")
    a("--compile-models", default="llama-150m", help="models with compiled rows ('' for none)")
    a("--compile-configs", default=",".join(COMPILE_CONFIGS), help="configs of the compiled rows")
    a("--check-steps", type=int, default=2,
      help="steps of the compiled-vs-eager bit-exactness pass per compiled row (0: off)")
    a("--peers", default="transformers-bf16,torchao-float8", help="peers ('' for none)")
    a("--peer-models", default="all", help="models with peer rows ('all': --models)")
    a("--peer-modes", default="compile", help="eager and/or compile")
    a("--pack-jobs", default="", help="sweep packing: J concurrent jobs, e.g. 1,2,4 ('' for none)")
    a("--pack-model", default="llama-20m")
    a("--pack-config", default="fp8")
    a("--pack-seconds", type=float, default=10.0, help="measured wall time of each packed job")
    a("--pack-mode", default="compile", choices=MODES,
      help="the packed jobs' step: compile (as a sweep's runs on CUDA: compiled, CUDA graph) or eager")
    a("--override", action="append", default=[], metavar="KEY=VALUE",
      help="extra Hydra override of every runner row (repeatable), e.g. hardware.quant_backend=torch")
    a("--profile-model", default="", help="profile the steps of this model (--profile-configs "
      "in --profile-modes)")
    a("--profile-configs", default="fp8,wgrad+h16", help="configs profiled ('all': every label)")
    a("--profile-modes", default="eager", help="eager and/or compile")
    a("--row-timeout", type=int, default=180, help="seconds an eager row may take (0: no limit)")
    a("--compile-timeout", type=int, default=240,
      help="seconds a compiled row (its compile, steps and correctness pass) may take (0: no limit)")
    a("--order", default=",".join(SECTIONS), help="the order of the sections")
    a("--time-budget", type=int, default=0,
      help="seconds for all rows; rows that would start later are recorded as skipped (0: none)")
    a("--graph-models", default="", help=argparse.SUPPRESS)  # the dropped cuda_graph mode
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    models = _names(args.models, [])
    if args.graph_models:
        ap.error("the cuda_graph mode was dropped: the runner has no CUDA-graph step to time "
                 "(rows time the runner's own step; --override can select a runner option)")
    try:  # bad names fail here, before any GPU work
        for model_name in models + [args.pack_model]:
            load_model_config(model_name)
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        if batches and len(batches) != len(models):
            raise ValueError(f"--batches has {len(batches)} values for {len(models)} models")
        args.batch_of = dict(zip(models, batches))
        args.profile_configs = _names(args.profile_configs, LABELS)
        args.profile_modes = _names(args.profile_modes, MODES)
        for label in args.profile_configs:
            try:
                parse_config(label)
            except ValueError as err:
                raise ValueError(f"--profile-configs: {err}") from None
        for mode in args.profile_modes:
            if mode not in MODES:
                raise ValueError(f"--profile-modes: {mode!r} is not {' or '.join(MODES)}")
        jobs = plan(models, _names(args.configs, LABELS),
                    eager_models=_names(args.eager_models, models),
                    compile_models=_names(args.compile_models, models),
                    compile_configs=_names(args.compile_configs, COMPILE_CONFIGS),
                    peers=_names(args.peers, []), peer_models=_names(args.peer_models, models),
                    peer_modes=_names(args.peer_modes, []), check=args.check_steps > 0,
                    pack_jobs=[int(j) for j in _names(args.pack_jobs, [])],
                    pack_model=args.pack_model, pack_config=args.pack_config, pack_mode=args.pack_mode,
                    order=_names(args.order, SECTIONS))
    except ValueError as err:
        ap.error(str(err))
    name = _gpu_name()
    if name is None:
        print("fp4-ablate bench: needs a CUDA GPU (the timings it reports are GPU timings); "
              "on the CPU run the tests instead", file=sys.stderr)
        return 2
    from .bench_peers import torchao_version
    meta = {"device_name": name, "versions": {**versions(), "torchao": torchao_version()},
            "git_commit": git_commit()[0],
            "command": "fp4-ablate bench " + shlex.join(argv if argv is not None else sys.argv[2:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {"steps": args.steps, "warmup": args.warmup, "vocab": args.vocab,
                         "batches": args.batch_of or "train=gpu's",
                         "seq_len": args.seq_len or "model's own",
                         "micro_batch": args.micro_batch or "whole batch",
                         "check_steps": args.check_steps, "overrides": args.override}}
    out = Path(args.out)
    slug = name.lower().replace(" ", "-") + (f"-{args.name}" if args.name else "")
    kernel_rows: List[Dict] = []
    rows: Dict[str, List[Dict]] = {}

    def write(sections: Dict[str, List[Dict]]) -> None:
        rows.update(sections)
        add_ratios(rows.get("steps", []), rows.get("peers", []), rows.get("packing", []))
        targets = evaluate_targets(rows.get("steps", []), rows.get("peers", []))
        atomic_write_json(out / f"{slug}.json", {"meta": meta, "kernels": kernel_rows, **rows,
                                                 "targets": targets})
        atomic_write_text(out / f"{slug}.md", render(meta, kernel_rows, rows, targets))

    if not args.skip_kernels:
        from .bench_kernels import bench_kernels
        kernel_rows = bench_kernels(device="cuda", size=args.size)
        write({})
    if not args.skip_steps:
        run_plan(jobs, args, on_row=write)
    write(rows)
    print(render(meta, kernel_rows, rows, evaluate_targets(rows.get("steps", []),
                                                           rows.get("peers", []))))
    return 0
