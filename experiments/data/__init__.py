"""Data layer of fp4-ablate: documents -> tokenizer -> packed token streams -> batches.

The training loop needs exactly two things from here::

    bundle = prepare_data(cfg.data, cfg.tokenizer, seq_len, cache_dir)
    loader = TrainLoader(bundle.train_tokens, seq_len, batch_size, seed)
    ... model(bundle.val[:, :-1]) vs bundle.val[:, 1:] for evaluation ...

:func:`prepare_data` resolves the train and validation document sources (:mod:`.sources`),
builds or loads the tokenizer (:mod:`.tokenizer`), and tokenizes both splits into cached,
memory-mapped token streams (:mod:`.packing`). Everything expensive is cached on disk under
``cache_dir`` keyed by content identity, so the second call for the same data returns in about
a second and every run of a sweep tokenizes identically.

Validation is a fixed slice: the first ``val_tokens`` tokens of the validation stream cut into
``n_seq = val_tokens // (seq_len + 1)`` rows of ``seq_len + 1`` tokens (same windows as the
training loader). It does not depend on the seed, the batch size or the number of steps, so
every run of an ablation is scored on identical tokens and perplexities are comparable.
Set ``val_tokens`` to a multiple of ``seq_len + 1`` to use exactly that many tokens.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .loader import TrainLoader
from .packing import PackedTokens, pack_documents, token_dtype
from .sources import (SOURCE_NAMES, DocumentSource, HubUnreachableError, cfg_get,
                      resolve_source)
from .tokenizer import TOKENIZER_NAMES, TextTokenizer, build_tokenizer

log = logging.getLogger("fp4_experiments.data")

__all__ = ["prepare_data", "DataBundle", "TrainLoader", "TextTokenizer", "DocumentSource",
           "HubUnreachableError", "resolve_source", "build_tokenizer", "pack_documents",
           "token_dtype", "default_cache_dir", "SOURCE_NAMES", "TOKENIZER_NAMES"]


def default_cache_dir() -> Path:
    """``$FP4_ABLATE_CACHE`` or ``~/.cache/fp4_ablate``: tokenizers and token streams."""
    return Path(os.environ.get("FP4_ABLATE_CACHE", "~/.cache/fp4_ablate")).expanduser()


@dataclass
class DataBundle:
    """What the training loop consumes. ``val`` is int64 [n_seq, seq_len + 1]."""

    tokenizer: TextTokenizer
    train_tokens: np.memmap
    val: torch.Tensor
    seq_len: int
    train: PackedTokens
    validation: PackedTokens
    train_source: DocumentSource
    val_source: DocumentSource
    cache_dir: Path
    prepare_s: float = 0.0

    @property
    def n_train_tokens(self) -> int:
        return int(len(self.train_tokens))

    @property
    def n_val_tokens(self) -> int:
        return int(self.val.numel())

    def describe(self) -> dict:
        """JSON-able summary recorded with every run."""
        return {
            "train": {"source": self.train_source.describe(), "n_docs": self.train.n_docs,
                      "n_tokens": self.n_train_tokens, "cache": str(self.train.path)},
            "validation": {"source": self.val_source.describe(),
                           "n_docs": self.validation.n_docs,
                           "stream_tokens": self.validation.n_tokens,
                           "n_seq": int(self.val.shape[0]), "seq_len": self.seq_len},
            "n_train_tokens": self.n_train_tokens,
            "n_val_tokens": self.n_val_tokens,
            "tokenizer": self.tokenizer.describe(),
            "token_dtype": str(self.train_tokens.dtype),
            "cache_dir": str(self.cache_dir),
            "val_cache": str(self.validation.path),
        }


def _validation_rows(packed: PackedTokens, val_tokens: int, seq_len: int,
                     source: DocumentSource) -> torch.Tensor:
    window = seq_len + 1
    n_seq = val_tokens // window
    if n_seq == 0:
        raise ValueError(f"data.val_tokens={val_tokens} is less than one validation row of "
                         f"seq_len+1={window} tokens; use at least {window}")
    if packed.n_tokens < val_tokens:
        raise ValueError(
            f"the validation split from {source.location!r} has only {packed.n_tokens} tokens "
            f"({packed.n_docs} documents), fewer than data.val_tokens={val_tokens}; lower "
            f"data.val_tokens to at most {packed.n_tokens // window * window} or point "
            "data.val_path at a larger validation set")
    if n_seq * window != val_tokens:
        log.info("val_tokens=%d is not a multiple of seq_len+1=%d: using the first %d tokens "
                 "(%d rows)", val_tokens, window, n_seq * window, n_seq)
    rows = np.asarray(packed.tokens[:n_seq * window], dtype=np.int64).reshape(n_seq, window)
    return torch.from_numpy(rows)


def prepare_data(data_cfg, tokenizer_cfg, seq_len: int, cache_dir=None) -> DataBundle:
    """Resolve sources, build the tokenizer, pack (or load cached) train and validation tokens.

    ``data_cfg`` fields: name, path, val_path, val_tokens, max_docs, hub_path, hub_name,
    data_files, val_split_name. ``tokenizer_cfg`` fields: name, vocab_size, path, train_docs.
    ``cache_dir`` None means :func:`default_cache_dir`.
    """
    t0 = time.perf_counter()
    name = cfg_get(data_cfg, "name", "embedded")
    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown data.name {name!r}; valid choices: {list(SOURCE_NAMES)}")
    tok_name = cfg_get(tokenizer_cfg, "name", "bpe")
    if tok_name not in TOKENIZER_NAMES:
        raise ValueError(f"unknown tokenizer.name {tok_name!r}; valid choices: "
                         f"{list(TOKENIZER_NAMES)}")
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    val_tokens = cfg_get(data_cfg, "val_tokens")
    if val_tokens is None or int(val_tokens) <= 0:
        raise ValueError(f"data.val_tokens must be a positive integer, got {val_tokens!r}")
    val_tokens = int(val_tokens)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    train_src = resolve_source(data_cfg, "train", cache_dir)
    val_src = resolve_source(data_cfg, "validation", cache_dir)
    log.info("data: train from %s (%s), validation from %s (%s)", train_src.location,
             train_src.kind, val_src.location, val_src.kind)
    tokenizer = build_tokenizer(tokenizer_cfg, train_src, cache_dir)
    train = pack_documents(train_src, tokenizer, cache_dir)
    # Only as much validation text as val_tokens needs is tokenized (matters for the hub).
    validation = pack_documents(val_src, tokenizer, cache_dir, max_tokens=val_tokens)
    val = _validation_rows(validation, val_tokens, seq_len, val_src)

    bundle = DataBundle(tokenizer=tokenizer, train_tokens=train.tokens, val=val, seq_len=seq_len,
                        train=train, validation=validation, train_source=train_src,
                        val_source=val_src, cache_dir=cache_dir,
                        prepare_s=round(time.perf_counter() - t0, 3))
    log.info("data ready in %.2fs: %d train tokens (%d docs), validation %d x %d tokens, "
             "tokenizer %s (vocab %d)", bundle.prepare_s, bundle.n_train_tokens, train.n_docs,
             val.shape[0], val.shape[1], tokenizer.name, tokenizer.vocab_size)
    return bundle
