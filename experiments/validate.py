"""Checks on a composed config, run before any work: bad values fail with the valid choices.

Hydra and the structured-config schema already reject unknown keys and unknown group options
at composition. What is left are values with a fixed set of choices (formats, rungs,
stabilizer cadences, data sources...) and numbers that must be in range. Every problem is
collected, so one run of the command lists all of them.
"""
from __future__ import annotations

from typing import List

from omegaconf import OmegaConf

GEMMS = ("fprop", "dgrad", "wgrad")
DATA_SOURCES = ("embedded", "c4_local", "c4", "jsonl")
TOKENIZERS = ("bpe", "pretrained")
LOGGERS = ("none", "wandb")
DEVICES = ("auto", "cpu", "cuda")
QUANT_BACKENDS = ("auto", "torch", "triton")
AUTOCAST_DTYPES = ("bfloat16", "float16", "float32")
SR_OPERANDS = ("grad", "all")
SIGN_CADENCES = ("none", "fixed", "step", "call")
FP8_FORMATS = ("e4m3", "e5m2")
UFP4_ELEMENTS = ("e1m2", "int4")


class ConfigError(ValueError):
    """A composed config with values outside their valid choices or ranges."""


def _choice(problems: List[str], key: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _positive(problems: List[str], key: str, value) -> None:
    if value is None or value <= 0:
        problems.append(f"{key}={value!r} must be > 0")


def validate_config(cfg) -> None:
    from fp4.quantize import SCALE_MODES
    from fp4.recipe import LADDERS, RECIPE_FORMATS, STABILIZERS

    p: List[str] = []
    _choice(p, "ladder.name", cfg.ladder.name, LADDERS)
    for g in cfg.ladder.fp4_gemms:
        _choice(p, "ladder.fp4_gemms[]", g, GEMMS)
    _choice(p, "stabilizer.name", cfg.stabilizer.name, STABILIZERS)
    for g in cfg.stabilizer.gemms:
        _choice(p, "stabilizer.gemms[]", g, GEMMS)
    _choice(p, "stabilizer.sr_operands", cfg.stabilizer.sr_operands, SR_OPERANDS)
    _choice(p, "stabilizer.hadamard_signs", cfg.stabilizer.hadamard_signs, SIGN_CADENCES)
    hs = cfg.stabilizer.hadamard_size
    if hs < 2 or hs & (hs - 1):
        p.append(f"stabilizer.hadamard_size={hs} must be a power of two >= 2 (e.g. 16)")
    _choice(p, "format.name", cfg.format.name, RECIPE_FORMATS)
    if cfg.format.scale_mode is not None:
        _choice(p, "format.scale_mode", cfg.format.scale_mode, SCALE_MODES)
    _choice(p, "format.ufp4_element", cfg.format.ufp4_element, UFP4_ELEMENTS)
    _choice(p, "format.fp8_forward", cfg.format.fp8_forward, FP8_FORMATS)
    _choice(p, "format.fp8_backward", cfg.format.fp8_backward, FP8_FORMATS)

    _choice(p, "data.name", cfg.data.name, DATA_SOURCES)
    for key in ("path", "val_path"):
        if OmegaConf.is_missing(cfg.data, key):
            p.append(f"data.{key} is required with data={cfg.data.name} (data.{key}=...)")
    if cfg.data.name in ("c4_local", "jsonl") and not OmegaConf.is_missing(cfg.data, "path") \
            and not cfg.data.path:
        p.append(f"data.path is required with data={cfg.data.name}")
    _positive(p, "data.val_tokens", cfg.data.val_tokens)
    _choice(p, "tokenizer.name", cfg.tokenizer.name, TOKENIZERS)
    if cfg.tokenizer.name == "bpe" and cfg.tokenizer.vocab_size < 260:
        p.append(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} must be >= 260 for byte-level BPE")
    if cfg.tokenizer.name == "pretrained" and (OmegaConf.is_missing(cfg.tokenizer, "path")
                                               or not cfg.tokenizer.path):
        p.append("tokenizer.path is required with tokenizer=pretrained")

    m = cfg.model
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "seq_len"):
        _positive(p, f"model.{key}", m[key])
    if m.num_heads > 0 and m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size={m.hidden_size} must be a multiple of model.num_heads={m.num_heads}")
    if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")

    t = cfg.train
    for key in ("max_tokens", "batch_size", "lr", "eval_every_tokens", "eval_batch_size",
                "checkpoint_every_steps", "log_every_steps", "diverge_loss_ratio"):
        _positive(p, f"train.{key}", t[key])
    if t.micro_batch_size is not None and (t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size):
        p.append(f"train.micro_batch_size={t.micro_batch_size} must divide train.batch_size={t.batch_size}")
    if t.target_ppl is not None and t.target_ppl <= 1.0:
        p.append(f"train.target_ppl={t.target_ppl} must be > 1 (a perplexity), or null for no target")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.warmup_tokens < 0 or t.warmup_tokens >= t.max_tokens:
        p.append(f"train.warmup_tokens={t.warmup_tokens} must be in [0, train.max_tokens)")

    _choice(p, "logger.name", cfg.logger.name, LOGGERS)
    device = cfg.hardware.device
    if not (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())):
        p.append(f"hardware.device={device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N")
    _choice(p, "hardware.quant_backend", cfg.hardware.quant_backend, QUANT_BACKENDS)
    _choice(p, "hardware.autocast_dtype", cfg.hardware.autocast_dtype, AUTOCAST_DTYPES)
    if cfg.sweep.seeds < 1:
        p.append(f"sweep.seeds={cfg.sweep.seeds} must be >= 1")
    if cfg.sweep.jobs_per_gpu < 1:
        p.append(f"sweep.jobs_per_gpu={cfg.sweep.jobs_per_gpu} must be >= 1")
    if p:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(p))
