"""Run directories: keyed, self-describing, written so that a kill never loses or corrupts them.

A run is identified by a hash of its resolved *experiment* config and seed (see
`fp4_configs.schema.NON_EXPERIMENT_KEYS` for what is left out: output paths, logging,
hardware), so the same experiment always lands in the same directory. That is what makes
`run` and `sweep` idempotent: a finished run is found and skipped, an interrupted one is
found and resumed from its checkpoint, and a row is never duplicated.

Every file that is replaced is written atomically (temporary file in the same directory,
fsync, rename). `metrics.jsonl` is append-only; on resume it is cut back to the checkpoint's
step so the resumed run's history equals an uninterrupted one's.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from fp4_configs.schema import NON_EXPERIMENT_KEYS

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoints/last.pt"


def experiment_dict(cfg: DictConfig) -> Dict[str, Any]:
    """The part of the resolved config that determines what a run computes."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    for key in NON_EXPERIMENT_KEYS:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return d


def run_key(cfg: DictConfig) -> str:
    blob = json.dumps(experiment_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(cfg: DictConfig, key: str) -> str:
    return (f"{cfg.ladder.name}-{cfg.stabilizer.name}-{cfg.format.name}-{cfg.model.name}"
            f"-s{cfg.seed}-{key[:8]}")


def run_dir_for(cfg: DictConfig) -> Path:
    key = run_key(cfg)
    return Path(cfg.results_dir) / run_name(cfg, key)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class MetricsWriter:
    """Append-only JSON lines; each line is flushed so a kill loses at most the line in flight."""

    def __init__(self, path: Path, truncate_after_step: Optional[int] = None):
        self.path = Path(path)
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a line cut by the kill: everything after it is gone too
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(l + "\n" for l in keep))

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> Iterable[dict]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)


def git_commit(repo_dir: Optional[Path] = None) -> tuple[Optional[str], Optional[bool]]:
    """The commit of the code that ran, and whether the working tree differed from it.

    FP4_ABLATE_GIT_COMMIT, when set, wins: whoever ships a copy of the tree to another machine
    knows its commit, while a .git travelling with the copy can be stale (it then reports an
    older HEAD with a "dirty" tree, which names the wrong code).
    """
    if os.environ.get("FP4_ABLATE_GIT_COMMIT"):
        return os.environ["FP4_ABLATE_GIT_COMMIT"], None
    cwd = repo_dir or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd,
                              capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else None
        if commit is None:
            return None, None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=cwd, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> Dict[str, Optional[str]]:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "triton", "datasets", "tokenizers", "hydra", "omegaconf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__: recorded as absent
            out[mod] = None
    return out


def device_name(device) -> str:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_run_files(run_dir: Path, cfg: DictConfig, key: str, device, overrides: list) -> dict:
    commit, dirty = git_commit()
    meta = {
        "run_key": key,
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions(),
        "device": str(device),
        "device_name": device_name(device),
        "hostname": socket.gethostname(),
        "seed": int(cfg.seed),
        "argv": sys.argv,
        "overrides": list(overrides),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    atomic_write_text(run_dir / "overrides.txt", "".join(f"{o}\n" for o in overrides))
    atomic_write_json(run_dir / "meta.json", meta)
    return meta
