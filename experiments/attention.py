"""The attention every model of this project runs: causal PyTorch SDPA over the whole sequence,
the same whether the step runs eagerly, compiled, or is being captured into a CUDA graph.

What it computes. The training data are documents packed end to end into fixed-length sequences
(experiments/data/packing.py), with no padding, so every sequence attends causally over all its
positions: SDPA with `is_causal=True` and no mask tensor (its flash / memory-efficient kernels).
That is what `transformers`' "sdpa" computes for such a batch in a plain forward.

Why a name of our own. `transformers` builds the mask in the model's eager forward, and where it
thinks it is being traced it stops proving that the mask is plain causal and materializes it:
`is_tracing()` includes `torch.cuda.is_current_stream_capturing()`, and then the position ids
count as a possible packed-sequence layout (transformers 5.17 and 5.24) and 5.17 also gives up
SDPA's is_causal skip. So a CUDA graph captured from the plain step would record another attention
(an explicit boolean mask, another SDPA kernel, other bits) than the plain step computes, and
compiled decoder layers, guarded on a None mask, recompile inside the capture (measured on the
H200: experiments/gpu/graph_capture_probe.py).

transformers documents the way out: an attention implementation registered in its
AttentionInterface but not in its AttentionMaskInterface gets no mask at all (`create_causal_mask`
returns None). That is ATTENTION: transformers' own SDPA function under our name. Registering a new
name changes nothing for any other model in the process. Because the model then cannot honour a
padding mask or custom position ids, `refuse_masks` turns them away with an error instead of
silently attending over the padding.
"""
from __future__ import annotations

from torch import nn

ATTENTION = "fp4_ablate_causal_sdpa"
REFUSED = ("attention_mask", "position_ids", "past_key_values")


def register_attention() -> str:
    """Register ATTENTION with transformers (idempotent); returns the name for config._attn_implementation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, sdpa_attention_forward)
    return ATTENTION


def _refuse(module, args, kwargs):
    given = [k for k in REFUSED if kwargs.get(k) is not None]
    if given or len(args) > 1:
        raise ValueError(
            f"{type(module).__name__} runs causal attention over whole packed sequences "
            f"({ATTENTION}, experiments/attention.py); got {', '.join(given) or 'positional arguments'}. "
            "Call it with input_ids or inputs_embeds only.")


def refuse_masks(base_model: nn.Module) -> None:
    """Make the decoder stack (LlamaModel) refuse a padding mask, position ids or a cache: with
    ATTENTION they would be ignored."""
    base_model.register_forward_pre_hook(_refuse, with_kwargs=True)
