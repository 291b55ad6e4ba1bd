"""The models' attention (experiments/attention.py): causal SDPA with no mask tensor, whether or not
transformers believes it is being traced (as it does while a CUDA stream captures), the same
numbers as transformers' own "sdpa" on unpadded batches, and an error for inputs it cannot honour."""
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf

import transformers.masking_utils as masking_utils
from fp4.linear import QuantState
from fp4.recipe import Recipe
from fp4_experiments.attention import ATTENTION
from fp4_experiments.model import build_llama

from cli_support import REPO


def _model():
    cfg = OmegaConf.load(REPO / "configs" / "model" / "llama-1m.yaml")
    torch.manual_seed(0)
    model, _ = build_llama(cfg, 256, Recipe(ladder="bf16"), QuantState(seed=0))
    return model.eval()


def _masks_seen(model):
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    return seen


def test_the_decoder_layers_get_no_mask_even_while_transformers_thinks_it_traces():
    model = _model()
    assert model.config._attn_implementation == ATTENTION
    seen = _masks_seen(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with mock.patch.object(masking_utils, "is_tracing", lambda *a, **k: True):
            traced = model(input_ids=ids).logits
    assert seen == [None, None]
    assert torch.equal(plain, traced)


def test_transformers_own_sdpa_would_build_a_mask_while_tracing():
    """The control: what the name of our own avoids (so the test above can fail)."""
    model = _model()
    model.config._attn_implementation = "sdpa"
    seen = _masks_seen(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mock.patch.object(masking_utils, "is_tracing", lambda *a, **k: True):
        model(input_ids=ids)
    assert seen[0] is not None


def test_the_same_logits_as_transformers_sdpa():
    model = _model()
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        model.config._attn_implementation = "sdpa"
        theirs = model(input_ids=ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kwargs", [{"attention_mask": torch.ones(2, 16, dtype=torch.long)},
                                    {"position_ids": torch.arange(16)[None]}])
def test_a_padding_mask_or_position_ids_are_refused(kwargs):
    model = _model()
    ids = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match=f"got {next(iter(kwargs))}"):
        model(input_ids=ids, **kwargs)
