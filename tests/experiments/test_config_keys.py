"""Every key of the experiment config is read by the code it describes, or refused where it has no effect.

A key that changes the run key but nothing the run computes is a correctness bug (two run
directories for one experiment, or an ablation that silently does nothing). For every leaf key of
`experiment_dict` (the part of the config that is hashed into the run key) this overrides the key
with another valid value and asserts that either

* what its consumers resolve changes: the recipe's effective numerics (`Recipe.describe()` of
  `runner.recipe_from_config`, without the fields that only echo the arguments), the transformers
  LlamaConfig and module tree of `model.build_llama`, the data sources, tokenizer and validation
  rows of the data layer, the run directory's label; or
* `validate_config` refuses it, naming the key (a value that has no effect with that group's choice).

Each key is checked in the default config and, where it only acts with another choice of its own
group (fp8 formats on a rung with FP8 GEMMs, hub settings with data=c4, ...), in a context where it
acts. A new schema key that nothing reads fails here.
"""
from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from cli_support import REPO

# Small data settings so that preparing data (a BPE and two token streams) takes about a second.
BASE = ["model.seq_len=64", "data.val_tokens=2048", "tokenizer.vocab_size=512", "hardware=cpu"]

# Where a key acts, when not in the default config (fp8 / none / mxfp4 / embedded / bpe).
KEY_CONTEXT = {
    "ladder.name": ["+ablation=wgrad_h16"],
    "stabilizer.name": ["+ablation=wgrad_h16"],
    "stabilizer.gemms": ["+ablation=wgrad_h16"],
    "stabilizer.hadamard_size": ["+ablation=wgrad_h16"],
    "stabilizer.hadamard_signs": ["+ablation=wgrad_h16"],
    "stabilizer.sr_operands": ["+ablation=wgrad_sr"],
    "format.name": ["+ablation=wgrad_h16"],
    "format.scale_mode": ["+ablation=wgrad_h16"],
    "format.nvfp4_2d_weights": ["+ladder=wgrad", "format=nvfp4"],
    "format.ufp4_element": ["+ladder=wgrad", "format=ufp4"],
    "data.hub_path": ["data=c4"],
    "data.hub_name": ["data=c4"],
    "data.data_files": ["data=c4"],
    "data.val_split_name": ["data=c4"],
    "data.path": ["data=jsonl", "data.path={jsonl_a}", "data.val_path={jsonl_b}"],
    "tokenizer.path": ["tokenizer=pretrained", "tokenizer.path={tok_a}", "tokenizer.vocab_size=null"],
}
# Other valid values, where the automatic one (next Enum member, not, x2, x0.5) does not fit.
ALT = {
    "model.name": "renamed",
    "data.name": "c4",
    "data.path": "{jsonl_c}",
    "data.val_path": "{jsonl_b}",
    "data.max_docs": 400,
    "data.hub_path": "allenai/c4-mirror",
    "data.hub_name": "realnewslike",
    "data.data_files": {"train": "c4-train.json.gz"},
    "data.val_split_name": "train",
    "tokenizer.path": "{tok_b}",
    "tokenizer.train_docs": 400,
    "format.name": "ufp4",
    "stabilizer.name": "rht",
    "format.scale_mode": "floor",
    "format.ufp4_element": "int4",
    "stabilizer.gemms": ["dgrad"],
    "stabilizer.sr_operands": "all",
    "stabilizer.hadamard_size": 32,
    "stabilizer.hadamard_signs": "step",
}
# (context, key) pairs that neither act nor are refused, by design, with the reason.
INACTIVE_BY_DESIGN = {
    ("default", "format.scale_mode"): "an MX scale rule on a rung with no FP4 GEMM: sweeps cross "
                                      "every rung with one format, as with stabilizers on FP8 GEMMs",
}
# Keys whose other value needs its group's other keys too: switched through the group instead.
GROUP_SWITCH = {"tokenizer.name": ["tokenizer=pretrained", "tokenizer.path={tok_a}",
                                   "tokenizer.vocab_size=null"]}
# Train keys are read inside the training loop (no resolver to call): each must be read there.
TRAIN_SOURCES = ("experiments/train.py", "experiments/training", "experiments/runner.py")


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith("data_files"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def _alt(cfg, key, files):
    if key in ALT:
        v = ALT[key]
        return v.format(**files) if isinstance(v, str) else v
    v = OmegaConf.select(cfg, key)
    if isinstance(v, Enum):
        members = list(type(v))
        return members[(members.index(v) + 1) % len(members)].value
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v * 2 if v else 1
    if isinstance(v, float):
        return v * 0.5
    raise AssertionError(f"no alternative value for {key}={v!r}: add one to ALT")


def _plain(v):
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v)
    return v


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two JSON-lines corpora and two tokenizer.json files, for the contexts that need paths."""
    from fp4_experiments.data.tokenizer import train_bpe
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("jsonl_a", "jsonl_b", "jsonl_c"):
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": f"{name} document {i} " * 20}) + "\n"
                             for i in range(30)))
        out[name] = str(p)
    for name, vocab in (("tok_a", 300), ("tok_b", 320)):
        p = d / f"{name}.json"
        p.write_text(train_bpe([f"some text {i} for {name}" for i in range(200)], vocab).to_str())
        out[name] = str(p)
    return out


class Consumers:
    """What the code that reads the config resolves from it."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self._prepared = {}

    def recipe(self, cfg):
        from fp4_experiments.runner import recipe_from_config
        r = recipe_from_config(cfg)
        d = r.describe()
        return {"name": d["name"], "gemms": d["gemms"], "fp4_element": d["fp4_element"],
                "draws": r.random_draws}

    def model(self, cfg):
        import torch.nn as nn
        from fp4.linear import QuantState
        from fp4_experiments.model import build_llama
        from fp4_experiments.runner import recipe_from_config
        model, info = build_llama(cfg.model, 512, recipe_from_config(cfg), QuantState(seed=0))
        modules = [(n, type(m).__name__, len(m._forward_pre_hooks), len(m._forward_hooks),
                    "forward" in vars(m)) for n, m in model.named_modules()]
        return {"config": model.config.to_dict(), "info": vars(info), "modules": modules,
                "embedding": type(model.get_input_embeddings()).__name__,
                "n_params": sum(p.numel() for p in model.parameters() if isinstance(p, nn.Parameter))}

    def data(self, cfg):
        from fp4_experiments.data import prepare_data
        from fp4_experiments.data.sources import resolve_source
        from fp4_experiments.data.tokenizer import load_pretrained
        out = {}
        for split in ("train", "validation"):
            try:
                s = resolve_source(cfg.data, split, None)
                out[split] = (s.kind, s.location, s.max_docs, s.identity, s.hub)
            except (ValueError, FileNotFoundError) as err:
                out[split] = f"error: {err}"
        if cfg.tokenizer.name == "pretrained":
            out["tokenizer"] = load_pretrained(cfg.tokenizer.path).describe()
        elif cfg.data.name == "embedded" and not cfg.data.val_path:
            blob = json.dumps(OmegaConf.to_container(cfg.data), sort_keys=True, default=str) + \
                json.dumps(OmegaConf.to_container(cfg.tokenizer), sort_keys=True, default=str)
            if blob not in self._prepared:
                b = prepare_data(cfg.data, cfg.tokenizer, cfg.model.seq_len, self.cache_dir)
                desc = b.describe()
                self._prepared[blob] = {"tokenizer": desc["tokenizer"], "n_train": desc["n_train_tokens"],
                                        "train_docs": desc["train"]["n_docs"],
                                        "val_rows": list(b.val.shape), "val_sum": int(b.val.sum())}
            out["prepared"] = self._prepared[blob]
        return out

    def of(self, cfg, key):
        from fp4_experiments.rundir import run_name
        got = {"label": run_name(cfg, "")}
        group = key.split(".")[0]
        if group in ("ladder", "stabilizer", "format", "seed"):
            got["recipe"] = self.recipe(cfg)
        if group == "model":
            got["model"] = self.model(cfg)
        if group in ("data", "tokenizer"):
            got["data"] = self.data(cfg)
        return got


def _contexts():
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.rundir import experiment_dict
    keys = list(_leaves(experiment_dict(compose(BASE))))
    for k in KEY_CONTEXT:
        assert k in keys, f"KEY_CONTEXT names {k}, which is not a config key"
    return keys


KEYS = _contexts()


def test_every_key_is_consumed_or_refused(files, cache_dir, compose):
    from fp4_experiments.validate import ConfigError, validate_config
    consumers = Consumers(cache_dir)
    contexts = {"default": BASE}
    for key, extra in KEY_CONTEXT.items():
        contexts[key] = BASE + [e.format(**files) for e in extra]
    composed = {name: compose(ov) for name, ov in
                {tuple(v): v for v in contexts.values()}.items()}
    problems, consumed_somewhere, base_seen = [], set(), {}
    train_keys = [k for k in KEYS if k.startswith("train.")]
    for key in KEYS:
        if key.startswith("train."):
            continue
        for ctx in ["default"] + ([key] if key in KEY_CONTEXT else []):
            base = composed[tuple(contexts[ctx])]
            validate_config(base)  # every context is itself a valid config
            if key in GROUP_SWITCH:
                switch = [o.format(**files) for o in GROUP_SWITCH[key]]
                cfg, alt = compose(contexts[ctx] + switch), " ".join(switch)
            else:
                cfg = base.copy()
                alt = _alt(base, key, files)
                OmegaConf.update(cfg, key, alt, merge=False)
            assert _plain(OmegaConf.select(cfg, key)) != _plain(OmegaConf.select(base, key)), key
            try:
                validate_config(cfg)
            except ConfigError as err:
                if key not in str(err):
                    problems.append(f"[{ctx}] {key}={alt}: refused without naming the key: {err}")
                continue
            memo = (ctx, key.split(".")[0])
            if memo not in base_seen:
                base_seen[memo] = consumers.of(base, key)
            if consumers.of(cfg, key) != base_seen[memo]:
                consumed_somewhere.add(key)
            elif (ctx, key) not in INACTIVE_BY_DESIGN:
                problems.append(f"[{ctx}] {key}={alt!r}: accepted, changes the run key, and no "
                                "consumer reads it")
    never = [k for k in KEYS if not k.startswith("train.") and k not in consumed_somewhere]
    problems += [f"{k}: consumed in no context (refused everywhere?)" for k in never]
    # Train keys: read by the training loop.
    sources = ""
    for rel in TRAIN_SOURCES:
        p = REPO / rel
        for f in ([p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []):
            sources += f.read_text()
    for key in train_keys:
        leaf = key.split(".", 1)[1]
        if not re.search(rf"\.{leaf}\b", sources):
            problems.append(f"{key}: not read by the training code ({', '.join(TRAIN_SOURCES)})")
    assert not problems, "\n".join(problems)


def test_removed_keys_are_gone_and_refused(compose):
    """The keys that only changed the hash: what they said is defined once, in fp4."""
    from fp4_ablate.hydra_app import PrecheckError, precheck
    cfg = compose(["+ablation=wgrad_sr"])
    for key in ("ladder.fp4_gemms", "stabilizer.stochastic_rounding", "stabilizer.hadamard"):
        group, leaf = key.split(".")
        assert leaf not in cfg[group]
        for prefix in ("", "+"):
            with pytest.raises(PrecheckError, match=re.escape(key) + " is not a config key"):
                precheck(["+ladder=fprop", f"{prefix}{key}=true", "hardware=cpu"])


def test_grid_cells_and_groups_compose_and_validate(compose):
    """Every ablation cell, and every option of every group with the defaults, stays valid."""
    from fp4_experiments.validate import validate_config
    root = REPO / "configs"
    for cell in sorted(p.stem for p in (root / "ablation").glob("*.yaml")):
        for fmt in sorted(p.stem for p in (root / "format").glob("*.yaml")):
            validate_config(compose([f"+ablation={cell}", f"format={fmt}", "hardware=cpu"]),
                            environment=False)
    for group in ("ladder", "stabilizer", "format", "model", "train", "logger", "hardware"):
        for opt in sorted(p.stem for p in (root / group).glob("*.yaml")):
            prefix = "+" if group in ("ladder", "stabilizer") else ""
            validate_config(compose([f"{prefix}{group}={opt}"]), environment=False)


def test_enum_values_render_as_plain_strings(tmp_path, compose):
    """Run names, config.yaml and the run key see "fp8", not "Ladder.fp8"."""
    from fp4_experiments.rundir import experiment_dict, run_key, run_name, write_run_files
    cfg = compose(["+ablation=wgrad_h16", "format=ufp4", "format.ufp4_element=int4"])
    key = run_key(cfg)
    assert run_name(cfg, key) == f"wgrad-h16-ufp4-demo-s0-{key[:8]}"
    blob = json.dumps(experiment_dict(cfg), sort_keys=True)
    assert '"ladder": {"name": "wgrad"}' in blob and '"ufp4_element": "int4"' in blob
    assert "Ladder." not in blob and "Stabilizer." not in blob
    write_run_files(tmp_path, cfg, key, "cpu", [])
    text = (tmp_path / "config.yaml").read_text()
    assert "name: wgrad" in text and "hadamard_signs: none" in text and "ufp4_element: int4" in text
    assert "Ladder" not in text and "SignCadence" not in text
    # The file reads back as plain strings and gives the same run key.
    back = OmegaConf.load(tmp_path / "config.yaml")
    assert run_key(back) == key
