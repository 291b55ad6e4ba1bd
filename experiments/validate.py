"""Checks on a composed config, run before any work: bad input fails naming the key and what is allowed.

The structured-config schema (fp4_configs.schema) types every key, and its Enums reject a value
outside its choices at composition, naming the key and listing the choices. What is left here:

* keys the schema does not know (Hydra lets `+key=value` / `++key=value` add them even in struct
  mode), refused with the closest valid keys;
* cross-field checks: a key that has no effect with its group's choice (Hadamard signs without a
  Hadamard stabilizer, `sr_operands` without SR, `ufp4_element` without ufp4, hub settings
  without `data=c4`, ...) is refused instead of being silently ignored (it would change the run
  key and nothing else);
* ranges (positive sizes, betas in [0, 1), an even head dimension for RoPE, ...);
* the environment (`check_environment`): CUDA / Triton when the hardware config asks for them,
  writable `results_dir` / `cache_dir`, data files that exist and are readable, a tokenizer path
  that exists. These touch nothing on disk but a probe file created and removed at once.

`check_data` is the last check, run by the runner after data preparation (which fills the
tokenizer and token caches) and before the run directory exists: a validation split smaller than
`data.val_tokens`, an unreadable corpus, ... fail there as a ConfigError too.

Every problem is collected, so one run of the command lists all of them.
"""
from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from fp4.names import Stabilizer

DEVICES = ("auto", "cpu", "cuda")
# Local data files up to this size are decompressed in full by the check (a truncated gzip
# shows only at its end); larger ones have their header and first record checked.
FULL_CHECK_BYTES = 64 << 20


class ConfigError(ValueError):
    """A composed config with values outside their valid choices or ranges, or bad input files."""


# -- unknown keys -------------------------------------------------------------------------------

def _schema():
    from fp4_configs.schema import ExperimentConfig
    return OmegaConf.structured(ExperimentConfig)


def _is_structured(node) -> bool:
    import dataclasses
    return isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))


def unknown_keys(cfg) -> List[str]:
    """Problems for every key of `cfg` the schema does not have, with the closest valid keys."""
    problems: List[str] = []

    def walk(node, schema, prefix: str) -> None:
        for key in node.keys():
            if not prefix and key == "hydra":
                continue
            full = f"{prefix}{key}"
            if key not in schema:
                valid = [str(k) for k in schema.keys()]
                close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
                parent = prefix.rstrip(".") or "<top level>"
                hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
                problems.append(f"{full} is not a config key{hint} (valid keys under {parent}: "
                                f"{', '.join(valid)})")
                continue
            sub = schema._get_node(key)
            if _is_structured(sub):
                child = node._get_node(key)
                if isinstance(child, DictConfig) and not child._is_none():
                    walk(child, sub, full + ".")

    walk(cfg, _schema(), "")
    return problems


def valid_keys_under(full_key: str) -> Tuple[str, List[str]]:
    """(parent, keys) of the schema node that would hold `full_key`."""
    node = _schema()
    parts = full_key.split(".")
    prefix = []
    for p in parts[:-1]:
        if p not in node or not _is_structured(node._get_node(p)):
            break
        node = node._get_node(p)
        prefix.append(p)
    return ".".join(prefix) or "<top level>", [str(k) for k in node.keys()]


def unknown_key_message(full_key: str) -> str:
    parent, valid = valid_keys_under(full_key)
    leaf = full_key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
    pre = "" if parent == "<top level>" else parent + "."
    hint = f"; did you mean {', '.join(pre + c for c in close)}?" if close else ""
    return f"{full_key} is not a config key{hint}\nValid keys under {parent}: {', '.join(valid)}"


# -- helpers ------------------------------------------------------------------------------------

def _positive(problems: List[str], key: str, value) -> None:
    if value is None or value <= 0:
        problems.append(f"{key}={value!r} must be > 0")


def _in_range(problems: List[str], key: str, value, lo, hi, hi_open=True, lo_open=False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        problems.append(f"{key}={value!r} must be in {lb}{lo}, {hi}{rb}")


def _refuse_set(problems: List[str], key: str, value, why: str) -> None:
    if value is not None:
        problems.append(f"{key}={_show(value)} has no effect {why}; remove it (leave it null)")


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


# -- the checks ---------------------------------------------------------------------------------

def validate_config(cfg, *, environment: bool = True, devices: bool = True) -> None:
    """Raise ConfigError listing every problem of `cfg`.

    environment: also check files, paths and (devices) CUDA / Triton on this machine.
    """
    p: List[str] = list(unknown_keys(cfg))
    if p:  # the rest may read the misspelt key's intended neighbour: report the typo alone
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(p))
    _check_recipe(p, cfg)
    _check_data(p, cfg)
    _check_model(p, cfg.model)
    _check_train(p, cfg)
    _check_parallel(p, cfg)
    _check_diagnostics(p, cfg.diagnostics)
    _check_profile(p, cfg.profile, cfg)
    if not p:
        _check_cuda_graphs(p, cfg)
    if int(cfg.seed) < 0:
        p.append(f"seed={cfg.seed} must be >= 0")
    device = str(cfg.hardware.device)
    if not (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())):
        p.append(f"hardware.device={device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N")
    _check_sweep(p, cfg)
    if environment and not p:
        p += check_environment(cfg, devices=devices)
    if p:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(p))


def _format_rules(fmt_name: str, ufp4_element) -> dict:
    """What the numerics say a recipe format does with the format keys (fp4.recipe tables)."""
    from fp4.formats import OPERAND_FORMATS
    from fp4.recipe import FORMAT_RECIPES
    rec = FORMAT_RECIPES[str(fmt_name)]
    own_element = rec.element == "ufp4_element"  # the element is the ufp4_element choice
    element = str(ufp4_element or "e1m2") if own_element else rec.element
    return {"own_element": own_element, "element": element,
            "scale_modes": tuple(OPERAND_FORMATS[element].scale_modes),
            "built_in_hadamard": bool(rec.hadamard_gemms)}


def _check_recipe(p: List[str], cfg) -> None:
    from fp4.recipe import HADAMARD_STABILIZERS
    st, fmt = cfg.stabilizer, cfg.format
    name = st.name
    rules = _format_rules(fmt.name, fmt.ufp4_element)
    if name == Stabilizer.none:
        _refuse_set(p, "stabilizer.gemms", st.gemms, "with stabilizer=none (it acts on nothing)")
    elif st.gemms is not None and len(st.gemms) == 0:
        p.append(f"stabilizer.gemms=[] leaves stabilizer={name} nothing to act on; name at least "
                 "one of fprop, dgrad, wgrad (or use stabilizer=none)")
    if name != Stabilizer.sr:
        _refuse_set(p, "stabilizer.sr_operands", st.sr_operands,
                    f"with stabilizer={name} (only sr rounds stochastically)")
    if name not in HADAMARD_STABILIZERS:
        _refuse_set(p, "stabilizer.hadamard_signs", st.hadamard_signs,
                    f"with stabilizer={name}, which has no Hadamard transform "
                    f"({', '.join(HADAMARD_STABILIZERS)} have one)")
        if not rules["built_in_hadamard"]:
            _refuse_set(p, "stabilizer.hadamard_size", st.hadamard_size,
                        f"with stabilizer={name} and format={fmt.name}: no Hadamard transform "
                        f"({', '.join(HADAMARD_STABILIZERS)} and formats with a built-in one have one)")
    hs = st.hadamard_size
    if hs is not None and (hs < 2 or hs & (hs - 1)):
        p.append(f"stabilizer.hadamard_size={hs} must be a power of two >= 2 (e.g. 16)")
    if fmt.scale_mode is not None:
        if not rules["scale_modes"]:
            p.append(f"format.scale_mode={fmt.scale_mode} has no effect with format={fmt.name} "
                     f"(its {rules['element']} block scales have no selectable rule); remove it "
                     "(leave it null)")
        elif fmt.scale_mode not in rules["scale_modes"]:
            p.append(f"format.scale_mode={fmt.scale_mode} is not valid with format={fmt.name} "
                     f"({rules['element']} elements); choose one of: {', '.join(rules['scale_modes'])}")
    if not rules["own_element"]:
        _refuse_set(p, "format.ufp4_element", fmt.ufp4_element,
                    f"with format={fmt.name} (its element is {rules['element']})")
    if fmt.nvfp4_2d_weights and rules["element"] != "nvfp4":
        p.append(f"format.nvfp4_2d_weights=true has no effect with format={fmt.name} (nvfp4 only); "
                 "remove it")
    if not p:  # what the numerics core itself refuses (e.g. h16_all aimed at some GEMMs only)
        from fp4_experiments.runner import recipe_from_config
        try:
            recipe_from_config(cfg)
        except ValueError as err:
            p.append(f"ladder/stabilizer/format: {err}")


def _check_data(p: List[str], cfg) -> None:
    d, tok = cfg.data, cfg.tokenizer
    for key in ("path", "val_path"):
        if OmegaConf.is_missing(d, key):
            p.append(f"data.{key} is required with data={d.name} (data.{key}=...)")
    local = d.name in ("c4_local", "jsonl")
    if local and not OmegaConf.is_missing(d, "path") and not d.path:
        p.append(f"data.path is required with data={d.name}")
    if not local and not OmegaConf.is_missing(d, "path"):
        _refuse_set(p, "data.path", d.path, f"with data={d.name} (c4_local and jsonl read it; "
                    "a separate validation corpus is data.val_path)")
    if d.name != "c4":
        for key in ("hub_path", "hub_name", "data_files", "val_split_name"):
            _refuse_set(p, f"data.{key}", d[key], f"with data={d.name} (data=c4 only)")
    window = cfg.model.seq_len + 1
    if d.val_tokens < window:
        p.append(f"data.val_tokens={d.val_tokens} is less than one validation row of "
                 f"model.seq_len+1={window} tokens; use at least {window}")
    if d.max_docs is not None and d.max_docs <= 0:
        p.append(f"data.max_docs={d.max_docs} must be > 0, or null for no cap")
    if tok.name == "bpe":
        if tok.vocab_size is None or tok.vocab_size < 260:
            p.append(f"tokenizer.vocab_size={tok.vocab_size} must be >= 260 for byte-level BPE")
        if tok.train_docs is None or tok.train_docs <= 0:
            p.append(f"tokenizer.train_docs={tok.train_docs} must be > 0 (documents the BPE "
                     "is trained on)")
        if not OmegaConf.is_missing(tok, "path"):
            _refuse_set(p, "tokenizer.path", tok.path, "with tokenizer=bpe (pretrained only)")
    else:
        if OmegaConf.is_missing(tok, "path") or not tok.path:
            p.append("tokenizer.path is required with tokenizer=pretrained")
        for key in ("vocab_size", "train_docs"):
            _refuse_set(p, f"tokenizer.{key}", tok[key],
                        "with tokenizer=pretrained (the vocabulary is the tokenizer's own)")


def _check_model(p: List[str], m) -> None:
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "seq_len", "rope_theta", "rms_norm_eps", "init_std"):
        _positive(p, f"model.{key}", m[key])
    if m.num_heads > 0 and m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size={m.hidden_size} must be a multiple of model.num_heads={m.num_heads}")
    elif m.num_heads > 0 and m.hidden_size > 0 and (m.hidden_size // m.num_heads) % 2:
        p.append(f"model.hidden_size={m.hidden_size} / model.num_heads={m.num_heads} = head dimension "
                 f"{m.hidden_size // m.num_heads}, which must be even (RoPE rotates pairs)")
    if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")


def _check_train(p: List[str], cfg) -> None:
    t = cfg.train
    for key in ("max_tokens", "batch_size", "lr", "eps", "grad_clip", "eval_every_tokens",
                "eval_batch_size", "checkpoint_every_steps", "log_every_steps"):
        _positive(p, f"train.{key}", t[key])
    if t.micro_batch_size is not None and (t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size):
        p.append(f"train.micro_batch_size={t.micro_batch_size} must divide train.batch_size={t.batch_size}")
    if t.target_ppl is not None and t.target_ppl <= 1.0:
        p.append(f"train.target_ppl={t.target_ppl} must be > 1 (a perplexity), or null for no target")
    _in_range(p, "train.min_lr_ratio", t.min_lr_ratio, 0, 1, hi_open=False)
    _in_range(p, "train.beta1", t.beta1, 0, 1)
    _in_range(p, "train.beta2", t.beta2, 0, 1)
    _in_range(p, "train.diverge_ema", t.diverge_ema, 0, 1)
    if t.weight_decay < 0:
        p.append(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.diverge_loss_ratio <= 1:
        p.append(f"train.diverge_loss_ratio={t.diverge_loss_ratio} must be > 1 (a ratio to the "
                 "best smoothed loss)")
    if t.warmup_tokens < 0 or t.warmup_tokens >= t.max_tokens:
        p.append(f"train.warmup_tokens={t.warmup_tokens} must be in [0, train.max_tokens)")


def _check_parallel(p: List[str], cfg) -> None:
    """parallel.*: the global batch splits over torchrun's WORLD_SIZE ranks in whole micro-batches."""
    from fp4_experiments.distributed import env_world_size
    par, t = cfg.parallel, cfg.train
    world = env_world_size()
    _positive(p, "parallel.timeout_s", par.timeout_s)
    if str(par.name) == "none" and world > 1:
        p.append(f"torchrun started {world} processes but parallel=none: choose parallel=ddp or "
                 "parallel=fsdp2")
    if world > 1:
        _check_batch_split(p, t, world, f"WORLD_SIZE={world}")
    if par.param_dtype is not None and str(par.name) != "fsdp2":
        p.append(f"parallel.param_dtype={par.param_dtype} has no effect with parallel={par.name} "
                 "(fsdp2 only); leave it null")


def _check_diagnostics(p: List[str], d) -> None:
    """diagnostics.*: a cadence >= 1 (or off), and consistency windows that fit between probes."""
    if d.every_steps is not None and d.every_steps < 0:
        p.append(f"diagnostics.every_steps={d.every_steps} must be >= 1, or null / 0 for off")
    if d.window < 0 or (d.every_steps and d.window != 0 and not 2 <= d.window <= d.every_steps):
        bound = f"diagnostics.every_steps={d.every_steps}" if d.every_steps else "diagnostics.every_steps"
        p.append(f"diagnostics.window={d.window} must be 0 (no consistency windows) or in [2, {bound}]: a "
                 "window needs two steps to correlate, and windows open every every_steps steps and may not overlap")


def _check_profile(p: List[str], pr, cfg) -> None:
    """profile.*: a step count >= 0 (0: off), a first step >= 1, a table of >= 1 row, and profiled
    steps that the run's budget reaches (else it would train to the end and write no profile)."""
    if pr.steps < 0:
        p.append(f"profile.steps={pr.steps} must be >= 1, or 0 for off")
    if pr.start_step < 1:
        p.append(f"profile.start_step={pr.start_step} must be >= 1 (optimizer steps count from 1)")
    if pr.row_limit < 1:
        p.append(f"profile.row_limit={pr.row_limit} must be >= 1")
    per_step = int(cfg.train.batch_size) * int(cfg.model.seq_len)
    if pr.steps > 0 and pr.start_step >= 1 and per_step > 0:
        total = -(-int(cfg.train.max_tokens) // per_step)
        last = pr.start_step + pr.steps - 1
        if last > total:
            p.append(f"profile.start_step={pr.start_step} profile.steps={pr.steps} profile steps up to "
                     f"{last}, but the run has {total} optimizer steps (train.max_tokens="
                     f"{cfg.train.max_tokens} / {per_step} tokens per step): lower profile.start_step")


def _check_cuda_graphs(p: List[str], cfg) -> None:
    """hardware.cuda_graphs=true: refused when something blocks the graphed step (training/graphed.py)
    that the config shows; null picks the plain step for such runs by itself."""
    if getattr(cfg.hardware, "cuda_graphs", None) is not True:
        return
    from fp4_experiments.distributed import env_world_size
    from fp4_experiments.runner import recipe_from_config
    from fp4_experiments.training.graphed import graph_blockers
    import torch
    device = str(cfg.hardware.device)
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    blockers = graph_blockers(
        device="cuda" if on_cuda else "cpu", draws=list(recipe_from_config(cfg).random_draws),
        parallel=str(cfg.parallel.name), world_size=env_world_size(),
        check_finite=bool(cfg.train.check_finite))
    for why in blockers:
        p.append(f"hardware.cuda_graphs=true but {why}; use hardware.cuda_graphs=null (the plain step "
                 "where a graph cannot replay it) or false")


def _check_batch_split(p: List[str], t, world: int, ranks: str) -> None:
    micro = t.micro_batch_size or t.batch_size // world
    if t.batch_size % world or t.batch_size % (micro * world):
        p.append(f"train.batch_size={t.batch_size} (the global batch) must split into "
                 f"{ranks} ranks x whole micro-batches of "
                 f"train.micro_batch_size={t.micro_batch_size} (per rank)")


def _check_sweep(p: List[str], cfg) -> None:
    """sweep.*: counts, and what sweep.gpus_per_run=K > 1 (each run on K torchrun processes) needs.

    K > 1 with parallel=none is refused rather than turned into ddp: torchrun users choose the
    mode (fsdp2's param_dtype changes the numbers and the run key), and `torchrun ... run
    parallel=none` is refused the same way. The GPU count K must divide is checked with the
    environment (check_environment)."""
    from fp4_experiments.distributed import env_world_size
    sw = cfg.sweep
    if sw.seeds < 1:
        p.append(f"sweep.seeds={sw.seeds} must be >= 1")
    if sw.jobs_per_gpu < 1:
        p.append(f"sweep.jobs_per_gpu={sw.jobs_per_gpu} must be >= 1")
    k = sw.gpus_per_run
    if k < 1:
        p.append(f"sweep.gpus_per_run={k} must be >= 1")
    if k <= 1:
        return
    if str(cfg.parallel.name) == "none":
        p.append(f"sweep.gpus_per_run={k} runs each job on {k} processes (torchrun); choose "
                 "parallel=ddp or parallel=fsdp2 (parallel=none is one process)")
    if sw.jobs_per_gpu > 1:
        p.append(f"sweep.gpus_per_run={k} with sweep.jobs_per_gpu={sw.jobs_per_gpu}: a run on "
                 "several GPUs holds them alone; set sweep.jobs_per_gpu=1 or sweep.gpus_per_run=1")
    device = str(cfg.hardware.device)
    if device.startswith("cuda:"):
        p.append(f"sweep.gpus_per_run={k} picks each run's GPUs itself; hardware.device={device} "
                 "names one: use hardware.device=auto or cuda")
    if env_world_size() != k:  # inside the run torchrun started, the WORLD_SIZE check says it
        _check_batch_split(p, cfg.train, k, f"sweep.gpus_per_run={k}")


def _check_gpus_per_run(cfg, devices: bool) -> List[str]:
    """sweep.gpus_per_run=K > 1 against this machine: K divides the visible CUDA GPUs (none
    visible, or hardware.device=cpu: K gloo processes on the CPU). devices=False is a sweep
    launched to other machines, where torchrun on this one would be wrong."""
    k = int(cfg.sweep.gpus_per_run)
    if k <= 1:
        return []
    if not devices:
        return [f"sweep.gpus_per_run={k} starts torchrun on this machine's GPUs, not with a remote "
                "launcher: under hydra/launcher=submitit_slurm give each run K GPUs with "
                f"hydra.launcher.tasks_per_node={k} hydra.launcher.gpus_per_node={k} (one task per "
                "rank) and leave sweep.gpus_per_run=1"]
    if str(cfg.hardware.device) == "cpu":
        return []
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n and n % k:
        valid = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        return [f"sweep.gpus_per_run={k} must divide the {n} visible GPUs (groups of consecutive "
                f"GPUs); choose one of: {valid}"]
    return []


# -- the environment ----------------------------------------------------------------------------

def check_environment(cfg, *, devices: bool = True) -> List[str]:
    """Problems with this machine or the file system for `cfg` (nothing is created)."""
    p: List[str] = []
    if devices:
        p += _check_devices(cfg.hardware)
    p += _check_gpus_per_run(cfg, devices)
    p += _check_dir("results_dir", cfg.results_dir)
    p += _check_dir("cache_dir", cfg.cache_dir)
    p += check_data_files(cfg)
    tok = cfg.tokenizer
    if tok.name == "pretrained" and tok.path and not Path(str(tok.path)).expanduser().exists():
        p.append(f"tokenizer.path={tok.path!r} does not exist (a tokenizer.json file or a "
                 "Hugging Face tokenizer directory)")
    return p


def _check_devices(hw) -> List[str]:
    device = str(hw.device)
    wants_cuda = device.startswith("cuda")
    wants_triton = hw.quant_backend == "triton"
    if not (wants_cuda or wants_triton):
        return []
    import torch
    p = []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wants_cuda and n == 0:
        p.append(f"hardware.device={device} but this machine has no usable CUDA GPU; use "
                 "hardware=cpu or hardware=auto")
    elif device.startswith("cuda:") and int(device[5:]) >= n:
        p.append(f"hardware.device={device} but this machine has {n} CUDA GPU(s) "
                 f"(cuda:0..cuda:{n - 1})")
    if wants_triton:
        if importlib.util.find_spec("triton") is None:
            p.append("hardware.quant_backend=triton but triton is not installed; use "
                     "hardware.quant_backend=auto or torch")
        elif (n == 0 or device == "cpu") and os.environ.get("TRITON_INTERPRET") != "1":
            p.append("hardware.quant_backend=triton needs a CUDA GPU (hardware.device="
                     f"{device}, {n} GPU(s) here); use hardware.quant_backend=auto or torch")
    return p


def _check_dir(key: str, value) -> List[str]:
    """`value` is a directory we can write into, or can be created as one."""
    path = Path(str(value)).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"cannot be created: {str(probe)!r} is a file"
        return [f"{key}={str(value)!r} {what}, not a directory"]
    try:  # as root, os.access says yes to everything: create and remove a probe file
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".fp4-ablate-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        where = "" if probe == path else f" (its existing parent {str(probe)!r})"
        return [f"{key}={str(value)!r} is not writable{where}: {err.strerror or err}"]
    return []


_FILE_CHECKS: Dict[Tuple[str, int, int], Optional[str]] = {}


def _check_file(path: Path, key: str) -> Optional[str]:
    """None when `path` looks like a readable JSON-lines file (optionally gzip), else a problem."""
    try:
        st = path.stat()
    except OSError as err:
        return f"{key}: {str(path)!r} cannot be read: {err.strerror or err}"
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo in _FILE_CHECKS:
        return _FILE_CHECKS[memo]
    problem = None
    if st.st_size == 0:
        problem = f"{key}: data file {str(path)!r} is empty"
    else:
        try:
            with open(path, "rb") as raw:
                if str(path).endswith(".gz"):
                    if raw.read(2) != b"\x1f\x8b":
                        raise ValueError("not a gzip file (no gzip header)")
                    raw.seek(0)
                    stream = gzip.GzipFile(fileobj=raw)
                    first = stream.readline()
                    if st.st_size <= FULL_CHECK_BYTES:
                        while stream.read(1 << 20):
                            pass
                else:
                    first = raw.readline()
            if first.strip():
                rec = json.loads(first)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError("its first record has no string 'text' field")
        except (OSError, EOFError, zlib.error, ValueError) as err:
            problem = f"{key}: data file {str(path)!r} is not readable JSON lines: {err}"
    _FILE_CHECKS[memo] = problem
    return problem


def check_data_files(cfg) -> List[str]:
    """The local data files of `cfg` exist and open (no tokenizing, no cache written)."""
    from fp4_experiments.data.sources import resolve_source

    d = cfg.data
    if d.name not in ("c4_local", "jsonl") and not d.val_path:
        return []
    p: List[str] = []
    failed = set()
    for split in ("train", "validation"):
        key = "data.val_path" if split == "validation" and d.val_path else "data.path"
        if key in failed:
            continue
        try:
            src = resolve_source(d, split, None)
        except (FileNotFoundError, ValueError) as err:
            p.append(f"{key}={str(d[key.split('.')[1]])!r}: {err}")
            failed.add(key)
            continue
        for f in src.files:
            if isinstance(f, Path):
                problem = _check_file(f, key)
                if problem:
                    p.append(problem)
    return list(dict.fromkeys(p))


def check_data(cfg):
    """Prepare the data (fills the caches) and turn bad input into a ConfigError.

    Run before the run directory is created: a validation split with fewer tokens than
    data.val_tokens, a corpus with no documents or an unreadable file fails here.
    """
    from fp4_experiments.data import prepare_data

    try:
        return prepare_data(cfg.data, cfg.tokenizer, cfg.model.seq_len, Path(cfg.cache_dir))
    except (ValueError, FileNotFoundError, EOFError, zlib.error) as err:
        raise ConfigError(f"invalid input data: {err}") from err
