"""Deterministic, exactly resumable training batches from a packed token stream.

The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (window ``i`` is
``tokens[i*(seq_len+1) : (i+1)*(seq_len+1)]``; a tail shorter than a window is never used).
A window gives one training row: ``input_ids = w[:-1]``, ``labels = w[1:]``.

Order: epoch ``e`` visits every window exactly once, in the permutation drawn from
``numpy.random.default_rng([seed, e])``. A batch takes the next ``batch_size`` windows of that
order; when an epoch runs out mid-batch the batch is completed from the next epoch's fresh
permutation, so every batch is full and no window is skipped. Because the permutation is a
pure function of (seed, epoch), the loader's whole state is the pair (epoch, position in the
epoch): :meth:`TrainLoader.state_dict` saves just that (plus sanity fields), and
:meth:`TrainLoader.load_state_dict` continues with exactly the batches the uninterrupted run
would have produced. The order does not depend on ``batch_size``, so a resume may even change
it. Runs with different seeds see the same data in different orders; the model-init seed is
the training loop's business.

Small corpora get repeated: :attr:`TrainLoader.epoch` (fractional) is what a run should log,
and past 4 epochs a warning is emitted once, because repeated data stops being nearly as good
as fresh data beyond ~4 epochs (Muennighoff et al., 2023, "Scaling Data-Constrained Language
Models"), which would confound an FP8-vs-FP4 token-cost comparison.

Batches are int64 CPU tensors (what ``nn.Embedding`` and ``cross_entropy`` want); moving them
to the GPU is left to the training loop.
"""
from __future__ import annotations

import logging
import warnings
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger("fp4_experiments.data")

EPOCH_WARNING_THRESHOLD = 4
STATE_VERSION = 1


class TrainLoader:
    """Infinite iterator of ``(input_ids, labels)`` int64 batches, shape [batch, seq_len].

    With ``world_size`` N > 1 (data parallelism, experiments/distributed.py) every rank walks
    the same order, ``batch_size`` (the per-rank micro-batch m) x N windows per call, and keeps
    chunk ``rank`` of them: rank r's c-th micro-batch of a step is the (c * N + r)-th micro-batch
    the one-process loader with batch size m would give. So the ranks read disjoint slices that
    together are the one-process global batch, grouped into the same m-row micro-batches, and the
    position (epoch, pos) is the same on every rank and the one-process loader's at every step
    boundary: a checkpoint's loader state resumes on any number of ranks."""

    def __init__(self, tokens_memmap, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if int(seq_len) < 1 or int(batch_size) < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len!r}, "
                             f"batch_size={batch_size!r}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.tokens = tokens_memmap
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.window = self.seq_len + 1
        self.n_windows = len(tokens_memmap) // self.window
        if self.n_windows == 0:
            raise ValueError(f"the training stream has {len(tokens_memmap)} tokens, fewer than one "
                             f"window of seq_len+1={self.window}; use more data or a shorter seq_len")
        self._epoch = 0          # completed epochs
        self._pos = 0            # windows already consumed in the current epoch
        self._perm = None        # permutation of the current epoch (cached)
        self._perm_epoch = -1
        self._warned = False

    # -- order -------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _next_indices(self) -> np.ndarray:
        parts, need = [], self.batch_size * self.world_size
        while need:
            if self._pos == self.n_windows:  # epoch exhausted: the next one is reshuffled
                self._epoch += 1
                self._pos = 0
            take = min(need, self.n_windows - self._pos)
            parts.append(self._permutation(self._epoch)[self._pos:self._pos + take])
            self._pos += take
            need -= take
        idx = np.concatenate(parts)
        if self.world_size > 1:
            idx = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return idx

    def _maybe_warn(self) -> None:
        if self._warned or self.epoch <= EPOCH_WARNING_THRESHOLD:
            return
        self._warned = True
        msg = (f"training data is being repeated for more than {EPOCH_WARNING_THRESHOLD} epochs "
               f"(now at epoch {self.epoch:.2f} of a {self.n_windows * self.window}-token stream): "
               "repeated data stops being nearly as good as fresh data beyond ~4 epochs; use "
               "more data or fewer tokens")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- batches -----------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        # One contiguous slice per window straight from the memmap; fancy-indexing a 2-D view
        # would do the same, but this never materializes more than the batch.
        rows = np.stack([self.tokens[i * self.window:(i + 1) * self.window] for i in idx])
        batch = torch.from_numpy(rows.astype(np.int64))
        self._maybe_warn()
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    @property
    def epoch(self) -> float:
        """Epochs of the training stream consumed so far, fractional (1.5 = one and a half)."""
        return self._epoch + self._pos / self.n_windows

    @property
    def tokens_per_epoch(self) -> int:
        """Predicted tokens per epoch (seq_len per window)."""
        return self.n_windows * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.n_windows / (self.batch_size * self.world_size)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self._epoch,
                "pos": self._pos, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "n_tokens": int(len(self.tokens)), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was saved; refuses a different stream or seed."""
        for k in ("seed", "seq_len", "n_windows"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"loader state does not match this loader: {k}={state[k]} in the state, "
                    f"{getattr(self, k)} here (the data, seq_len or seed changed since the "
                    "checkpoint; resuming would not reproduce the run)")
        if not 0 <= int(state["pos"]) <= self.n_windows:
            raise ValueError(f"loader state pos={state['pos']} outside [0, {self.n_windows}]")
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])
        self._warned = False
        self._maybe_warn()

    def __repr__(self) -> str:
        return (f"TrainLoader(n_windows={self.n_windows}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, seed={self.seed}, epoch={self.epoch:.3f})")
