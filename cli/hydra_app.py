"""Hydra glue: compose-and-check before any work, then hand the command line to Hydra.

Hydra already rejects unknown keys and unknown group options, but its message names only the
bad key. `precheck` composes the config first (Hydra's compose API, no side effects), and on
failure adds what a user needs: the valid keys of that node, or the valid options of that
group. It then runs `validate_config`, which checks values against their valid choices. Only
then does Hydra run the job, so a typo never creates a run directory.
"""
from __future__ import annotations

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


def _valid_keys(base_overrides: Sequence[str], full_key: str) -> List[str]:
    from omegaconf import DictConfig
    cfg = compose(base_overrides)
    node = cfg
    parts = full_key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, DictConfig) or p not in node:
            return sorted(cfg.keys())
        node = node[p]
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import fp4_configs.schema  # noqa: F401  (registers the structured-config schema)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides),
                             return_hydra_config=False)


def precheck(overrides: Sequence[str]):
    """Compose `overrides` and validate; return the config or raise PrecheckError."""
    from fp4_experiments.validate import ConfigError, validate_config
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        msg = str(err).strip()
        cause = _omegaconf_cause(err)
        if cause is not None and "not in" in str(cause):
            key = cause.full_key
            others = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(key)]
            try:
                valid = _valid_keys(others, key)
            except Exception:  # the rest of the command line is broken too: say what we know
                valid = []
            if valid:
                parent = key.rsplit(".", 1)[0] if "." in key else "<top level>"
                msg += f"\nValid keys under {parent}: {', '.join(valid)}"
        raise PrecheckError(msg) from None
    try:
        validate_config(cfg)
    except ConfigError as err:
        raise PrecheckError(str(err)) from None
    return cfg


def run_hydra(task: Callable, argv: Sequence[str], prog: str) -> None:
    """Run `task` as a Hydra app with `argv` as its command line (flags and overrides)."""
    import hydra

    import fp4_configs.schema  # noqa: F401

    app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME,
                     version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        app()
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
