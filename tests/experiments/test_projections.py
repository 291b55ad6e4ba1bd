"""Sibling projections (experiments/projections.py): q/k/v and gate/up quantize their shared X once
per orientation, and the model's loss and every gradient keep the bits of the ungrouped model."""
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

import fp4.gemm
from fp4.linear import QuantState
from fp4.recipe import Recipe
from fp4_experiments.model import build_llama, causal_lm_loss
from fp4_experiments.projections import SharedInputLlamaAttention, SharedInputLlamaMLP

from cli_support import REPO

RECIPES = {
    "bf16": dict(ladder="bf16"),
    "fp8": dict(ladder="fp8"),
    "wgrad": dict(ladder="wgrad"),
    "wgrad+h16": dict(ladder="wgrad", stabilizer="h16"),
    "wgrad+rht": dict(ladder="wgrad", stabilizer="rht"),
    "wgrad+sr(all)": dict(ladder="wgrad", stabilizer="sr", sr_operands="all"),
    "nvfp4 wgrad+h16_all": dict(ladder="wgrad", stabilizer="h16_all", format="nvfp4"),
}


def _models(recipe_kw):
    cfg = OmegaConf.load(REPO / "configs" / "model" / "llama-1m.yaml")
    cfg.num_layers = 2
    built = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _ = build_llama(cfg, 256, Recipe(seed=3, **recipe_kw), QuantState(seed=3))
        built.append(model)
    grouped, separate = built
    for module in separate.modules():  # the control: transformers' own forwards, one linear at a time
        if isinstance(module, SharedInputLlamaAttention):
            module.__class__ = LlamaAttention
        elif isinstance(module, SharedInputLlamaMLP):
            module.__class__ = LlamaMLP
    return grouped, separate


def _step(model, counter):
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    calls = []
    real = fp4.gemm.quantize_operand

    def counting(tensor, fmt, axis, **kw):
        calls.append((tuple(tensor.shape), axis))
        return real(tensor, fmt, axis, **kw)

    with mock.patch.object(fp4.gemm, "quantize_operand", counting), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, ids, labels)
    with mock.patch.object(fp4.gemm, "quantize_operand", counting):
        loss.backward()
    counter.extend(calls)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(RECIPES))
def test_grouped_projections_keep_every_bit(name):
    grouped, separate = _models(RECIPES[name])
    assert isinstance(grouped.model.layers[0].self_attn, SharedInputLlamaAttention)
    n_grouped, n_separate = [], []
    loss_g, grads_g = _step(grouped, n_grouped)
    loss_s, grads_s = _step(separate, n_separate)
    assert torch.equal(loss_g, loss_s)
    for param, grad in grads_s.items():
        assert grad is not None and torch.equal(grads_g[param], grad), param
    # Shared per decoder layer: Fprop's X of k and v (after q's) and of up (after gate); Wgrad's
    # the same where its X is deterministic (not under SR on every operand, nor RHT's signs).
    layers = len(grouped.model.layers)
    saved = {"bf16": 0, "wgrad+rht": 3, "wgrad+sr(all)": 3}.get(name, 6)
    assert len(n_separate) - len(n_grouped) == saved * layers, (len(n_separate), len(n_grouped))
