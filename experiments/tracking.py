"""Experiment trackers: where metrics go besides the run directory (which always gets them).

`logger=wandb` sends the same records and the final summary to Weights & Biases, with the
project, group and tags of the config. The run id is the run key, so a resumed run continues
the same W&B run instead of starting a second one. `mode` null follows WANDB_MODE, so
`WANDB_MODE=offline` works with no account and no network.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("fp4_experiments.tracking")


class NullTracker:
    def log(self, record: Dict[str, Any]) -> None:
        pass

    def finish(self, summary: Dict[str, Any]) -> None:
        pass


class WandbTracker:
    def __init__(self, logger_cfg, run_dir: Path, run_key: str, name: str,
                 config: Dict[str, Any]):
        import wandb

        tags = list(logger_cfg.tags) + [config["ladder"]["name"], config["stabilizer"]["name"],
                                        config["format"]["name"], config["model"]["name"]]
        self._wandb = wandb
        self._run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group,
            tags=sorted(set(tags)), name=name, id=run_key, resume="allow", config=config,
            dir=str(run_dir), mode=logger_cfg.mode or None, reinit=True,
        )
        log.info("wandb run %s (mode %s)", self._run.id, self._run.settings.mode)

    def log(self, record: Dict[str, Any]) -> None:
        kind = record.get("kind", "train")
        data = {f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step")}
        self._run.log(data, step=int(record["step"]))

    def finish(self, summary: Dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                self._run.summary[k] = v
        self._run.finish()


def make_tracker(logger_cfg, run_dir: Path, run_key: str, name: str,
                 config: Optional[Dict[str, Any]]):
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, run_dir, run_key, name, config or {})
    return NullTracker()
