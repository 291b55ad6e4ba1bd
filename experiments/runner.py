"""One run of the ablation: config -> recipe -> model -> training loop -> run directory.

`run_experiment(cfg)` is what `fp4-ablate run` and every job of `fp4-ablate sweep` execute.
It is idempotent: the run directory is keyed by the experiment config and seed, a finished
run is skipped (its summary returned), an interrupted one resumes from its checkpoint, and
`sweep.force=true` starts over. A crash is recorded (`status: failed`, `traceback.txt`) and
re-raised, so `run` exits non-zero and `sweep` can record it and go on; a failed run is
retried, from its checkpoint, the next time the same command runs. One process at a time
trains a run directory (runlock.py). A finished run's checkpoint is deleted once its summary
is written, unless `train.keep_final_checkpoint=true`.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from omegaconf import OmegaConf

from fp4.linear import QuantState, gemm_paths
from fp4.recipe import Recipe
from .data import TrainLoader, prepare_data
from .model import build_llama
from .rundir import (CHECKPOINT, FINISHED, SUMMARY, GemmPath, Status, Summary, atomic_write_json,
                     atomic_write_text, read_json, run_key, run_name, write_run_files)
from .distributed import (Dist, allreduce_dtype, hold_termination, init_distributed, shutdown,
                          wrap_model)
from .tracking import NullTracker, make_tracker
from .runlock import LOCK, run_lock
from .training import delete_checkpoint, train
from .training.checkpoint import has_checkpoint
from .validate import check_data, validate_config

log = logging.getLogger("fp4_experiments.runner")



def recipe_from_config(cfg) -> Recipe:
    st, fmt = cfg.stabilizer, cfg.format
    # Optional keys left null mean the recipe's own default (validation refuses a value where it
    # would have no effect), so only the keys that are set are passed.
    optional = {"sr_operands": st.sr_operands, "hadamard_block": st.hadamard_size,
                "hadamard_signs": st.hadamard_signs, "ufp4_element": fmt.ufp4_element,
                "stabilizer_gemms": None if st.gemms is None else list(st.gemms)}
    return Recipe(
        ladder=cfg.ladder.name, stabilizer=st.name, format=fmt.name, seed=int(cfg.seed),
        fp8_forward=fmt.fp8_forward, fp8_backward=fmt.fp8_backward,
        scale_mode=fmt.scale_mode, nvfp4_2d_weights=fmt.nvfp4_2d_weights,
        **{k: v for k, v in optional.items() if v is not None},
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"hardware.device={name} but CUDA is not available; use hardware=cpu")
    return torch.device(name)


def _progress(cfg):
    if not cfg.train.progress_bar:
        return None
    from tqdm.auto import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=cfg.train.max_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, desc=f"{cfg.ladder.name}/{cfg.stabilizer.name}")


def _file_logger(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    # The run log records this package's INFO lines even when the host (tests, a notebook)
    # leaves the root logger at WARNING.
    pkg = logging.getLogger("fp4_experiments")
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    return handler


def run_experiment(cfg, overrides: Sequence[str] = (), wait: bool = False) -> Dict[str, Any]:
    """Run (or skip, or resume) the experiment `cfg`; its summary.

    While it trains, the run directory is locked (runlock.py): a second process on the same run
    raises `RunLocked` naming the holder, or with `wait=True` (sweep jobs) waits for it, then
    finds the run finished and skips it.

    Under torchrun (parallel=ddp|fsdp2, experiments/distributed.py) every rank calls this: rank 0
    prepares the data first, takes the lock, decides (skip, resume) for all and writes the run
    directory; the others train beside it.
    """
    validate_config(cfg)
    dist, device = init_distributed(cfg, pick_device(cfg.hardware.device))
    try:
        return _run_experiment(cfg, overrides, wait, dist, device)
    finally:
        shutdown(dist)


def _run_experiment(cfg, overrides, wait: bool, dist: Dist, device) -> Dict[str, Any]:
    # Data preparation (cached) before the run directory: bad input data leaves no run behind.
    # Rank 0 fills the caches, the others then read them.
    if dist.is_main:
        check_data(cfg)
    dist.barrier()
    if not dist.is_main:
        check_data(cfg)
    key = run_key(cfg)
    name = run_name(cfg, key)
    run_dir = Path(cfg.results_dir) / name
    previous = dist.broadcast_object(_finished(cfg, name, run_dir) if dist.is_main else None)
    if previous is not None:
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, wait=wait) if dist.is_main else contextlib.nullcontext():
        # Checked again under the lock: the process this one waited for may have finished it.
        previous = dist.broadcast_object(_finished(cfg, name, run_dir) if dist.is_main else None)
        if previous is not None:
            return previous
        if dist.is_main:
            _prepare_run_dir(cfg, run_dir)
        dist.barrier()
        return _attempt(cfg, key, name, run_dir, list(overrides), dist, device)


def _finished(cfg, name: str, run_dir: Path):
    """The summary of a finished run (unless sweep.force), else None."""
    previous = read_json(run_dir / SUMMARY)
    if previous and previous.get("status") in FINISHED and not cfg.sweep.force:
        log.info("%s: already finished (%s); skipped. sweep.force=true re-runs it.",
                 name, previous["status"])
        return previous
    return None


def _prepare_run_dir(cfg, run_dir: Path) -> None:
    """Empty it for sweep.force (all but the held lock file); set a failed attempt's files aside."""
    if cfg.sweep.force:
        for path in run_dir.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run_dir / SUMMARY).unlink(missing_ok=True)  # a failed run is being retried
    old_traceback = run_dir / "traceback.txt"
    if old_traceback.exists():
        # Kept, under a name that cannot be read as this attempt's outcome.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(old_traceback.stat().st_mtime))
        old_traceback.replace(run_dir / f"failed-attempt-{stamp}.txt")
    for rank_traceback in run_dir.glob("traceback.rank*.txt"):  # other ranks' (distributed.py)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(rank_traceback.stat().st_mtime))
        rank_traceback.replace(run_dir / f"failed-attempt-{stamp}.{rank_traceback.name[10:]}")


def _attempt(cfg, key: str, name: str, run_dir: Path, overrides, dist: Dist,
             device) -> Dict[str, Any]:
    """One attempt at the run: its summary; a crash is recorded (failed summary, traceback).
    A rank other than 0 records only its traceback (traceback.rank<r>.txt)."""
    handler = _file_logger(run_dir) if dist.is_main else None
    started = time.time()
    try:
        return _run(cfg, key, name, run_dir, overrides, started, dist, device)
    except BaseException as err:
        hold_termination(dist)
        tb = traceback.format_exc()
        if not dist.is_main:
            atomic_write_text(run_dir / f"traceback.rank{dist.rank}.txt", tb)
            raise
        atomic_write_text(run_dir / "traceback.txt", tb)
        error = f"{type(err).__name__}: {err}" + _other_ranks_errors(run_dir, started)
        atomic_write_json(run_dir / SUMMARY, Summary(
            **_identity(cfg, key), status=Status.failed, error=error,
            wall_time_s=time.time() - started).to_dict())
        log.error("%s failed: %s (traceback in %s)", name, err, run_dir / "traceback.txt")
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _other_ranks_errors(run_dir: Path, started: float) -> str:
    """'; rank r: <its exception line>' for each rank that failed in this attempt (distributed.py)."""
    found = []
    for path in sorted(run_dir.glob("traceback.rank*.txt")):
        if path.stat().st_mtime >= started - 1:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            found.append(f"; rank {path.name[len('traceback.rank'):-4]}: "
                         f"{lines[-1] if lines else '?'}")
    return "".join(found)


def _identity(cfg, key: str) -> Dict[str, Any]:
    return {"run_key": key, "ladder": cfg.ladder.name, "stabilizer": cfg.stabilizer.name,
            "format": cfg.format.name, "model": cfg.model.name, "data": _data_label(cfg),
            "seed": int(cfg.seed), "target_ppl": cfg.train.target_ppl,
            "max_tokens": int(cfg.train.max_tokens)}


def _data_label(cfg) -> str:
    d = cfg.data
    if d.name in ("c4_local", "jsonl"):
        label = f"{d.name}:{Path(str(d.path)).name}"
        return label + (f"|val:{Path(str(d.val_path)).name}" if d.val_path else "")
    return d.name


def _run(cfg, key, name, run_dir: Path, overrides, started, dist: Dist,
         device) -> Dict[str, Any]:
    """setup and build, train, summarize (only rank 0 writes)."""
    b = _build(cfg, name, dist, device)
    if dist.is_main:
        meta = _write_inputs(cfg, key, run_dir, b, overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        tracker = make_tracker(cfg.logger, run_dir, key, name, resolved)
    else:
        meta = {"device_name": None, "git_commit": None, "git_dirty": None}
        tracker = NullTracker()
    outcome, loop = _train(cfg, run_dir, b, tracker, dist)
    summary = _summary(cfg, key, outcome, loop, b.loader, b.device, b.info, meta, b.paths,
                       b.recipe, started, dist)
    if dist.is_main:
        _finish(cfg, name, run_dir, summary, b.loader, tracker)
    return summary


@dataclass
class _Built:
    """What a run trains: device, data, recipe, quantization state, model, loader."""
    device: torch.device
    bundle: Any
    recipe: Recipe
    quant_state: QuantState
    model: torch.nn.Module
    info: Any
    paths: Dict[str, str]
    loader: TrainLoader


def _build(cfg, name: str, dist: Dist, device) -> _Built:
    torch.manual_seed(cfg.seed)
    bundle = prepare_data(cfg.data, cfg.tokenizer, cfg.model.seq_len, Path(cfg.cache_dir))
    recipe = recipe_from_config(cfg)
    quant_state = QuantState(seed=int(cfg.seed), execution=execution_config(cfg, device),
                             rank=dist.rank, world_size=dist.world_size)
    torch.manual_seed(cfg.seed)  # model init depends on the seed only, not on data preparation
    model, info = build_llama(cfg.model, bundle.tokenizer.vocab_size, recipe, quant_state,
                              eos_id=bundle.tokenizer.eos_id)
    model.to(device)
    # ddp: the DistributedDataParallel wrapper; fsdp2: sharded in place (after the seeded init,
    # so every rank starts from the same weights).
    model = wrap_model(model, cfg, dist, device)
    paths = gemm_paths(recipe, device, quant_state.execution)
    log.info("%s: %s parameters (%s in %d quantized linears); GEMM paths: %s",
             name, f"{info.param_count:,}", f"{info.linear_param_count:,}",
             info.quantized_linears, paths)
    if dist.is_main:
        print(f"model {cfg.model.name}: {info.param_count:,} parameters "
              f"({info.linear_param_count:,} in quantized linears)", flush=True)
    micro = _micro_per_rank(cfg, dist)
    loader = TrainLoader(bundle.train_tokens, cfg.model.seq_len, micro, int(cfg.seed),
                         rank=dist.rank, world_size=dist.world_size)
    return _Built(device, bundle, recipe, quant_state, model, info, paths, loader)


def _write_inputs(cfg, key: str, run_dir: Path, b: _Built, overrides) -> dict:
    """config.yaml, overrides.txt, meta.json, data.json, recipe.json; the meta."""
    meta = write_run_files(run_dir, cfg, key, b.device, overrides)
    atomic_write_json(run_dir / "data.json", b.bundle.describe())
    atomic_write_json(run_dir / "recipe.json", b.recipe.describe())
    return meta


def _micro_per_rank(cfg, dist: Dist) -> int:
    """train.micro_batch_size (per rank); null: this rank's share of the global batch."""
    return int(cfg.train.micro_batch_size or cfg.train.batch_size // dist.world_size)


def _train(cfg, run_dir: Path, b: _Built, tracker, dist: Dist):
    """The training loop (resumed from the run's checkpoint if it has one): outcome, loop state."""
    resume = dist.broadcast_object(has_checkpoint(run_dir / CHECKPOINT))
    progress = _progress(cfg) if dist.is_main else None
    try:
        return train(cfg=cfg, model=b.model, loader=b.loader, val=b.bundle.val,
                     vocab_size=b.bundle.tokenizer.vocab_size, quant_state=b.quant_state,
                     device=b.device, run_dir=run_dir, resume=resume,
                     on_metrics=tracker.log, progress=progress, dist=dist)
    finally:
        if progress is not None:
            progress.close()


def _summary(cfg, key, outcome, loop, loader, device, info, meta, paths, recipe,
             started, dist: Dist) -> Dict[str, Any]:
    timed_tokens = loop.timed_tokens or loop.tokens
    timed_time = loop.timed_time_s or loop.train_time_s
    summary = Summary(
        **_identity(cfg, key),
        status=Status(outcome.status),
        tokens_to_target=outcome.tokens_to_target,
        diverged_at_tokens=outcome.diverged_at_tokens,
        diverged_reason=outcome.diverged_reason,
        steps=loop.step,
        tokens_seen=loop.tokens,
        tokens_per_step=cfg.train.batch_size * cfg.model.seq_len,
        epochs=loader.epoch,
        best_ppl=loop.best_ppl if loop.evals else None,
        best_ppl_tokens=loop.best_ppl_tokens if loop.evals else None,
        final_ppl=loop.evals[-1]["ppl"] if loop.evals else None,
        mean_tokens_per_s=timed_tokens / timed_time if timed_time else None,
        mean_step_time_s=timed_time / max(loop.step - loop.untimed_steps, 1),
        # At most this many runs of the sweep shared the GPU (sweep.jobs_per_gpu; fewer when the
        # sweep had fewer jobs left): above 1, tokens/s depend on the neighbours and the report
        # will not compare them.
        gpu_shared_by=_gpu_shared_by(cfg, device),
        param_count=info.param_count,
        linear_param_count=info.linear_param_count,
        gemm_flops_per_token=info.gemm_flops_per_token,
        device_name=meta["device_name"],
        torch_version=torch.__version__,
        git_commit=meta["git_commit"],
        git_dirty=meta["git_dirty"],
        gemm_paths={g: GemmPath.from_text(t) for g, t in paths.items()},
        recipe=recipe.describe(),
        wall_time_s=time.time() - started,
        world_size=dist.world_size,
        parallel=dist.mode,
        micro_batch_per_rank=_micro_per_rank(cfg, dist),
        allreduce_dtype=allreduce_dtype(dist),
        compile=outcome.compile,
        cuda_graph=outcome.cuda_graph,
        time_s={"steps": loop.train_time_s, "evaluation": loop.eval_time_s,
                "diagnostics": loop.diagnostics_time_s, "checkpoints": loop.checkpoint_time_s},
    ).to_dict()
    return summary


def _finish(cfg, name: str, run_dir: Path, summary: Dict[str, Any], loader, tracker) -> None:
    """Write the summary, close the tracker; then drop the checkpoint (keep_final_checkpoint)."""
    if loader.epoch > 4:
        log.warning("%s: trained for %.1f epochs; beyond ~4, repeated data stops being nearly "
                    "as good as fresh data", name, loader.epoch)
    atomic_write_json(run_dir / SUMMARY, summary)
    tracker.finish(summary)
    log.info("%s: %s", name, one_line(summary))
    # A finished run is skipped, never resumed: its checkpoint (the model's size, GBs for a big
    # one) is only kept when asked for. Last, so a failure above leaves it to resume from.
    if not cfg.train.keep_final_checkpoint:
        delete_checkpoint(run_dir / CHECKPOINT)


def _gpu_shared_by(cfg, device) -> int:
    return int(cfg.sweep.jobs_per_gpu) if cfg.sweep.id and device.type == "cuda" else 1


def execution_config(cfg, device):
    """The model's fp4 ExecutionConfig (Triton kernels / real FP8 GEMMs) as the hardware config says;
    it travels with the model's QuantState, nothing process-wide is set."""
    from fp4.state import ExecutionConfig
    return ExecutionConfig(quant_backend=str(cfg.hardware.quant_backend),
                           real_fp8=bool(cfg.hardware.real_fp8) and device.type == "cuda")


def one_line(summary: Dict[str, Any]) -> str:
    s = summary
    head = f"{s['ladder']}/{s['stabilizer']}/{s['format']} seed {s['seed']}: {s['status']}"
    if s["status"] == "reached":
        head += f" at {s['tokens_to_target']:,.0f} tokens (target ppl {s['target_ppl']})"
    elif s["status"] == "diverged":
        head += f" at {s['diverged_at_tokens']:,} tokens ({s.get('diverged_reason')})"
    elif s.get("best_ppl") is not None:
        head += f"; best ppl {s['best_ppl']:.2f} at {s['best_ppl_tokens']:,} tokens"
    if s.get("mean_tokens_per_s"):
        head += f"; {s['mean_tokens_per_s']:,.0f} tok/s"
    return head
