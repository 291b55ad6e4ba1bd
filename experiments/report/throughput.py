"""Step-throughput gain of each configuration over the FP8 baseline, and its source.

The net speedup needs the gain in tokens per second that a configuration's step buys.
Three sources, each labelled in the table:

``measured``
    mean tokens/s of the configuration's runs / mean tokens/s of its FP8 baseline runs.
    Only valid when every GEMM of both ran through a native kernel -- no ``(emulated)``
    in any ``gemm_paths`` value of the configuration's or the baseline's runs -- and all
    of them on one device: an emulated FP4 GEMM quantizes in software and then multiplies
    in BF16, so it is *slower* than FP8 and its tokens/s says nothing about FP4 hardware.

``modeled:<profile>``
    a roofline-style substitution on a hardware profile (configs/hardware/profile/*.yaml,
    vendor datasheet dense peaks)::

        T_fp8 = 1 / tokens_per_s(FP8 baseline)                      [s per token]
        T_cfg = T_fp8 + sum_g flops_g * (1/peak[prec_g] - 1/peak_fp8) + t_extra
        gain  = T_fp8 / T_cfg

    where g runs over Fprop/Dgrad/Wgrad, flops_g is the run's ``gemm_flops_per_token[g]``
    and prec_g the precision that GEMM runs in for this configuration (fp4 for the
    GEMMs the rung moved, bf16 for every GEMM of the bf16 reference; for the usual rungs
    the sum is over the FP4 GEMMs of ``flops_g * (1/peak_fp8 - 1/peak_fp4)``).
    ``t_extra`` is the cost of the stabilizer's extra work (Hadamard transforms, random
    numbers for SR), from the isolated bench:
    ``max(0, 1/tps(cfg) - 1/tps(same ladder, stabilizer none))``, 0 for the unstabilized rungs.

    Every tokens/s of the model comes from an isolated bench (``--throughput BENCH.json``, the
    eager steps of ``fp4-ablate bench``, one configuration alone on the device), never from the
    runs' own tokens/s: those were measured beside whatever else the machine ran (on a CPU, or
    a GPU shared by a sweep), and two identical CPU sweeps gave one stabilizer's modeled gain
    as -27.1% and -0.3%.  Without a bench nothing is modeled (``NOT_MODELED``); when no row has
    any gain, the report leaves the gain and net-speedup columns out and says why.

    Assumptions that push the GEMM saving *up* (treat it as an upper bound on that saving):
    the FP8 time per token measured on the device the runs used stands in for the target
    hardware's (so the non-GEMM share of the step -- attention, norms, optimizer,
    communication -- is the measured one); the moved GEMMs run at the datasheet peak in
    both precisions (equal efficiency) and the FP4 quantize/scale work hides behind them.
    The stabilizer term pulls the other way: the overhead measured in emulation transfers
    unchanged, and emulation (above all on a CPU, where a Hadamard or SR pass is plain torch)
    costs far more than the same work fused on FP4 hardware.  So for stabilized rows the
    modeled gain is neither bound; compare stabilizers by their extra tokens, and give a
    hardware measurement with ``--step-speedup`` for a headline number.  A run on a slow
    device (a CPU demo) has a long T_fp8, so the GEMM saving is a tiny fraction of it and
    the modeled gain is close to 1: that is the model saying the GEMMs are not where the
    time goes, not a bug.  A profile without an FP4 peak (H100) refuses to model any
    configuration with an FP4 GEMM (:class:`HardwareProfileError`).

Runs that shared a GPU (``sweep.jobs_per_gpu`` > 1, recorded as ``gpu_shared_by``) have tokens/s
that depend on whatever ran beside them, so ``measured`` is refused for them. The bench rows are MXFP4 (the bench's recipe default) keyed by model, rung and
stabilizer, and the device of that bench is named in the report.

``user``
    ``--step-speedup X``: a gain measured elsewhere (e.g. 1.20 on MI355X), applied to the
    configurations that have at least one FP4 GEMM; or per configuration, ``KEY=X`` (KEY a
    ladder such as ``wgrad`` -- every stabilizer of it --, ``wgrad+h16``, a table label, or ``*``
    for the rest), since a gain measured with all three GEMMs in FP4 says nothing about a rung
    that moved only Fprop. Rows no key covers keep their measured or modeled gain.

The table's primary gain is user if given, else measured if valid, else modeled on the
first profile; every profile's modeled gain is kept in its own columns as well.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import yaml

from ..rundir import GemmPath
from .runs import ReportError
from .stats import net_speedup

try:
    from fp4.names import FP4_GEMMS as _FP4_GEMMS, Gemm, choices
    GEMMS = choices(Gemm)
except ImportError:  # before fp4/names.py: the same tables from the recipe
    from fp4.recipe import FP4_GEMMS as _FP4_GEMMS, GEMMS
LADDER_FP4_GEMMS = {str(k): tuple(str(g) for g in v) for k, v in _FP4_GEMMS.items()}
PRECISIONS = ("bf16", "fp8", "fp4")


NOT_MODELED = ("not modeled: no isolated bench (--throughput BENCH.json); a run's own tokens/s were "
               "measured beside whatever else the machine ran")


class HardwareProfileError(ReportError):
    """A profile cannot be loaded, or cannot model a configuration (e.g. FP4 on H100)."""


def profile_dir() -> Path:
    import fp4_configs
    return Path(fp4_configs.__file__).resolve().parent / "hardware" / "profile"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    vendor: str
    peak_tflops: Mapping[str, Optional[float]]  # dense, per GPU
    source: str

    def peak_flops(self, precision: str) -> float:
        tf = self.peak_tflops.get(precision)
        if tf is None:
            raise HardwareProfileError(f"{self.name} has no {precision.upper()} peak (none in the "
                                       f"{self.vendor} datasheet): cannot model {precision.upper()} GEMMs on it")
        return float(tf) * 1e12


def load_profile(name_or_path: Union[str, Path]) -> HardwareProfile:
    """A profile by name (configs/hardware/profile/<name>.yaml) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = profile_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in profile_dir().glob("*.yaml"))
        raise HardwareProfileError(f"unknown hardware profile {name_or_path!r} (known: {', '.join(known)})")
    try:
        d = yaml.safe_load(p.read_text())
        peaks = {k: (None if d["peak_tflops"].get(k) is None else float(d["peak_tflops"][k])) for k in PRECISIONS}
        return HardwareProfile(str(d["name"]), str(d.get("vendor", "")), peaks, str(d["source"]))
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise HardwareProfileError(f"hardware profile {p}: malformed ({type(e).__name__}: {e}); needs name, "
                                   f"peak_tflops {{bf16, fp8, fp4}} and source") from None


def gemm_precisions(ladder: str, gemm_paths: Optional[Mapping[str, GemmPath]] = None) -> Dict[str, str]:
    """GEMM -> bf16 | fp8 | fp4 from the run's recorded gemm_paths, else from the ladder rung."""
    fp4 = LADDER_FP4_GEMMS.get(ladder, ())
    default = {g: ("bf16" if ladder == "bf16" else "fp4" if g in fp4 else "fp8") for g in GEMMS}
    recorded = {g: p.precision for g, p in (gemm_paths or {}).items() if g in GEMMS and p.precision in PRECISIONS}
    return {g: recorded.get(g) or default[g] for g in GEMMS}


def is_native(gemm_paths: Optional[Mapping[str, GemmPath]]) -> bool:
    return bool(gemm_paths) and all(p.native for p in gemm_paths.values())


def extra_time_per_token(tps_cfg: float, tps_unstabilized: float) -> float:
    """Measured cost of a stabilizer per token: max(0, 1/tps(cfg) - 1/tps(no stabilizer))."""
    return max(0.0, 1.0 / tps_cfg - 1.0 / tps_unstabilized)


def modeled_gain(tps_fp8: float, flops_per_token: Mapping[str, float], precisions: Mapping[str, str],
                 profile: HardwareProfile, t_extra: float = 0.0) -> float:
    """gain = T_fp8 / T_cfg with T_cfg = T_fp8 + sum_g flops_g (1/peak[prec_g] - 1/peak_fp8) + t_extra."""
    if not tps_fp8 > 0:
        raise HardwareProfileError("no FP8 baseline tokens/s to model from")
    t_fp8 = 1.0 / tps_fp8
    t_cfg = t_fp8 + t_extra
    for g, prec in precisions.items():
        if prec == "fp8":
            continue
        if g not in flops_per_token:
            raise HardwareProfileError(f"runs record no gemm_flops_per_token[{g!r}]")
        t_cfg += float(flops_per_token[g]) * (1.0 / profile.peak_flops(prec) - 1.0 / profile.peak_flops("fp8"))
    if not t_cfg > 0:
        raise HardwareProfileError(f"modeled step time is not positive on {profile.name} "
                                   f"(measured FP8 time per token {t_fp8:.3g} s is below the GEMMs' peak time)")
    return t_fp8 / t_cfg


@dataclass(frozen=True)
class IsolatedThroughput:
    """Tokens/s of each configuration alone on a GPU: the eager steps of `fp4-ablate bench`."""
    source: str
    device_name: str
    command: str
    tokens_per_s: Mapping[Tuple[str, str, str], float]  # (model, ladder, stabilizer) -> tokens/s
    format: str = "mxfp4"

    def get(self, model: str, ladder: str, stabilizer: str, fmt: str) -> float:
        if ladder not in ("bf16", "fp8") and fmt != self.format:
            return math.nan
        return float(self.tokens_per_s.get((model, ladder, stabilizer), math.nan))

    def describe(self) -> str:
        return f"`{self.source}` ({self.device_name}, eager steps, one configuration at a time)"


def load_isolated_throughput(path: Union[str, Path]) -> IsolatedThroughput:
    """Read a bench JSON (`fp4-ablate bench --out DIR` writes DIR/<device>.json)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        # Measured eager runner rows in MXFP4 (the format this model reads); a bench also holds
        # failed or skipped rows and, since issue 12, nvfp4 / ufp4 rows of the same rung.
        rows = [r for r in d["steps"] if r.get("mode", "eager") == "eager"
                and r.get("format", "mxfp4") == "mxfp4" and "error" not in r
                and "skipped" not in r and r.get("tokens_per_s") is not None]
        tps: Dict[Tuple[str, str, str], list] = {}
        for r in rows:
            tps.setdefault((str(r["model"]), str(r["ladder"]), str(r["stabilizer"])), []).append(
                float(r["tokens_per_s"]))
        meta = d.get("meta") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"--throughput {p}: not a readable `fp4-ablate bench` JSON "
                          f"({type(e).__name__}: {e}); it needs steps[] with model, ladder, "
                          f"stabilizer, mode and tokens_per_s") from None
    if not tps:
        raise ReportError(f"--throughput {p}: no eager steps in it")
    return IsolatedThroughput(str(path), str(meta.get("device_name", "unknown device")),
                              str(meta.get("command", "")),
                              {k: float(np.mean(v)) for k, v in tps.items()})


def _mean_tps(recs: Iterable[dict]) -> float:
    v = [r["mean_tokens_per_s"] for r in recs if np.isfinite(r["mean_tokens_per_s"])]
    return float(np.mean(v)) if v else math.nan


def _user_keys(row: dict) -> Tuple[str, ...]:
    """The names a per-configuration --step-speedup may use for a row, most specific first."""
    return (row["label"], f"{row['ladder']}+{row['stabilizer']}", row["ladder"], "*")


def _user_gain(row: dict, step_speedup) -> Optional[float]:
    if step_speedup is None:
        return None
    if isinstance(step_speedup, Mapping):
        for k in _user_keys(row):
            if k in step_speedup:
                return float(step_speedup[k])
        return None
    return float(step_speedup)


def check_user_keys(table: pd.DataFrame, step_speedup) -> None:
    """A per-configuration --step-speedup key that names no row is a typo, not a no-op."""
    if not isinstance(step_speedup, Mapping):
        return
    # Only rows with an FP4 GEMM take a user gain (bf16 and fp8 have none).
    rows = [r for r in table.to_dict("records") if r["ladder"] not in ("bf16", "fp8")]
    known = {k for r in rows for k in _user_keys(r)}
    bad = sorted(k for k in step_speedup if k not in known)
    if bad:
        choices = sorted({k for r in rows for k in _user_keys(r)[1:3]} | {"*"})
        raise ReportError(f"--step-speedup names no configuration of these runs: {', '.join(bad)}; "
                          f"valid keys: {', '.join(choices)} (or a table label)")


def _shared(recs: Iterable[dict]) -> int:
    return max((int(r.get("gpu_shared_by") or 1) for r in recs), default=1)


def _measured(recs, base_recs) -> Tuple[float, str]:
    allr = list(recs) + list(base_recs)
    shared = _shared(allr)
    if shared > 1:
        return math.nan, f"GPU shared by {shared} runs, tokens/s depend on the neighbours"
    if not all(is_native(r["gemm_paths"]) for r in allr):
        return math.nan, "emulated GEMMs (or no gemm_paths recorded)"
    devices = {r["device_name"] for r in allr}
    if len(devices) != 1:
        return math.nan, f"runs on different devices ({', '.join(sorted(map(str, devices)))})"
    gain = _mean_tps(recs) / _mean_tps(base_recs)
    return (gain, "") if np.isfinite(gain) else (math.nan, "no tokens/s recorded")


def _t_extra(row: dict, recs, runs: pd.DataFrame,
             isolated: Optional[IsolatedThroughput] = None) -> Tuple[float, str]:
    if row["stabilizer"] == "none":
        return 0.0, ""
    if isolated is not None:
        tps_cfg = isolated.get(row["model"], row["ladder"], row["stabilizer"], row["format"])
        tps_none = isolated.get(row["model"], row["ladder"], "none", row["format"])
        if not (np.isfinite(tps_cfg) and np.isfinite(tps_none)):
            return 0.0, (f"stabilizer overhead assumed 0: --throughput has no isolated "
                         f"{row['model']} {row['ladder']} ({row['stabilizer']} and none) steps")
        return extra_time_per_token(tps_cfg, tps_none), ""
    return math.nan, ""  # not modeled without an isolated bench (see NOT_MODELED)


def add_throughput(table: pd.DataFrame, runs: pd.DataFrame, profiles: Sequence[Union[str, HardwareProfile]] = (),
                   step_speedup=None, isolated: Optional[IsolatedThroughput] = None,
                   ) -> Tuple[pd.DataFrame, Dict[str, HardwareProfile]]:
    """Add gain/net columns to the stats table: per profile, measured, and the primary one."""
    check_user_keys(table, step_speedup)
    profs = {}
    for p in profiles:
        prof = p if isinstance(p, HardwareProfile) else load_profile(p)
        profs[prof.name] = prof
    by_dir = {r["run_dir"]: r for r in runs.to_dict("records")}
    out = []
    for row in table.to_dict("records"):
        recs = [by_dir[d] for d in row["run_dirs"]]
        base = [by_dir[d] for d in row["baseline_dirs"]]
        is_baseline = row["ladder"] == "fp8" and row["stabilizer"] == "none" and set(row["run_dirs"]) == set(
            row["baseline_dirs"])
        precisions = gemm_precisions(row["ladder"], recs[0]["gemm_paths"])
        has_fp4 = "fp4" in precisions.values()
        flops = next((r["gemm_flops_per_token"] for r in recs + base if r["gemm_flops_per_token"]), {})
        shared = _shared(recs + base)
        row["gpu_shared_by"] = shared
        row["tokens_per_s_isolated"] = (isolated.get(row["model"], row["ladder"], row["stabilizer"],
                                                     row["format"]) if isolated else math.nan)
        tps_base = _mean_tps(base)
        basis_note = ""
        if isolated is not None:
            tps_base = isolated.get(row["model"], "fp8", "none", row["format"])
            if not np.isfinite(tps_base):
                basis_note = f"--throughput has no isolated {row['model']} fp8 step"
        elif shared > 1:
            tps_base = math.nan
            basis_note = (f"GPU shared by {shared} runs: give isolated tokens/s with "
                          f"--throughput BENCH.json")
        else:
            tps_base = math.nan
            basis_note = NOT_MODELED
        t_extra, extra_note = _t_extra(row, recs, runs, isolated)
        row["t_extra_s_per_token"] = t_extra
        notes = [extra_note] if extra_note else []
        candidates = []  # (gain, source) in order of preference
        user = _user_gain(row, step_speedup) if has_fp4 else None
        if user is not None:
            if not user > 0:
                raise ReportError(f"--step-speedup must be a positive ratio such as 1.20, got {user}")
            candidates.append((user, "user"))
        row["gain_measured"], why_not = (1.0, "") if is_baseline else _measured(recs, base)
        row["measured_note"] = why_not
        if np.isfinite(row["gain_measured"]):
            candidates.append((row["gain_measured"], "measured"))
        for name, prof in profs.items():
            if is_baseline:
                g, row[f"note_{name}"] = 1.0, ""
            elif basis_note:
                g, row[f"note_{name}"] = math.nan, basis_note
            else:
                try:
                    g = modeled_gain(tps_base, flops, precisions, prof, t_extra)
                    row[f"note_{name}"] = ""
                except HardwareProfileError as e:
                    g, row[f"note_{name}"] = math.nan, str(e)
            row[f"gain_{name}"] = g
            row[f"net_{name}"] = net_speedup(g, row["cost_mean"])
            if np.isfinite(g):
                candidates.append((g, f"modeled:{name}"))
        if is_baseline:
            candidates.insert(0, (1.0, "baseline"))
        gain, source = candidates[0] if candidates else (math.nan, "")
        missing = ""
        if not candidates:
            modeled_notes = dict.fromkeys(row[f"note_{n}"] for n in profs if row[f"note_{n}"])
            missing = (f"no step-throughput gain: measured not valid ({why_not})"
                       + "".join(f"; {m}" for m in modeled_notes))
        row.update(gain=gain, gain_source=source, gain_note="; ".join(n for n in notes if n),
                   gain_missing=missing)
        row["net"] = net_speedup(gain, row["cost_mean"])
        row["net_lo"] = net_speedup(gain, row["cost_hi"])  # a higher cost gives the lower net
        row["net_hi"] = net_speedup(gain, row["cost_lo"])
        out.append(row)
    return pd.DataFrame(out), profs
