"""`fp4-ablate diagnose`: every configuration's GEMM errors side by side, on the same weights and batches.

    fp4-ablate diagnose [--checkpoint RUN_DIR] [--configs fp8,fprop,...] [--steps K] [--batches B]
                        [--layers L1,L2] [--lr LR] [--out DIR] [OVERRIDES...]

The starting point is a run's checkpoint (RUN_DIR/checkpoints/last.pt, with the run's config.yaml;
model and optimizer state, and the data loader's position: the batches are the ones the run would
have seen next) or a freshly initialized model of the config composed from OVERRIDES exactly as
`fp4-ablate run` composes it (`model=demo hardware=cpu ...`; seed-determined init).

From that one state W_0, for the exact-gradient reference (the bf16 recipe: no quantization) and then
for each configuration of --configs (the groups of configs/ablation/, applied as `+ablation=NAME`
would: its ladder and stabilizer; the format and everything else stay the base config's), K optimizer
steps are taken through the training step itself (fp4_experiments.training.TrainStep: same optimizer,
clipping and learning rate) on the same B batches (step t uses batch t mod B). Every quantized GEMM of
the selected layers is probed (fp4/probe.py) in every step. Measured:

  per configuration x GEMM (mean over layers and steps): operand and output metrics
      (experiments/diagnostics/metrics.py);
  per configuration: error consistency over the K steps (metrics.ErrorConsistency) of the errors
      that are comparable across steps (consistency.py: the Wgrad output error dW - dW*, and the
      Fprop and Dgrad weight-operand errors W_eff - W in W's own coordinates; mean over layers), the
      weight drift ||W_q - W_exact|| / ||W_exact - W_0|| after K steps over all quantized linears' weights,
      W_exact the reference trajectory's, and the last step's loss.

Learning rate: --lr, else the schedule's at the checkpoint's tokens, else (fresh model) the peak
train.lr (lr_at(0) is the first warmup step's, 1/warmup of the peak: nothing would move).

Output in --out DIR: diagnose.md (both tables), diagnose_gemms.csv, diagnose_configs.csv,
diagnose.json (every number, plus the per-step records) and diagnose.png.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..rundir import CHECKPOINT, CONFIG, atomic_write_json, atomic_write_text
from .collect import Collector, OPERAND_KEYS, mean_by

DEFAULT_CONFIGS = ("fp8", "fprop", "dgrad", "wgrad", "wgrad_sr", "wgrad_rht", "wgrad_h16", "wgrad_h16_all")
REFERENCE = "bf16"


class DiagnoseError(ValueError):
    """A bad argument or input of diagnose (printed without a traceback)."""


@dataclass
class DiagnoseResult:
    gemm_rows: List[Dict[str, object]]
    config_rows: List[Dict[str, object]]
    markdown: str
    files: Dict[str, Path] = field(default_factory=dict)


class _Replay:
    """A loader that hands out fixed batches in turn (TrainStep's `next_batch`)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def _base_config(checkpoint: Optional[Path], overrides: Sequence[str]):
    from omegaconf import OmegaConf
    from fp4_ablate.hydra_app import compose
    if checkpoint is None:
        return compose(list(overrides))
    from fp4_configs.schema import ExperimentConfig
    cfg_path = checkpoint / CONFIG
    if not cfg_path.exists() or not (checkpoint / CHECKPOINT).exists():
        raise DiagnoseError(f"--checkpoint {checkpoint}: needs {CONFIG} and {CHECKPOINT} "
                            "(a finished run keeps its checkpoint only with train.keep_final_checkpoint=true)")
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(cfg_path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def _config_for(base, name: str):
    """The base config with the ladder and stabilizer of configs/ablation/NAME.yaml."""
    from fp4_ablate.hydra_app import compose
    try:
        cell = compose([f"+ablation={name}"])
    except Exception as err:  # Hydra's "could not find ablation/NAME"
        raise DiagnoseError(f"unknown configuration {name!r} (configs/ablation/): {err}") from None
    cfg = base.copy()
    cfg.ladder, cfg.stabilizer = cell.ladder, cell.stabilizer
    return cfg


def _linear_weights(model) -> Dict[str, torch.Tensor]:
    from fp4.linear import QuantLinear
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _flat(weights: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.double().flatten() for _, w in sorted(weights.items())])


def diagnose(overrides: Sequence[str] = (), configs: Sequence[str] = DEFAULT_CONFIGS, steps: int = 4,
             batches: Optional[int] = None, checkpoint=None, layers: Optional[Sequence] = None,
             lr: Optional[float] = None, out_dir=None) -> DiagnoseResult:
    from fp4.linear import QuantState
    from ..data import TrainLoader, prepare_data
    from ..model import build_llama
    from ..runner import execution_config, pick_device, recipe_from_config
    from ..training import TrainStep, lr_at, make_optimizer
    from ..training.setup import autocast_for

    if steps < 1:
        raise DiagnoseError(f"--steps must be >= 1, got {steps}")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    base = _base_config(checkpoint, overrides)
    device = pick_device(str(base.hardware.device))
    bundle = prepare_data(base.data, base.tokenizer, base.model.seq_len, Path(base.cache_dir))
    vocab, eos = bundle.tokenizer.vocab_size, bundle.tokenizer.eos_id
    micro = base.train.micro_batch_size or base.train.batch_size
    loader = TrainLoader(bundle.train_tokens, base.model.seq_len, micro, int(base.seed))
    ckpt = torch.load(checkpoint / CHECKPOINT, map_location=device, weights_only=False) if checkpoint else None
    if ckpt is not None:
        loader.load_state_dict(ckpt["loader"])
    n_batches = batches or steps
    data = [tuple(t.to(device) for t in loader.next_batch()) for _ in range(n_batches)]
    if lr is None:
        lr = lr_at(ckpt["loop"]["tokens"], base.train) if ckpt is not None else float(base.train.lr)
    quant_step = int(ckpt["quant_state"]["step"]) if ckpt is not None else 0
    cells = [(REFERENCE, _config_for(base, REFERENCE))] + [(c, _config_for(base, c)) for c in configs]
    for name, cfg in cells:  # every recipe is built before the first step: a bad one fails early
        recipe_from_config(cfg)

    w0 = None
    reference: List[Dict[str, torch.Tensor]] = []
    gemm_rows, config_rows, records = [], [], []
    autocast = autocast_for(device, str(base.hardware.autocast_dtype))
    for name, cfg in cells:
        t0 = time.perf_counter()
        recipe = recipe_from_config(cfg)
        state = QuantState(seed=int(cfg.seed), step=quant_step, execution=execution_config(cfg, device))
        torch.manual_seed(int(cfg.seed))
        model, _ = build_llama(cfg.model, vocab, recipe, state, eos_id=eos)
        model.to(device)
        optimizer = make_optimizer(model, cfg.train, device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        if w0 is None:
            w0 = _linear_weights(model)
        else:  # same starting point bit for bit (init is seed-determined; checked, not assumed)
            assert all(torch.equal(w0[k], v) for k, v in _linear_weights(model).items())
        step = TrainStep(model=model, step_model=model, optimizer=optimizer, loader=_Replay(data),
                         quant_state=state, autocast=autocast, device=device, n_micro=1,
                         grad_clip=cfg.train.grad_clip)
        collector = Collector(layers, consistency=True)
        model.train()
        losses, drifts = [], []
        for t in range(steps):
            with state.probe_gemms(collector):
                r = step(lr)
            collector.end_step()
            losses.append(r.loss)
            weights = _linear_weights(model)
            if name == REFERENCE:
                reference.append(weights)
            else:
                exact = _flat(reference[t])
                moved = float((exact - _flat(w0)).norm())
                drifts.append(float((_flat(weights) - exact).norm()) / moved if moved > 0 else None)
        recs = collector.take()
        for rec in recs:
            rec["config"] = name
        records += recs
        if name == REFERENCE:
            continue
        for row in mean_by(recs, ("gemm",)):
            gemm_rows.append({"config": name, **row})
        cons = collector.consistency

        def mean_over_layers(kind, what):
            values = [getattr(cons, what)(k) for k in cons.keys() if k[0] == kind]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        config_rows.append({
            "config": name, "recipe": recipe.name, "steps": steps,
            "dW_err_step_corr": mean_over_layers("wgrad", "step_corr"),
            "dW_err_coherence": mean_over_layers("wgrad", "coherence"),
            "W_err_step_corr": mean_over_layers("fprop", "step_corr"),
            "W_err_coherence": mean_over_layers("fprop", "coherence"),
            "W_dgrad_err_step_corr": mean_over_layers("dgrad", "step_corr"),
            "W_dgrad_err_coherence": mean_over_layers("dgrad", "coherence"),
            "independent_coherence": 1 / math.sqrt(steps),
            "weight_drift": drifts[-1], "loss": losses[-1], "seconds": time.perf_counter() - t0,
        })
    markdown = to_markdown(gemm_rows, config_rows, steps, n_batches, lr, checkpoint, base)
    result = DiagnoseResult(gemm_rows, config_rows, markdown)
    if out_dir is not None:
        result.files = write_outputs(Path(out_dir), result, records)
    return result


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4f}"
    return str(v)


GEMM_COLUMNS = ("out.rel_err", "out.cos", "out.bias")
CONFIG_COLUMNS = ("dW_err_step_corr", "dW_err_coherence", "W_err_step_corr", "W_err_coherence",
                  "W_dgrad_err_step_corr", "W_dgrad_err_coherence", "weight_drift", "loss")
OPERAND_TABLE_KEYS = ("rel_err", "sqnr_db", "bias", "flushed", "clipped")


def _gemm_table_rows(gemm_rows):
    """The per-GEMM rows with operand columns renamed a.* / b.* (the operands differ per GEMM)."""
    from fp4.names import GEMM_OPERANDS
    out = []
    for r in gemm_rows:
        a, b = (str(n) for n in GEMM_OPERANDS[r["gemm"]])
        row = {"config": r["config"], "gemm": r["gemm"], "path": r.get("path"), "operands": f"{a},{b}"}
        row.update({c: r.get(c) for c in GEMM_COLUMNS})
        for tag, name in (("a", a), ("b", b)):
            for k in OPERAND_KEYS:
                row[f"{tag}.{k}"] = r.get(f"{name}.{k}")
        out.append(row)
    return out


def to_markdown(gemm_rows, config_rows, steps, n_batches, lr, checkpoint, base) -> str:
    start = f"checkpoint `{checkpoint}`" if checkpoint else f"fresh `{base.model.name}` model (seed {base.seed})"
    lines = [f"# fp4-ablate diagnose", "",
             f"From a {start}; {steps} optimizer step(s) per configuration at lr {lr:.3g} on {n_batches} "
             f"fixed batch(es) of {base.train.micro_batch_size or base.train.batch_size} x {base.model.seq_len} "
             "tokens, the same for every configuration. Means over layers and steps.", "",
             "## Per configuration x GEMM", "",
             "Operands a, b in product order (Fprop x,w; Dgrad dy,w; Wgrad dy,x). rel = ||q-x||/||x||, "
             "bias = <x,q>/<x,x>-1, flush = nonzero -> 0, clip = |x| > grid max x block scale; "
             "out: against the exact float64 product.", "",
             "| config | GEMM | path | out rel err | out cos | out bias | a rel | a SQNR dB | a bias | a flush | "
             "a clip | b rel | b SQNR dB | b bias | b flush | b clip |",
             "|" + "---|" * 16]
    for r in _gemm_table_rows(gemm_rows):
        cells = [r["config"], r["gemm"], r["path"] or "-"] + [_fmt(r[c]) for c in GEMM_COLUMNS]
        for tag in ("a", "b"):
            cells += [_fmt(r[f"{tag}.{k}"]) for k in OPERAND_TABLE_KEYS]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"## Per configuration: error consistency over {steps} steps and weight drift", "",
              f"coherence = ||sum e_t|| / sum ||e_t|| (1: the same error every step; independent errors: "
              f"1/sqrt({steps}) = {1 / math.sqrt(steps):.3f}); step corr = corr(e_t, e_t+1). dW: the Wgrad "
              "output error; W: the Fprop weight-operand error W_eff - W, W (Dgrad): Dgrad's (blocked along "
              "out_features), both in W's own coordinates. drift = ||W_q - W_exact|| / ||W_exact - W_0|| "
              "after the last step, W_exact the bf16 (exact-gradient) trajectory.", "",
              "| config | recipe | dW err step corr | dW err coherence | W err step corr | W err coherence | "
              "W (Dgrad) err step corr | W (Dgrad) err coherence | weight drift | loss |", "|" + "---|" * 10]
    for r in config_rows:
        lines.append("| " + " | ".join([r["config"], r["recipe"]] + [_fmt(r[c]) for c in CONFIG_COLUMNS]) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: List[Dict[str, object]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_outputs(out_dir: Path, result: DiagnoseResult, records) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "diagnose.md": atomic_write_text(out_dir / "diagnose.md", result.markdown),
        "diagnose_gemms.csv": atomic_write_text(out_dir / "diagnose_gemms.csv", _csv(_gemm_table_rows(result.gemm_rows))),
        "diagnose_configs.csv": atomic_write_text(out_dir / "diagnose_configs.csv", _csv(result.config_rows)),
        "diagnose.json": atomic_write_json(out_dir / "diagnose.json", {
            "gemms": result.gemm_rows, "configs": result.config_rows, "records": records}),
    }
    files["diagnose.png"] = _plot(out_dir / "diagnose.png", result)
    return files


def _plot(path: Path, result: DiagnoseResult) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [r["config"] for r in result.config_rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.27
    for i, gemm in enumerate(("fprop", "dgrad", "wgrad")):
        values = {r["config"]: r.get("out.rel_err") for r in result.gemm_rows if r["gemm"] == gemm}
        axes[0].bar([j + (i - 1) * width for j in range(len(configs))],
                    [values.get(c) or 0.0 for c in configs], width, label=gemm)
    axes[0].set_title("GEMM output relative error")
    axes[0].set_yscale("log")
    axes[0].legend()
    for key, label in (("dW_err_coherence", "dW error"), ("W_err_coherence", "W error"),
                       ("W_dgrad_err_coherence", "W (Dgrad) error")):
        axes[1].plot(configs, [r.get(key) if r.get(key) is not None else float("nan") for r in result.config_rows],
                     marker="o", label=label)
    if result.config_rows:
        axes[1].axhline(result.config_rows[0]["independent_coherence"], color="gray", ls="--",
                        label="independent (1/sqrt k)")
    axes[1].set_title("error coherence over the steps")
    axes[1].set_ylim(0, 1.05)
    axes[1].legend()
    axes[2].bar(configs, [r.get("weight_drift") or 0.0 for r in result.config_rows])
    axes[2].set_title("weight drift vs exact-gradient trajectory")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fp4-ablate diagnose", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a run directory with checkpoints/last.pt")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated configs/ablation/ names (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (default 4)")
    parser.add_argument("--batches", type=int, default=None, help="distinct batches, cycled (default: --steps)")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices or name substrings")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default="results/diagnose", help="output directory (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for fp4-ablate run")
    args = parser.parse_intermixed_args(argv)
    layers = [int(v) if v.strip().isdigit() else v.strip() for v in args.layers.split(",")] if args.layers else None
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        result = diagnose(args.overrides, configs, args.steps, args.batches, args.checkpoint, layers, args.lr,
                          args.out)
    except DiagnoseError as err:
        print(f"fp4-ablate diagnose: {err}", file=sys.stderr, flush=True)
        return 2
    print(result.markdown, flush=True)
    print(f"written: {', '.join(str(p) for p in result.files.values())}", flush=True)
    return 0
