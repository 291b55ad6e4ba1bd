"""torch.compile for training: one compiled decoder layer for all decoder layers (regional compilation).

Compiling the whole model traces every layer into one graph, so compile time grows with depth (a
150M model took minutes). The decoder layers are identical code with different parameters, so each
is compiled *in place* (`nn.Module.compile`: the state_dict keys, DDP, FSDP2's per-layer hooks and
the optimizer see the same modules) and dynamo reuses one compiled graph for all of them:
parameters are graph inputs, and a QuantLinear names itself to its custom ops by a tensor, not an
int the graph would specialize on (fp4/linear_op.py). Embedding, final norm, head and loss stay
eager; they are one kernel each.

The quantization inside the compiled layers is the eager code (custom ops), so the quantized
operands are those eager computes from the same inputs; with the inductor backend the fused ops
*around* the linears (RMSNorm, SiLU, RoPE, residual adds) may round differently from eager, so a
compiled run is not bit-identical to an eager run as a whole. `aot_eager` traces without fusing and
is bit-identical (tests/fp4/test_compile.py, tests/experiments/test_compile_training.py).

Compile time is paid in the first step(s) that run a new graph: the training step, then the first
evaluation (no_grad: another graph). The run logs both as `compile_s` (first step minus a steady
step) and the number of graphs and graph breaks dynamo reports.

Shapes are static (`dynamic=False`): a run has a handful of them (the training micro-batch, the
evaluation batch and its shorter last batch, with and without grad), each compiled once into the
graph the bench times, instead of one symbolic-shape graph after the second size is seen.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import nn

log = logging.getLogger("fp4_experiments.train")


def compile_enabled(hardware_cfg, device) -> bool:
    """hardware.compile, with null (hardware=auto) meaning: compile on CUDA, eager on the CPU."""
    value = hardware_cfg.compile
    return bool(value) if value is not None else torch.device(device).type == "cuda"


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of a transformers causal LM (inside a DDP wrapper too)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    base = getattr(inner, "model", inner)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__} has no decoder layers (.model.layers) to compile")
    return list(layers)


def compile_decoder_layers(model: nn.Module, backend: str) -> int:
    """Compile each decoder layer of `model` in place with `backend`; returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=str(backend), dynamic=False)
    log.info("torch.compile (%s) on %d decoder layers (regional: one graph serves all)", backend, len(layers))
    return len(layers)


def dynamo_counts() -> Dict[str, int]:
    """Graphs compiled and graph breaks so far in this process (dynamo's own counters)."""
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def reset_compiler() -> None:
    """Forget compiled code of earlier models in this process (tests, benches build several)."""
    torch._dynamo.reset()
