"""One process at a time trains a run directory: an advisory lock on `<run_dir>/run.lock`.

`run_lock(run_dir)` takes an exclusive `fcntl.flock` on the lock file and writes the holder
(pid, host, start time) into it; a second process that finds the lock held raises
`RunLocked` naming the holder (`fp4-ablate run` prints that line and exits 3), or, with
`wait=True` (a sweep job), blocks until the holder is done. The kernel drops the lock when
the holder's file descriptor closes, also when the process is killed, so a lock is never
stale; the file itself stays (deleting a lock file races with a process about to lock it) and
is emptied on release. flock works across processes of one host and, on Linux, across the
hosts of an NFS mount (it is emulated with byte-range locks there).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .rundir import LOCK


log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another process holds the run directory's lock (it is training that run now)."""

    def __init__(self, run_dir: Path, holder: str):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"{run_dir} is being trained by another process ({holder}); "
                         "wait for it to finish or stop it, then run again")


def holder_of(path: Path) -> str:
    """The holder written in a lock file, as text ('unknown holder' while it is being written)."""
    try:
        h = json.loads(Path(path).read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder"


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold `run_dir`'s lock for the body; RunLocked if it is held (or wait, with wait=True)."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(path)
            if not wait:
                raise RunLocked(run_dir, holder) from None
            log.info("%s: waiting for the run lock (held by %s)", run_dir, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
