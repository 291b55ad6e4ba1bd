"""Checkpoints: model, optimizer, loop state, data position, every RNG state, quantization state.

Written with `rundir.atomic_save`: a temporary file unique to the process in the checkpoint's
directory, fsync, the umask's mode, rename over the previous one; so a kill mid-save leaves
the previous checkpoint intact and two processes never write the same temporary file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from fp4.linear import QuantState
from ..rundir import atomic_save
from .state import LoopState


def rng_state(device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device) -> None:
    # The checkpoint is loaded with map_location=device, which moves these ByteTensors to the
    # GPU too; the generators take their state as CPU tensors only.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_checkpoint(path: Path, model, optimizer, loop: LoopState, loader,
                    quant_state: QuantState, device, dist=None) -> None:
    """One process: `path` (last.pt). Under ddp / fsdp2 (`dist` with a process group): sharded,
    torch.distributed.checkpoint in last.dcp/ beside it (experiments/distributed.py)."""
    if dist is not None and dist.enabled:
        from ..distributed import save_sharded
        extra = {"loop": loop.__dict__, "loader": loader.state_dict(),
                 "quant_state": quant_state.state_dict(), "rng": rng_state(device),
                 "world_size": dist.world_size, "parallel": dist.mode}
        save_sharded(path, model, optimizer, extra, dist)
        return
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "loop": loop.__dict__, "loader": loader.state_dict(),
        "quant_state": quant_state.state_dict(), "rng": rng_state(device),
    }
    atomic_save(path, lambda f: torch.save(state, f))
    _remove_sharded(path)  # a sharded one of an earlier multi-process attempt is stale now


def has_checkpoint(path: Path) -> bool:
    """last.pt or a sharded last.dcp/ beside it."""
    from ..distributed import EXTRA, dcp_path
    return Path(path).exists() or (dcp_path(path) / EXTRA).exists()


def _remove_sharded(path: Path) -> None:
    from ..distributed import dcp_path
    sharded = dcp_path(path)
    if sharded.exists():
        import shutil
        shutil.rmtree(sharded, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, loader, quant_state: QuantState,
                    device, dist=None) -> LoopState:
    """Whichever of last.pt / last.dcp/ is there (a save removes the other), on any number of
    ranks: DCP reshards; a one-process last.pt loads under ddp (full state on every rank)."""
    from ..distributed import unwrap
    if not Path(path).exists():
        from ..distributed import load_sharded
        ckpt = load_sharded(path, model, optimizer, device)
        loader.load_state_dict(ckpt["loader"])
        quant_state.load_state_dict(ckpt["quant_state"])
        set_rng_state(ckpt["rng"], device)
        return LoopState(**ckpt["loop"])
    if dist is not None and dist.mode == "fsdp2":
        raise RuntimeError(f"{path} is a one-process checkpoint; resume it with parallel=none or "
                           "parallel=ddp (fsdp2 resumes sharded checkpoints only)")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    quant_state.load_state_dict(ckpt["quant_state"])
    set_rng_state(ckpt["rng"], device)
    return LoopState(**ckpt["loop"])


def delete_checkpoint(path: Path) -> bool:
    """Remove the checkpoint (and its directory when that is left empty); True if one was there."""
    path = Path(path)
    existed = has_checkpoint(path)
    path.unlink(missing_ok=True)
    _remove_sharded(path)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (a temporary file of a save in flight) or already gone
        pass
    return existed
