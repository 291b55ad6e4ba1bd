"""Before the first step: optimizer, autocast context, compiled forward, resumed loop state."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from fp4.linear import QuantState
from ..rundir import CHECKPOINT
from .checkpoint import has_checkpoint, load_checkpoint
from .compile import compile_decoder_layers, compile_enabled
from .state import LoopState

log = logging.getLogger("fp4_experiments.train")


def make_optimizer(model, train_cfg, device) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D parameters), as in Llama's recipe.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps, fused=fused)


def autocast_for(device, dtype_name: str) -> Callable[[], ContextManager]:
    """A factory of autocast contexts: `dtype_name` on CUDA, none (float32) on the CPU."""
    if device.type == "cuda":
        dtype = getattr(torch, dtype_name)
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


@dataclass
class TrainSetup:
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager]
    step_model: torch.nn.Module   # the forward the steps run (its decoder layers maybe compiled)
    loop: LoopState
    ckpt_path: Path
    # The forward evaluations run: step_model, or under ddp the module inside the wrapper.
    eval_model: Optional[torch.nn.Module] = None


def setup_training(cfg, model, loader, quant_state: QuantState, device, run_dir: Path,
                   resume: bool, dist=None) -> TrainSetup:
    """`model` is the module the steps train: under ddp its DistributedDataParallel wrapper,
    under fsdp2 the fully_shard-ed module (experiments/distributed.py wrap_model)."""
    optimizer = make_optimizer(model, cfg.train, device)
    autocast = autocast_for(device, cfg.hardware.autocast_dtype)
    if compile_enabled(cfg.hardware, device):  # in place, per decoder layer: every wrapper below sees the compiled layers
        compile_decoder_layers(model, cfg.hardware.compile_backend)
    step_model = eval_model = model
    if dist is not None and dist.mode == "ddp":
        eval_model = model.module
    ckpt_path = Path(run_dir) / CHECKPOINT
    loop = LoopState()
    if resume and has_checkpoint(ckpt_path):
        loop = load_checkpoint(ckpt_path, model, optimizer, loader, quant_state, device, dist)
        from ..distributed import dcp_path
        where = ckpt_path if ckpt_path.exists() else dcp_path(ckpt_path)
        log.info("resumed from %s at step %d (%d tokens)", where, loop.step, loop.tokens)
    quant_state.check_finite = bool(cfg.train.check_finite)
    return TrainSetup(optimizer, autocast, step_model, loop, ckpt_path, eval_model)
