"""Parallel sweep jobs on local GPUs: each job holds an exclusive lock on one GPU slot.

Hydra's joblib launcher runs `n_jobs` sweep jobs at once in worker processes and hands them
out as workers free up, so a job cannot know its GPU from its job number. Instead each job
takes the first free slot among `n` lock files (`fcntl.flock`, released by the OS even if the
worker dies); the sweep maps the slot to a GPU (`sweep.jobs_per_gpu` slots per GPU).
Sequentially, slot 0 is always free.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def gpu_slot(n_slots: int, lock_dir: Path, poll_s: float = 0.5) -> Iterator[int]:
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(n_slots):
            fd = os.open(lock_dir / f"gpu{slot}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield slot
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        time.sleep(poll_s)
