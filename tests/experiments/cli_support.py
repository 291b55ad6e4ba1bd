"""Helpers shared by the runner, sweep and CLI tests: a tiny config and the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A configuration small enough that a run is a second or two on 2 CPU cores: the demo model
# with one layer, short sequences, the embedded C4 sample and a small BPE vocabulary.
TINY = [
    "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_heads=2", "model.num_kv_heads=1", "model.seq_len=64",
    "tokenizer.vocab_size=512", "data.val_tokens=2048",
    "train.batch_size=4", "train.max_tokens=2560", "train.warmup_tokens=512",
    "train.eval_every_tokens=1024", "train.log_every_steps=1",
    "train.checkpoint_every_steps=3", "train.progress_bar=false", "hardware=cpu",
    "train.target_ppl=null",
]



def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fp4_ablate", *args], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def train_records(run_dir: Path) -> list:
    """What a run trained, from its metrics.jsonl: (step, loss, grad norm) per train record, then
    (step, validation loss) per evaluation -- equal for two runs that trained the same bits."""
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["kind"] == "train"] + \
        [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "eval"]
