"""The training stacks a researcher would run instead, timed beside the runner in the same process.

Both peers train the same Llama the runner trains: the `LlamaConfig` that model.build_llama makes
for the composed `model=` config (same vocabulary and sequence length), built with the same seed,
but as plain `transformers.LlamaForCausalLM`, no QuantLinear swapped in:

    transformers-bf16   bf16 autocast, fused AdamW, `torch.compile(model)` (mode "compile"; "eager"
                        leaves it uncompiled)
    torchao-float8      the same, after `torchao.float8.convert_to_float8_training` (tensorwise
                        scaling) on the decoder blocks' linears (not lm_head); skipped, saying so,
                        when torchao is not installed

One peer step, as a plain training loop writes it: the batch to the device, forward and loss
(model.causal_lm_loss, the runner's loss), backward, clip_grad_norm_(train.grad_clip), AdamW step,
zero_grad, loss.item(); timed with perf_counter around it, synchronized on CUDA. The batches come
from the same SyntheticLoader as the runner's rows.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Optional

import torch

from .bench_steps import SyntheticLoader, compose_config, dynamo_counts, peak_memory, _free, _sync

PEERS = ("transformers-bf16", "torchao-float8")


def torchao_version() -> Optional[str]:
    try:
        import torchao
    except Exception:  # not installed, or it does not load with this torch
        return None
    return str(getattr(torchao, "__version__", "unknown"))


def peer_config(model: str, *, batch: Optional[int] = None, seq_len: Optional[int] = None,
                vocab: int = 8192, seed: int = 0, hardware: str = "auto", train: str = "gpu"):
    """The composed config of a peer row (model, train, tokenizer, hardware; no recipe)."""
    overrides = [f"model={model}", f"train={train}", f"hardware={hardware}", f"seed={seed}",
                 f"tokenizer.vocab_size={vocab}", "train.progress_bar=false"]
    if batch:
        overrides.append(f"train.batch_size={batch}")
    if seq_len:
        overrides.append(f"model.seq_len={seq_len}")
    return compose_config(overrides)


def plain_llama(cfg):
    """LlamaForCausalLM of the LlamaConfig build_llama makes for cfg.model, initialized from cfg.seed
    exactly as the runner's model is (the same weights), with no linear swapped."""
    from transformers import LlamaForCausalLM
    from fp4.linear import QuantState
    from fp4.recipe import Recipe
    from .model import build_llama

    with torch.device("meta"):  # only its LlamaConfig is wanted
        shaped, _ = build_llama(cfg.model, int(cfg.tokenizer.vocab_size), Recipe(ladder="bf16"),
                                QuantState(seed=int(cfg.seed)), eos_id=0)
    config = shaped.config
    config._attn_implementation = "sdpa"  # transformers' own, as a researcher's stack runs it
    del shaped
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def to_float8(model: torch.nn.Module) -> int:
    """torchao float8 training (tensorwise) on the decoder blocks' linears; how many it converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    try:
        config = Float8LinearConfig.from_recipe_name("tensorwise")
    except (AttributeError, ValueError, KeyError):  # older torchao: tensorwise is the default
        config = Float8LinearConfig()

    def in_decoder(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and ".layers." in f".{fqn}"

    convert_to_float8_training(model, config=config, module_filter_fn=in_decoder)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


def peer_row(model: str, peer: str, mode: str, *, steps: int = 8, warmup: int = 2,
             hardware: str = "auto", **config_args) -> Dict:
    """Time one peer: `steps` steps after `warmup` (at least 1) untimed ones."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; valid: {', '.join(PEERS)}")
    if mode not in ("eager", "compile"):
        raise ValueError(f"unknown peer mode {mode!r}; valid: eager, compile")
    row: Dict = {"kind": "peer", "peer": peer, "model": model, "mode": mode}
    if peer == "torchao-float8" and torchao_version() is None:
        return {**row, "skipped": "torchao not installed"}
    import torch._dynamo
    from torch._dynamo.utils import counters
    from .model import causal_lm_loss
    from .runner import pick_device

    cfg = peer_config(model, hardware=hardware, **config_args)
    device = pick_device(str(cfg.hardware.device))
    if peer == "torchao-float8" and device.type != "cuda":
        return {**row, "skipped": "torchao float8 training needs a CUDA GPU"}
    compiled = mode == "compile"
    torch._dynamo.reset()
    counters.clear()
    net = plain_llama(cfg).to(device)
    if peer == "torchao-float8":
        row["float8_linears"] = to_float8(net)
    tc = cfg.train
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                            weight_decay=tc.weight_decay, fused=cuda)
    fwd = torch.compile(net) if compiled else net
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    batch, seq_len = int(tc.batch_size), int(cfg.model.seq_len)
    loader = SyntheticLoader(int(cfg.tokenizer.vocab_size), seq_len, batch, int(cfg.seed))

    def step() -> float:
        t0 = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        with autocast():
            loss = causal_lm_loss(fwd, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        _sync(device)
        return time.perf_counter() - t0

    try:
        untimed = max(warmup, 1)
        warm: List[float] = []
        for i in range(untimed):
            warm.append(step())
            if i == 0:
                after_first = dynamo_counts()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        dts = [step() for _ in range(steps)]
        end = dynamo_counts()
        median = statistics.median(dts)
        row.update(params=sum(p.numel() for p in net.parameters()), batch=batch, seq_len=seq_len,
                   tokens_per_step=batch * seq_len, median_step_s=median,
                   tokens_per_s=batch * seq_len / median, step_times_s=dts, warmup_step_s=warm,
                   steps=steps, warmup=untimed, **peak_memory(device))
        row["first_step_s"] = warm[0]
        if compiled or end["graphs"]:
            row.update(compile_s=max(sum(warm) - median * len(warm), 0.0),
                       graphs_first_step=after_first["graphs"],
                       recompiles_after_first_step=end["graphs"] - after_first["graphs"],
                       graph_breaks=end["graph_breaks"])
    finally:
        del net, opt, fwd
        _free(device)
    return row
