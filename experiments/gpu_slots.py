"""Parallel sweep jobs on local GPUs: slot locks for one-GPU jobs, group locks for K-GPU jobs.

Hydra's joblib launcher runs `n_jobs` sweep jobs at once in worker processes and hands them
out as workers free up, so a job cannot know its GPU from its job number. Instead each job
locks what it uses, with `fcntl.flock` on files under `<cache_dir>/gpu-slots/` (released by the
OS when the holder dies, so a lock is never stale). Every acquisition is all-or-nothing and
non-blocking (try every lock, on any miss release what was taken and poll again), so two jobs
can never deadlock holding half of what each wants.

Two kinds of lock files
=======================
* `gpu<s>.lock`, exclusive: *seat* s of the one-GPU jobs (`gpu_slot`). A sweep with
  `sweep.jobs_per_gpu=J` on n GPUs has n * J seats; seat s runs on GPU s mod n, so the first n
  jobs spread over all GPUs before any doubles up. (Named by seat, as before: sweeps sharing a
  cache dir share the seats.)
* `device-<host>-<gpu>.lock`, per physical GPU: a one-GPU job holds it *shared* beside its seat
  (J jobs may share a GPU); a K-GPU job (`gpu_group`, `sweep.gpus_per_run=K`) holds it
  *exclusive* on each GPU of its group. So a group never shares a GPU with a one-GPU job of this
  or another sweep sharing the cache dir, nor with another group, while one-GPU jobs keep their
  seats exactly as before. `<gpu>` is the GPU's entry in CUDA_VISIBLE_DEVICES (its index when
  that is unset), so sweeps that see different subsets of the machine agree on a physical GPU;
  `<host>` keeps two machines sharing a cache dir over NFS (where flock also works) apart.

Groups are K consecutive visible GPUs (0..K-1, K..2K-1, ...; K divides the GPU count, checked by
validation): neighbouring indices usually share a switch, and fixed groups keep two K-GPU jobs
from fragmenting the machine so that neither fits. The price of all-or-nothing polling is
fairness: a group waits until all its GPUs are free at the same poll, so a stream of one-GPU
jobs of another sweep on the same GPUs can delay it indefinitely; run such sweeps apart.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence


def visible_gpus(n: int) -> List[str]:
    """The physical names of visible GPUs 0..n-1: their CUDA_VISIBLE_DEVICES entries (an index, a
    GPU-/MIG- UUID), or their indices when it is unset."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not env.strip():
        return [str(i) for i in range(n)]
    names = [e.strip() for e in env.split(",")][:n]
    return names + [str(i) for i in range(len(names), n)]  # a count faked in tests


def _device_lock(lock_dir: Path, gpu: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-{gpu}")
    return lock_dir / f"device-{name}.lock"


def _try_lock(path: Path, mode: int) -> Optional[int]:
    """An fd holding `mode` (LOCK_EX / LOCK_SH) on `path`, or None if another holder conflicts."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fds: Sequence[int]) -> None:
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _try_all(paths: Sequence[Path], modes: Sequence[int]) -> Optional[List[int]]:
    """fds holding every lock, or None (and nothing held) if any one is taken."""
    fds: List[int] = []
    for path, mode in zip(paths, modes):
        fd = _try_lock(path, mode)
        if fd is None:
            _release(fds)
            return None
        fds.append(fd)
    return fds


@contextlib.contextmanager
def gpu_slot(n_slots: int, lock_dir: Path, poll_s: float = 0.5,
             n_gpus: Optional[int] = None) -> Iterator[int]:
    """Hold the first free seat of `n_slots` for the body; yields its number.

    n_gpus: the visible GPU count; then seat s also holds GPU s mod n_gpus's device lock shared,
    and a seat whose GPU a K-GPU group holds counts as taken."""
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus(n_gpus) if n_gpus else None
    while True:
        for slot in range(n_slots):
            paths, modes = [lock_dir / f"gpu{slot}.lock"], [fcntl.LOCK_EX]
            if gpus:
                paths.append(_device_lock(lock_dir, gpus[slot % len(gpus)]))
                modes.append(fcntl.LOCK_SH)
            fds = _try_all(paths, modes)
            if fds is None:
                continue
            try:
                yield slot
            finally:
                _release(fds)
            return
        time.sleep(poll_s)


@dataclass
class GpuGroup:
    """K GPUs held exclusively: their visible indices, their CUDA_VISIBLE_DEVICES value for a
    child process, and the fds of the locks (a child given them with `pass_fds` keeps the GPUs
    locked should this process die before it)."""

    indices: List[int]
    cuda_visible_devices: str
    fds: List[int] = field(default_factory=list)


def try_gpu_group(k: int, n_gpus: int, lock_dir: Path) -> Optional[GpuGroup]:
    """The first free group of k consecutive GPUs out of n_gpus, locked; None if all are busy.
    The caller releases it with release_group."""
    if k < 1 or n_gpus % k:
        raise ValueError(f"a group of {k} GPUs must divide the {n_gpus} visible GPUs")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus(n_gpus)
    for first in range(0, n_gpus, k):
        members = list(range(first, first + k))
        fds = _try_all([_device_lock(lock_dir, gpus[i]) for i in members], [fcntl.LOCK_EX] * k)
        if fds is not None:
            return GpuGroup(members, ",".join(gpus[i] for i in members), fds)
    return None


def release_group(group: GpuGroup) -> None:
    _release(group.fds)
    group.fds = []


@contextlib.contextmanager
def gpu_group(k: int, n_gpus: int, lock_dir: Path, poll_s: float = 0.5) -> Iterator[GpuGroup]:
    """Hold a free group of k GPUs for the body (waiting, polling every poll_s, while none is)."""
    while True:
        group = try_gpu_group(k, n_gpus, lock_dir)
        if group is not None:
            break
        time.sleep(poll_s)
    try:
        yield group
    finally:
        release_group(group)
