"""Post-hoc target: tokens-to-target for runs trained without one (``fp4-ablate report --target-ppl``).

A
fixed-budget run (no target: status ``completed``, or ``diverged`` without one) can still be given
a tokens-to-target: the first evaluation at or below T and the one before it (before the first:
(0 tokens, vocabulary size), a uniform guess) are interpolated linearly in log-perplexity by the
training loop's own :func:`fp4_experiments.training.evaluate.interpolate_crossing` -- the number a
run trained with ``train.target_ppl=T`` (stop_at_target) would have recorded, since a target changes
nothing a run computes before its crossing (the tests read every crossing of the committed llama-20m
ladder back from its curves this way, to the float).  The vocabulary size is the run's data.json
tokenizer.vocab_size (config.yaml's as a fallback), needed only when the first evaluation crosses.
Status ``reached``
then; ``not_reached`` when the budget ended above T; a diverged run counts only the evaluations
before its divergence (the loop never records the one that diverged) and stays ``diverged``
unless it crossed T first.  Runs trained with a target keep theirs.  ``--target-ppl calibrate[:F]``
chooses T per experiment group by `fp4-ablate calibrate --fraction F`'s rule (default F = 0.7):
the geometric mean over the group's FP8 runs (stabilizer none, status completed) of their
perplexity at F x max_tokens (:func:`fp4_experiments.calibrate.ppl_at`, :func:`~fp4_experiments.calibrate.target_from`).  Post-hoc rows carry ``target_posthoc`` = True; the group key keeps
``train.target_ppl`` = null, so a post-hoc table is never merged with one of runs trained to T.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import pandas as pd

from ..calibrate import ppl_at, target_from
from ..rundir import Status, read_config, read_json
from .runs import ReportError, trained_without_target

DEFAULT_CALIBRATE_FRACTION = 0.7


class PosthocTarget(NamedTuple):
    """``--target-ppl``: a perplexity (``ppl``), or calibrate's rule at ``fraction`` (module doc)."""

    ppl: Optional[float] = None
    fraction: Optional[float] = None

    def describe(self) -> str:
        return f"{self.ppl:g}" if self.ppl is not None else f"calibrate:{self.fraction:g}"


def parse_target(text: str) -> PosthocTarget:
    """'41.5' -> a fixed target; 'calibrate' or 'calibrate:F' (0 < F <= 1) -> calibrate's rule.
    Raises ValueError for anything else (a target must be a finite positive perplexity)."""
    text = str(text).strip()
    if text == "calibrate" or text.startswith("calibrate:"):
        frac = text.partition(":")[2]
        try:
            f = float(frac) if frac else DEFAULT_CALIBRATE_FRACTION
        except ValueError:
            raise ValueError(f"{text!r}: calibrate:F needs a fraction F, such as calibrate:0.7") from None
        if not 0.0 < f <= 1.0:  # the range `fp4-ablate calibrate --fraction` accepts
            raise ValueError(f"{text!r}: the fraction must be in (0, 1]")
        return PosthocTarget(fraction=f)
    try:
        ppl = float(text)
    except ValueError:
        raise ValueError(f"{text!r}: expected a perplexity such as 40.5, or calibrate[:F]") from None
    if not (math.isfinite(ppl) and ppl > 0):
        raise ValueError(f"{text!r}: a target perplexity must be a positive number")
    return PosthocTarget(ppl=ppl)


class PosthocChoice(NamedTuple):
    """The post-hoc target of one experiment group, and where it came from."""

    group_id: str
    group: str
    ppl: float
    fraction: Optional[float]  # None: given on the command line
    fp8_ppl: Dict[str, float]  # calibrate: {FP8 run: its perplexity at fraction x max_tokens}

    def describe(self) -> str:
        if self.fraction is None:
            return f"ppl {self.ppl:g} (given)"
        runs = ", ".join(f"{name} {p:.3f}" for name, p in sorted(self.fp8_ppl.items()))
        return (f"ppl {self.ppl:g}: `fp4-ablate calibrate --fraction {self.fraction:g}`'s rule, the geometric "
                f"mean over {len(self.fp8_ppl)} FP8 run(s) of their perplexity at {self.fraction:g} x the token "
                f"budget ({runs})")


def is_fixed_budget(r: dict) -> bool:
    """A run of a runs table trained without a target (:func:`.runs.trained_without_target`)."""
    return trained_without_target(r["status"], r["target_ppl"])


def first_crossing(curve: Sequence[Tuple[float, float]], target: float, vocab_size) -> Optional[float]:
    """Tokens at which a validation curve [(tokens, ppl)] first reaches ``target``, as the training loop
    records the crossing (module doc); None if it never does. ``vocab_size``: a callable, asked only
    when the first evaluation already crosses (the loop interpolates from (0, vocab size) there)."""
    # Imported here: the training package loads torch and the model, which loading runs does not need.
    from ..training.evaluate import interpolate_crossing
    prev = None
    for t, p in curve:
        if not math.isfinite(p):
            return None  # the loop stops at a non-finite evaluation (diverged)
        if p <= target:
            t0, p0 = prev if prev is not None else (0.0, float(vocab_size()))
            return float(interpolate_crossing(t0, p0, t, p, target))
        prev = (t, p)
    return None


def _vocab_size(r: dict) -> int:
    data = read_json(Path(r["run_dir"]) / "data.json") or {}
    v = (data.get("tokenizer") or {}).get("vocab_size")
    if v is None:
        v = ((read_config(r["run_dir"]) or {}).get("tokenizer") or {}).get("vocab_size")
    if not isinstance(v, int) or v <= 0:
        raise ReportError(f"{r['run']}: its first evaluation is already at or below the post-hoc target, and the "
                          "vocabulary size the crossing is interpolated from (data.json tokenizer.vocab_size) is "
                          "unknown")
    return v


def _posthoc_row(r: dict, target: float) -> dict:
    curve, at = r["curve"], r["diverged_at_tokens"]
    if r["status"] == Status.diverged.value and isinstance(at, (int, float)) and math.isfinite(at):
        # The evaluation that diverged is logged but never recorded by the loop as a crossing.
        curve = [(t, p) for t, p in curve if t < at]
    crossed = first_crossing(curve, target, lambda: _vocab_size(r))
    status = (Status.reached if crossed is not None else
              Status.diverged if r["status"] == Status.diverged.value else Status.not_reached)
    return dict(r, status=status.value, target_ppl=float(target), target_posthoc=True,
                tokens_to_target=math.nan if crossed is None else crossed)


def _choose_target(spec: PosthocTarget, rows: List[dict]) -> PosthocChoice:
    gid, label = rows[0]["group_id"], rows[0]["group"]
    if spec.ppl is not None:
        return PosthocChoice(gid, label, spec.ppl, None, {})
    fp8 = [r for r in rows if r["ladder"] == "fp8" and r["stabilizer"] == "none"
           and r["status"] == Status.completed.value and (r["max_tokens"] or 0) > 0]
    at = {r["run"]: ppl_at([{"tokens": t, "val_ppl": p} for t, p in r["curve"]], spec.fraction * r["max_tokens"])
          for r in fp8}
    at = {k: v for k, v in at.items() if v is not None}
    where = f"experiment group {label}" if label else "the fixed-budget runs"
    if not at:
        raise ReportError(f"--target-ppl {spec.describe()}: {where} has no FP8 run (stabilizer none, status "
                          f"completed) with evaluations around {spec.fraction:g} x its token budget")
    if len({r["max_tokens"] for r in fp8 if r["run"] in at}) > 1:
        raise ReportError(f"--target-ppl {spec.describe()}: the FP8 runs of {where} have different token budgets")
    ppl = target_from(list(at.values()))
    return PosthocChoice(gid, label, ppl, spec.fraction, at)


def apply_posthoc_target(runs: pd.DataFrame, spec: PosthocTarget) -> Tuple[pd.DataFrame, List[PosthocChoice]]:
    """Give every fixed-budget run of ``runs`` (``load_runs(..., include_completed=True)``) a tokens-to-target
    at its group's post-hoc target (module doc); runs trained with a target are returned as they were.
    Returns (runs, the target chosen per experiment group with fixed-budget runs, by group label)."""
    if runs.empty:
        return runs, []
    recs = runs.to_dict("records")
    by_group: Dict[str, List[dict]] = {}
    for r in recs:
        if is_fixed_budget(r):
            by_group.setdefault(r["group_id"], []).append(r)
    choices = {g: _choose_target(spec, rows) for g, rows in by_group.items()}
    out = [_posthoc_row(r, choices[r["group_id"]].ppl) if is_fixed_budget(r) else r for r in recs]
    return pd.DataFrame(out, columns=runs.columns), sorted(choices.values(), key=lambda c: c.group)
