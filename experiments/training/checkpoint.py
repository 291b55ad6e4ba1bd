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
                    quant_state: QuantState, device) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "loop": loop.__dict__, "loader": loader.state_dict(),
        "quant_state": quant_state.state_dict(), "rng": rng_state(device),
    }
    atomic_save(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, model, optimizer, loader, quant_state: QuantState,
                    device) -> LoopState:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    quant_state.load_state_dict(ckpt["quant_state"])
    set_rng_state(ckpt["rng"], device)
    return LoopState(**ckpt["loop"])


def delete_checkpoint(path: Path) -> bool:
    """Remove the checkpoint (and its directory when that is left empty); True if one was there."""
    path = Path(path)
    existed = path.exists()
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (a temporary file of a save in flight) or already gone
        pass
    return existed
