"""Hydra glue: compose-and-check before any work, then hand the command line to Hydra.

Hydra rejects unknown keys (struct mode) and unknown group options, but its message names only
the bad key, and it lets `+key=` / `++key=` add any key. `precheck` composes the config first
(Hydra's compose API, no side effects), and on failure says what a user needs: the closest and
the valid keys of that node, the valid choices of an Enum-typed key, OmegaConf's reason for a
value of the wrong type, or the valid options of a group. It then runs `validate_config`
(unknown keys however they were added, cross-field and range checks, devices, paths and data
files). Only then does Hydra run the job, so bad input never creates a run directory.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, List, Optional, Sequence

CONFIG_MODULE = "fp4_configs"
CONFIG_NAME = "config"


class PrecheckError(Exception):
    """A command line that does not compose into a valid config."""


def _omegaconf_cause(err: BaseException):
    from omegaconf.errors import OmegaConfBaseException
    seen = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import fp4_configs.schema  # noqa: F401  (registers the structured-config schema)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides),
                             return_hydra_config=False)


def _override_value(overrides: Sequence[str], full_key: str) -> Optional[str]:
    base = re.sub(r"\[\d+\]$", "", full_key)
    for o in overrides:
        if "=" in o and key_of(o) == base:
            return o.split("=", 1)[1]
    return None


def composition_message(err: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's message with the reason OmegaConf gave, the valid keys or the valid choices."""
    from fp4_experiments.validate import unknown_key_message

    msg = str(err).strip()
    cause = _omegaconf_cause(err)
    if cause is None:
        return msg
    key = cause.full_key
    reason = str(cause).split("\n")[0].strip()
    if "not in struct" in str(cause) or "not in" in reason and "Key" in reason:
        return unknown_key_message(key)
    choices = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]$", reason)
    if choices:
        value = None if key.endswith("]") else _override_value(overrides, key)
        value = choices.group(1) if value is None else value
        return (f"{key}={value!r} is not valid; choose one of: {choices.group(2)}"
                + (f"\n({msg.splitlines()[0]})" if msg and reason not in msg else ""))
    if reason and reason not in msg:
        msg = f"{msg.splitlines()[0]}: {key}: {reason}"
    return msg


def precheck(overrides: Sequence[str], *, devices: bool = True):
    """Compose `overrides` and validate; return the config or raise PrecheckError.

    devices=False skips the CUDA / Triton checks (a sweep launched to other machines).
    """
    from fp4_experiments.validate import ConfigError, validate_config
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conflict = ablation_format_conflict(overrides)
    if conflict:
        raise PrecheckError(conflict)
    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise PrecheckError(composition_message(err, overrides)) from None
    try:
        validate_config(cfg, devices=devices)
    except ConfigError as err:
        raise PrecheckError(str(err)) from None
    return cfg


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value of `key=`, `+key=` or `++key=` in one job's overrides (the last one), else None."""
    value = None
    for o in overrides:
        k, sep, v = o.lstrip("+").partition("=")
        if sep and k == key:
            value = v
    return value


def ablation_format_conflict(overrides: Sequence[str]) -> Optional[str]:
    """The refusal when an ablation cell that sets the format (`override /format: F` in its defaults,
    e.g. nvfp4_wgrad) meets `format=G` on the command line: Hydra lets the command line win, so the
    cell would silently run G. None when there is no such conflict."""
    import os
    import yaml
    cell, fmt = _override_value(overrides, "ablation"), _override_value(overrides, "format")
    if not cell or not fmt:
        return None
    path = os.path.join(os.path.dirname(_config_yaml()), "ablation", f"{cell}.yaml")
    if not os.path.isfile(path):
        return None  # an unknown cell: composition names the valid ones
    with open(path) as f:
        defaults = (yaml.safe_load(f) or {}).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, dict) and "override /format" in entry and str(entry["override /format"]) != fmt:
            cell_fmt = entry["override /format"]
            return (f"+ablation={cell} sets format={cell_fmt}, and format={fmt} on the command line would "
                    f"silently win over it (Hydra's rule): drop format={fmt}, or use +ablation=wgrad "
                    f"format={fmt}")
    return None


# Hydra lists every folder of configs/ as a config group in --help; these are data for the
# report (experiments/report/throughput.py), not options of a run.
HIDDEN_GROUPS = ("hardware/profile",)
SWEEP_HEADER = """fp4-ablate sweep: run the paper's grid (or any Hydra sweep) over seeds; resumable and
idempotent (finished runs are skipped, interrupted ones resume), then print the outcome.

Examples:
  fp4-ablate sweep                                the default grid (experiments/sweep.py
                                                  DEFAULT_GRID: ablation cells), sweep.seeds seeds
  fp4-ablate sweep sweep.seeds=3 model=llama-20m train=gpu data=c4_local data.path=DIR
  fp4-ablate sweep +ladder=fp8,wgrad +stabilizer=none,h16   the product instead of the grid
  fp4-ablate sweep +ablation=fp8,wgrad_h16,bf16   chosen cells (configs/ablation/)
Every job's config and data paths are checked before the first job starts.
The options below are those of one job (the sweep's first)."""


def _help_text(text: str, prog: str) -> str:
    lines = [line for line in text.split("\n")
             if not any(line.startswith(g + ":") for g in HIDDEN_GROUPS)]
    text = "\n".join(lines)
    if prog.endswith("sweep"):
        from omegaconf import OmegaConf
        header = OmegaConf.load(_config_yaml()).hydra.help.header
        text = text.replace(header.strip(), SWEEP_HEADER, 1)
    return text


def _config_yaml() -> str:
    import os
    import fp4_configs
    return os.path.join(os.path.dirname(fp4_configs.__file__), "config.yaml")


def run_hydra(task: Callable, argv: Sequence[str], prog: str) -> None:
    """Run `task` as a Hydra app with `argv` as its command line (flags and overrides)."""
    import contextlib
    import io

    import hydra

    import fp4_configs.schema  # noqa: F401

    app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME,
                     version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    help_out = io.StringIO() if ("--help" in argv or "-h" in argv) else None
    try:
        if help_out is None:
            app()
        else:
            try:
                with contextlib.redirect_stdout(help_out):
                    app()
            finally:
                sys.stdout.write(_help_text(help_out.getvalue(), prog))
                sys.stdout.flush()
    finally:
        sys.argv = saved


def split_flags(argv: Sequence[str]) -> tuple[List[str], List[str]]:
    """Hydra flags (--cfg job, --help, -c ...) versus overrides (key=value)."""
    flags: List[str] = []
    overrides: List[str] = []
    takes_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                   "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i",
                   "--experimental-rerun"}
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in takes_value:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(arg)
    return flags, overrides


def first_value_variants(overrides: Sequence[str]) -> List[List[str]]:
    """Command lines that together try every value of every swept key once (not the product).

    Checking each value once is enough to catch any bad one, and costs a handful of
    compositions instead of the whole grid.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    firsts: List[str] = []
    sweeps = []
    for o in parsed:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            sweeps.append((len(firsts), o, values))
            firsts.append(f"{o.get_key_element()}={values[0]}")
        else:
            firsts.append(o.input_line)
    variants = [firsts]
    for idx, o, values in sweeps:
        for v in values[1:]:
            line = list(firsts)
            line[idx] = f"{o.get_key_element()}={v}"
            variants.append(line)
    return variants


def sweep_size(overrides: Sequence[str]) -> int:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    total = 1
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override():
            total *= len(list(o.sweep_string_iterator()))
    return total


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def find_override(overrides: Sequence[str], key: str) -> Optional[str]:
    for o in overrides:
        if key_of(o) == key:
            return o.split("=", 1)[1] if "=" in o else None
    return None
