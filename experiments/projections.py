"""Sibling projections quantize their common input once: q/k/v of attention, gate/up of the MLP.

Why. The q, k and v projections of a decoder layer read the same X, and so do gate and up. Run as
separate quantized linears, each quantizes X again -- for Fprop along in_features and for Wgrad
along the tokens -- so X is quantized three (two) times per orientation where a fused projection
(Megatron's linear_qkv / linear_fc1, a fused QKV GEMM on FP4 hardware) quantizes it once. On
llama-150m that is 3 of the 7 X quantizations a decoder layer makes per orientation.

How. `transformers`' LlamaAttention and LlamaMLP call their projections one by one, so they get a
forward of their own here (the same computation, written against the same modules and
parameters: the state_dict is unchanged) that runs each group through
fp4.linear.shared_input_linears. That op quantizes X once per orientation where this gives the
bits of quantizing it per layer (round to nearest, Hadamard without random signs) and returns each
linear's dX_i for autograd to add, as it adds separate layers' gradients, so the loss and every gradient
equal the ungrouped model's bit for bit in eager (tests/experiments/test_projections.py). What is
not shareable (SR uniforms, random signs: drawn per layer) stays per layer, inside the same op.

The attention forward is transformers' (5.17 to 5.24) minus the KV cache, which this project's
models refuse anyway (experiments/attention.py): projections, RoPE, the registered attention
function, o_proj.
"""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, apply_rotary_pos_emb

from fp4.linear import shared_input_linears

CACHE_KWARGS = ("past_key_values", "cache", "past_key_value")


class SharedInputLlamaAttention(LlamaAttention):
    """LlamaAttention whose q, k and v projections run as one group on the shared hidden states."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        given = [k for k in CACHE_KWARGS if kwargs.pop(k, None) is not None]
        if given:
            raise ValueError(f"{type(self).__name__} has no KV cache (training only); got {', '.join(given)}")
        kwargs.pop("cache_position", None)  # positions of a cache update: there is none
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = shared_input_linears(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        query = q.view(hidden_shape).transpose(1, 2)
        key = k.view(hidden_shape).transpose(1, 2)
        value = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class SharedInputLlamaMLP(LlamaMLP):
    """LlamaMLP whose gate and up projections run as one group on the shared input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)


GROUPED = {LlamaAttention: SharedInputLlamaAttention, LlamaMLP: SharedInputLlamaMLP}


def share_projection_inputs(model: torch.nn.Module) -> int:
    """Give every LlamaAttention and LlamaMLP of `model` the grouped forward (in place: the module,
    its children and parameters stay the same objects). Returns how many modules changed."""
    changed = 0
    for module in model.modules():
        grouped = GROUPED.get(type(module))
        if grouped is not None:
            module.__class__ = grouped
            changed += 1
    return changed
