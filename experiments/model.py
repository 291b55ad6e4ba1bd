"""A scaled-down Llama 3.1 with the fp4 core's quantized linears in its decoder blocks.

The architecture is `transformers`' own `LlamaForCausalLM` (RMSNorm, SwiGLU MLP, RoPE,
grouped-query attention), so what is measured is the real model family, not a look-alike.
Every `nn.Linear` inside the decoder blocks (q, k, v, o projections and the gate, up and
down projections) is swapped for `fp4.QuantLinear`, which runs its Fprop, Dgrad and Wgrad
GEMMs as the recipe says; q/k/v and gate/up quantize their shared input once (projections.py).
The embedding, the norms and the output head stay in high
precision, as in the paper, unless `model.quantize_embedding` / `model.quantize_head` say
otherwise (the embedding is a lookup, not a GEMM, so "quantizing" it means fake-quantizing
its table along the hidden axis on every forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from fp4.linear import QuantState, swap_linears
from fp4.recipe import Recipe
from .attention import refuse_masks, register_attention


@dataclass
class ModelInfo:
    param_count: int
    linear_param_count: int
    quantized_linears: int
    # FLOPs per token of each GEMM summed over the quantized linears (2 * in * out each).
    gemm_flops_per_token: Dict[str, int]


def build_llama(model_cfg, vocab_size: int, recipe: Recipe, state: QuantState,
                eos_id: int = 0) -> tuple[nn.Module, ModelInfo]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_cfg.hidden_size % model_cfg.num_heads:
        raise ValueError(f"model.hidden_size={model_cfg.hidden_size} is not a multiple of "
                         f"model.num_heads={model_cfg.num_heads}")
    if model_cfg.num_heads % model_cfg.num_kv_heads:
        raise ValueError(f"model.num_heads={model_cfg.num_heads} is not a multiple of "
                         f"model.num_kv_heads={model_cfg.num_kv_heads} (grouped-query attention)")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        max_position_embeddings=model_cfg.seq_len,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.rms_norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        initializer_range=model_cfg.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    # SDPA attention: the same kernel family for every rung, so only the GEMM precision differs;
    # causal over whole packed sequences, with no mask that could change while a CUDA graph
    # captures (attention.py).
    config._attn_implementation = register_attention()
    from .projections import share_projection_inputs

    model = LlamaForCausalLM(config)
    refuse_masks(model.model)

    def in_decoder_block(name: str) -> bool:
        return ".layers." in f".{name}" or name.startswith("model.layers.")

    def quantized(name: str) -> bool:
        return in_decoder_block(name) or (model_cfg.quantize_head and name == "lm_head")

    n_swapped = swap_linears(model, recipe, state, quantized)
    # q/k/v and gate/up quantize their common X once per orientation (the same bits: projections.py).
    share_projection_inputs(model)
    if model_cfg.quantize_embedding:
        _quantize_embedding(model, recipe)

    linear_params = 0
    flops = {"fprop": 0, "dgrad": 0, "wgrad": 0}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and quantized(name):
            n = module.in_features * module.out_features
            linear_params += n
            for gemm in flops:
                flops[gemm] += 2 * n
    info = ModelInfo(
        param_count=sum(p.numel() for p in model.parameters()),
        linear_param_count=linear_params,
        quantized_linears=n_swapped,
        gemm_flops_per_token=flops,
    )
    return model, info


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is fake-quantized like an Fprop weight operand (blocks along hidden)
    on every forward, with a straight-through estimator: the lookup sees quantized rows, the gradient
    flows to the high-precision table unchanged. Same parameters and state_dict keys as nn.Embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, fmt: str,
                 scale_mode: Optional[str] = None, **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.fmt, self.scale_mode = fmt, scale_mode

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, scale_mode: Optional[str] = None) -> "QuantEmbedding":
        """Wrap `emb`, sharing its weight Parameter (a tied output head and optimizers stay valid)."""
        new = cls(emb.num_embeddings, emb.embedding_dim, fmt=fmt, scale_mode=scale_mode,
                  padding_idx=emb.padding_idx, max_norm=emb.max_norm, norm_type=emb.norm_type,
                  scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse, device="meta")
        new.weight = emb.weight
        return new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from fp4.quantize import fake_quantize

        w = self.weight
        wq = fake_quantize(w.detach(), self.fmt, axis=-1, scale_mode=self.scale_mode)
        return nn.functional.embedding(input_ids, w + (wq - w).detach(), self.padding_idx, self.max_norm,
                                       self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}, scale_mode={self.scale_mode}"


def _quantize_embedding(model: nn.Module, recipe: Recipe) -> None:
    """Swap the input embedding for a QuantEmbedding quantized as the recipe's Fprop weight."""
    spec = recipe.specs["fprop"].b
    if spec.fmt is None:
        return
    model.set_input_embeddings(QuantEmbedding.from_embedding(model.get_input_embeddings(), spec.fmt,
                                                             spec.scale_mode))


def causal_lm_loss(model: nn.Module, input_ids: Optional[torch.Tensor], labels: torch.Tensor,
                   inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are already the next tokens (no internal shift).
    inputs_embeds (with input_ids None): the input embedding's output, looked up by the caller."""
    logits = (model(input_ids=input_ids) if inputs_embeds is None else model(inputs_embeds=inputs_embeds)).logits
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
