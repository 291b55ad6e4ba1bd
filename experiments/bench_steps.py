"""The runner's own training step, timed: what `fp4-ablate bench` measures for each configuration.

Nothing here builds a model or a step its own way. A bench row composes the Hydra config the CLI
composes (`fp4_ablate.hydra_app.precheck`: `model=M train=gpu hardware=H +ladder=L +stabilizer=S
format=F` plus the bench's batch settings), then builds exactly what `fp4-ablate run` builds
(runner.recipe_from_config, runner.execution_config, model.build_llama) and hands it to the
training loop's own wiring, `training.Trainer` (setup_training: optimizer, autocast, compiled
forward; TrainStep: micro-batches, clipping, optimizer step, quantization clock). Only the data
differs: `SyntheticLoader` gives random token ids of the same shapes (deterministic by seed), so no
dataset is prepared. Each timed step is `TrainStep.__call__`, its `dt` the runner's own.

Modes: "eager" is `hardware=auto` (compile off), "compile" is `hardware=cuda` (torch.compile as
setup_training does it). Correctness of a compiled row: its first `check_steps` steps capture the
loss, the gradient norm and every parameter's gradient (after clipping, as the optimizer sees it),
and an eager build of the same config from the same init and batches must give the same bits
(`eager_repeatable` is the control: two eager builds). A row's compile time is what its untimed
steps took beyond steady steps: the first step's compile plus any recompilation as the step and
call counters advance (and the host copies of the checked gradients, well under a second).
"""
from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# (label, format, ladder, stabilizer) of every runner configuration the bench knows.
CONFIGS: List[Tuple[str, str, str, str]] = [
    ("bf16", "mxfp4", "bf16", "none"), ("fp8", "mxfp4", "fp8", "none"),
    ("fprop", "mxfp4", "fprop", "none"), ("dgrad", "mxfp4", "dgrad", "none"),
    ("wgrad", "mxfp4", "wgrad", "none"), ("wgrad+sr", "mxfp4", "wgrad", "sr"),
    ("wgrad+rht", "mxfp4", "wgrad", "rht"), ("wgrad+h16", "mxfp4", "wgrad", "h16"),
    ("nvfp4:wgrad", "nvfp4", "wgrad", "none"), ("ufp4:wgrad", "ufp4", "wgrad", "none"),
]
LABELS = [c[0] for c in CONFIGS]
MODE_HARDWARE = {"eager": "auto", "compile": "cuda"}


def parse_config(label: str) -> Tuple[str, str, str]:
    """'nvfp4:wgrad' -> ('nvfp4', 'wgrad', 'none'); 'wgrad+h16' -> ('mxfp4', 'wgrad', 'h16')."""
    for name, fmt, ladder, stab in CONFIGS:
        if name == label:
            return fmt, ladder, stab
    raise ValueError(f"unknown step configuration {label!r}; valid: {', '.join(LABELS)}")


def config_overrides(model: str, label: str, mode: str, *, batch: Optional[int] = None,
                     seq_len: Optional[int] = None, micro: Optional[int] = None, vocab: int = 8192,
                     seed: int = 0, hardware: Optional[str] = None, train: str = "gpu",
                     extra: Sequence[str] = ()) -> List[str]:
    """The `fp4-ablate run` command line of one bench row (its Hydra overrides)."""
    fmt, ladder, stab = parse_config(label)
    if hardware is None:
        if mode not in MODE_HARDWARE:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODE_HARDWARE)}")
        hardware = MODE_HARDWARE[mode]
    scratch = Path(tempfile.gettempdir()) / "fp4-ablate-bench"
    out = [f"model={model}", f"train={train}", f"hardware={hardware}", f"+ladder={ladder}",
           f"+stabilizer={stab}", f"format={fmt}", f"seed={seed}", f"tokenizer.vocab_size={vocab}",
           "train.progress_bar=false", f"results_dir={scratch / 'runs'}",
           f"cache_dir={scratch / 'cache'}"]
    if batch:
        out.append(f"train.batch_size={batch}")
    if seq_len:
        out.append(f"model.seq_len={seq_len}")
    if micro:
        out.append(f"train.micro_batch_size={micro}")
    if mode == "eager" and hardware != "cpu":
        # hardware=auto compiles on CUDA and replays a CUDA graph where it can: eager is asked for.
        out += ["hardware.compile=false", "hardware.cuda_graphs=false"]
    return out + list(extra)


def compose_config(overrides: Sequence[str]):
    """Composed and validated exactly as `fp4-ablate run` does before it trains."""
    from fp4_ablate.hydra_app import PrecheckError, precheck
    try:
        return precheck(list(overrides))
    except PrecheckError as err:
        raise ValueError(str(err)) from None


class SyntheticLoader:
    """TrainStep's loader interface (`next_batch`) over random token ids: no dataset.

    `pool` fixed batches of (micro, seq_len + 1) ids from a seeded CPU generator, handed out in
    turn as (input_ids, labels) CPU tensors, as experiments/data/loader.py TrainLoader gives them.
    """

    def __init__(self, vocab: int, seq_len: int, micro: int, seed: int = 0, pool: int = 4):
        gen = torch.Generator().manual_seed(int(seed))
        batches = [torch.randint(0, vocab, (micro, seq_len + 1), generator=gen) for _ in range(pool)]
        self.batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
        self.i = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    @property
    def epoch(self) -> float:
        return 0.0


@dataclass
class RunnerBuild:
    """What `fp4-ablate run` would train, wired by the training loop, with a synthetic loader."""
    cfg: object
    device: torch.device
    model: torch.nn.Module
    info: object
    quant_state: object
    paths: Dict[str, str]
    trainer: object           # training.Trainer: .setup (TrainSetup), .step (TrainStep)
    run_dir: Path
    tokens_per_step: int

    def close(self) -> None:
        self.trainer.log.close()
        self.trainer.diagnostics.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def build_runner(cfg, device: Optional[torch.device] = None) -> RunnerBuild:
    """runner._build without the data: same seeds, recipe, QuantState, model; then the Trainer."""
    from fp4.linear import QuantState, gemm_paths
    from .model import build_llama
    from .runner import execution_config, pick_device, recipe_from_config
    from .training import Trainer

    device = device or pick_device(str(cfg.hardware.device))
    vocab = int(cfg.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    recipe = recipe_from_config(cfg)
    quant_state = QuantState(seed=int(cfg.seed), execution=execution_config(cfg, device))
    torch.manual_seed(cfg.seed)  # model init depends on the seed only, as in runner._build
    model, info = build_llama(cfg.model, vocab, recipe, quant_state, eos_id=0)
    model.to(device)
    paths = gemm_paths(recipe, device, quant_state.execution)
    micro = int(cfg.train.micro_batch_size or cfg.train.batch_size)
    loader = SyntheticLoader(vocab, int(cfg.model.seq_len), micro, int(cfg.seed))
    run_dir = Path(tempfile.mkdtemp(prefix="fp4-bench-"))
    trainer = Trainer(cfg=cfg, model=model, loader=loader, val=torch.zeros(0, 1, dtype=torch.long),
                      vocab_size=vocab, quant_state=quant_state, device=device, run_dir=run_dir,
                      resume=False, on_metrics=lambda record: None)
    return RunnerBuild(cfg, device, model, info, quant_state, {str(k): str(v) for k, v in paths.items()},
                       trainer, run_dir, int(cfg.train.batch_size) * int(cfg.model.seq_len))


class _GradSnapshot:
    """Stands in for the optimizer inside TrainStep for a few steps: copies every gradient to the
    host (after clipping, as the optimizer sees it), then steps the real optimizer."""

    def __init__(self, optimizer, model):
        self.optimizer = optimizer
        self.named = [(n, p) for n, p in model.named_parameters()]
        self.grads: List[Dict[str, torch.Tensor]] = []

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        self.grads.append({n: (p.grad.detach().to("cpu", copy=True) if p.grad is not None else None)
                           for n, p in self.named})
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        return self.optimizer.zero_grad(set_to_none=set_to_none)


@dataclass
class Snapshot:
    loss: float
    grad_norm: float
    grads: Dict[str, Optional[torch.Tensor]]


def _lr(build: RunnerBuild, step: int) -> float:
    from .training import lr_at
    return lr_at(step * build.tokens_per_step, build.cfg.train)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(build: RunnerBuild, n: int, start: int = 0, snapshot: bool = False):
    """`n` runner steps (TrainStep.__call__): their StepResults, and Snapshots if asked."""
    step = build.trainer.step
    real = step.optimizer
    spy = _GradSnapshot(real, build.model) if snapshot else None
    if spy is not None:
        step.optimizer = spy
    try:
        results = [step(_lr(build, start + i)) for i in range(n)]
    finally:
        step.optimizer = real
    snaps = ([Snapshot(r.loss, r.grad_norm, g) for r, g in zip(results, spy.grads)]
             if spy is not None else [])
    return results, snaps


def snapshot_steps(cfg, n: int) -> List[Snapshot]:
    """Build `cfg` through the runner path and take `n` steps, capturing losses and gradients."""
    build = build_runner(cfg)
    try:
        return run_steps(build, n, snapshot=True)[1]
    finally:
        build.close()
        _free(build.device)


def compare_snapshots(ref: Sequence[Snapshot], got: Sequence[Snapshot]) -> Dict:
    """bit_exact: same number of steps, and every loss, gradient norm and gradient equal bit for bit."""
    detail = {"steps": len(got), "loss_equal": [], "grad_norm_equal": [], "grads_differing": 0,
              "grads_compared": 0, "worst_param": None, "worst_rel_diff": 0.0}
    if len(ref) != len(got) or not got:
        return {"bit_exact": False, **detail, "note": f"{len(got)} steps against {len(ref)}"}
    for a, b in zip(ref, got):
        detail["loss_equal"].append(a.loss == b.loss)
        detail["grad_norm_equal"].append(a.grad_norm == b.grad_norm)
        for name, ga in a.grads.items():
            gb = b.grads.get(name)
            detail["grads_compared"] += 1
            if ga is None or gb is None:
                same = ga is None and gb is None
            else:
                same = ga.shape == gb.shape and torch.equal(ga, gb)
            if same:
                continue
            detail["grads_differing"] += 1
            if ga is not None and gb is not None and ga.shape == gb.shape:
                rel = float((ga.float() - gb.float()).abs().max() / ga.float().abs().max().clamp_min(1e-30))
                if rel >= detail["worst_rel_diff"]:
                    detail["worst_param"], detail["worst_rel_diff"] = name, rel
    exact = (all(detail["loss_equal"]) and all(detail["grad_norm_equal"])
             and detail["grads_differing"] == 0)
    return {"bit_exact": exact, **detail}


def dynamo_counts() -> Dict[str, int]:
    """Graphs dynamo captured and graph breaks so far (torch._dynamo.utils.counters)."""
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": sorted(counters["graph_break"])[:5]}


def peak_memory(device) -> Dict:
    """Peak GPU memory since the last reset: allocated by tensors, and reserved by the process. A
    replayed CUDA graph's tensors live in its private pool, reserved at capture and never
    allocated again, so only the reserved peak counts them (the memory comparisons use it)."""
    if torch.device(device).type != "cuda":
        return {"peak_mem_bytes": None, "peak_reserved_bytes": None}
    return {"peak_mem_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runner_row(model: str, label: str, mode: str, *, steps: int = 8, warmup: int = 2,
               check_steps: int = 0, profile: bool = False, **compose_args) -> Dict:
    """Time `steps` runner steps of one configuration after max(warmup, check_steps) untimed ones.

    compose_args go to config_overrides (batch, seq_len, micro, vocab, seed, hardware, train, extra).
    With check_steps (compiled rows), the first steps are compared with an eager build's.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    fmt, ladder, stab = parse_config(label)
    overrides = config_overrides(model, label, mode, **compose_args)
    cfg = compose_config(overrides)
    compiled = bool(cfg.hardware.compile)
    torch._dynamo.reset()  # no row reuses another's graphs or counts its compiles
    counters.clear()
    build = build_runner(cfg)
    device = build.device
    row: Dict = {"kind": "runner", "model": model, "config": label, "format": fmt, "ladder": ladder,
                 "stabilizer": stab, "mode": mode, "hardware": str(cfg.hardware.name),
                 "compiled": compiled, "params": build.info.param_count,
                 "batch": int(cfg.train.batch_size), "micro_batch": int(cfg.train.micro_batch_size
                                                                         or cfg.train.batch_size),
                 "seq_len": int(cfg.model.seq_len), "vocab": int(cfg.tokenizer.vocab_size),
                 "tokens_per_step": build.tokens_per_step, "gemm_paths": build.paths,
                 "overrides": overrides}
    try:
        untimed = max(warmup, check_steps, 1)  # a first step is never a steady one
        graphed = getattr(build.trainer.step, "plain_steps", None)  # a GraphedStep (training/graphed.py)
        if graphed is not None:  # its capture is an untimed step too
            untimed = max(untimed, graphed + 1)
        warm, snaps, after_first = [], [], {}
        for i in range(untimed):  # one at a time: the graphs compiled by the first step are counted
            results, taken = run_steps(build, 1, start=i, snapshot=i < check_steps)
            warm.append(results[0].dt)
            snaps += taken
            if i == 0:
                after_first = dynamo_counts()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed, _ = run_steps(build, steps, start=untimed)
        dts = [r.dt for r in timed]
        median = statistics.median(dts)
        row.update(median_step_s=median, tokens_per_s=build.tokens_per_step / median,
                   step_times_s=dts, warmup_step_s=warm, steps=steps, warmup=untimed,
                   last_loss=timed[-1].loss, **peak_memory(device))
        row["first_step_s"] = warm[0]
        # Whether the timed steps replayed a CUDA graph (hardware.cuda_graphs), or why not.
        row["cuda_graph"] = dict(build.trainer.cuda_graph) if build.trainer.cuda_graph is not None else None
        end = dynamo_counts()
        if compiled or end["graphs"]:  # whatever compiled it (setup_training decides how)
            # Compile time: what the untimed steps took beyond steady steps (first-step compile
            # plus any recompilation as the step counters advance).
            row.update(compile_s=max(sum(warm) - median * len(warm), 0.0),
                       graphs_first_step=after_first["graphs"],
                       recompiles_after_first_step=end["graphs"] - after_first["graphs"],
                       graph_breaks=end["graph_breaks"], graph_break_reasons=end["break_reasons"])
        if profile:
            row["profile"] = _profile(build)
    finally:
        build.close()
        del build
        _free(device)
    if check_steps and compiled:
        try:
            eager_cfg = compose_config(config_overrides(
                model, label, "eager", **{**compose_args, "hardware": _eager_hardware(compose_args)}))
            row.update(compare_snapshots(snapshot_steps(eager_cfg, check_steps), snaps))
        except BaseException as err:  # the timing stands; a failed (or timed-out) check is noted
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            row["check_error"] = f"{type(err).__name__}: {err}"[:300]
    return row


def _eager_hardware(compose_args: Dict) -> str:
    """The eager twin of a row's hardware: cpu stays cpu, anything else is hardware=auto."""
    return "cpu" if compose_args.get("hardware") == "cpu" else MODE_HARDWARE["eager"]


def eager_repeatable(model: str, label: str, check_steps: int = 2, **compose_args) -> Dict:
    """The control of the correctness pass: two eager builds of one config give the same bits?
    (If not, e.g. a non-deterministic attention backward, compiled-vs-eager cannot be exact.)"""
    args = {**compose_args, "hardware": _eager_hardware(compose_args)}
    cfg = compose_config(config_overrides(model, label, "eager", **args))
    out = compare_snapshots(snapshot_steps(cfg, check_steps), snapshot_steps(cfg, check_steps))
    return {"kind": "check", "model": model, "config": label, "check": "eager vs eager", **out}


def _profile(build: RunnerBuild) -> str:
    """CUDA (else CPU) time per kernel over 3 more runner steps, top entries."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = build.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        run_steps(build, 3)
        _sync(build.device)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                     row_limit=18, max_name_column_width=60)
