"""Tokenize a document source once into a packed, memory-mapped token stream on disk.

Every document is encoded and followed by the tokenizer's EOS, and all of them are
concatenated into one flat stream (GPT-2 style packing: no padding, documents cross sequence
boundaries, EOS tells the model where one ends). The stream is stored as a raw little-endian
numpy array (``uint16`` when the vocabulary fits, else ``uint32``: half the disk and page cache
for the usual small vocabularies) and opened with :class:`numpy.memmap`, so a 68 M-token
corpus costs no RAM and a second run starts in well under a second.

Cache layout (under ``cache_dir/tokens/``)::

    <split>-<key>.bin    the tokens
    <split>-<key>.json   sidecar: n_tokens, n_docs, dtype, eos_id, source, tokenizer, ...

``key`` hashes the source identity (file paths+sizes+mtimes, or the embedded asset's content
hash, or the hub dataset/config/split/data_files), ``max_docs``, the token cap, the tokenizer
fingerprint and the split, so any change to any of them gets a fresh stream. Writing is
crash- and race-safe: tokens stream into a temp file in the same directory that is renamed
into place, and the sidecar is renamed in last; a reader only trusts a ``.bin`` whose sidecar
exists and whose size matches it. Two processes building the same key concurrently just
produce identical files, the last rename wins.

Encoding is streamed in chunks (a few thousand documents / a few MB of text at a time) through
the tokenizer's Rust ``encode_batch`` (parallel over cores), and each chunk is appended to the
temp file immediately, so memory stays flat no matter how large the corpus is.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..rundir import atomic_save

log = logging.getLogger("fp4_experiments.data")

PACK_VERSION = 1               # bump when the on-disk layout or packing rule changes
CHUNK_DOCS = 4096              # documents per encode_batch call ...
CHUNK_CHARS = 4_000_000        # ... or fewer if they hold this much text (~1 M tokens: bounded memory)


@dataclass
class PackedTokens:
    """A packed token stream on disk and its sidecar metadata."""

    path: Path
    tokens: np.memmap
    meta: dict

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 below 65536, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def cache_key(source, tokenizer, max_tokens: Optional[int]) -> str:
    ident = {"source": source.identity, "max_docs": source.max_docs, "split": source.split,
             "max_tokens": max_tokens, "tokenizer": tokenizer.fingerprint,
             "eos_id": tokenizer.eos_id, "version": PACK_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _chunks(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for t in texts:
        chunk.append(t)
        chars += len(t)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _pack_chunk(ids_lists: list[list[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """doc0 EOS doc1 EOS ... as one array (np.fromiter avoids a Python list of all ids)."""
    n = sum(len(ids) for ids in ids_lists) + len(ids_lists)
    flat = itertools.chain.from_iterable(itertools.chain(ids, (eos_id,)) for ids in ids_lists)
    return np.fromiter(flat, dtype=dtype, count=n)


def load_packed(bin_path: Path) -> Optional[PackedTokens]:
    """The cached stream at ``bin_path`` if it and its sidecar are complete, else None."""
    meta_path = bin_path.with_suffix(".json")
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # written little-endian
        n_tokens = int(meta["n_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        log.warning("token cache sidecar %s is unreadable (%s: %s); rebuilding", meta_path,
                    type(err).__name__, err)
        return None
    if bin_path.stat().st_size != n_tokens * dtype.itemsize:
        log.warning("token cache %s is truncated (size does not match its sidecar); rebuilding",
                    bin_path)
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    return PackedTokens(bin_path, tokens, meta)


def pack_documents(source, tokenizer, cache_dir, max_tokens: Optional[int] = None,
                   chunk_docs: int = CHUNK_DOCS, chunk_chars: int = CHUNK_CHARS) -> PackedTokens:
    """Tokenize ``source`` into ``cache_dir/tokens/`` (or load it from there).

    ``max_tokens``: stop reading documents once the stream holds at least this many tokens
    (used for validation so that a huge or streamed split is not tokenized in full); the
    sidecar's ``exhausted`` says whether the source ran out first.
    """
    key = cache_key(source, tokenizer, max_tokens)
    out_dir = Path(cache_dir) / "tokens"
    bin_path = out_dir / f"{source.split}-{key}.bin"
    cached = load_packed(bin_path)
    if cached is not None:
        log.info("token cache hit: %s split from %s: %d tokens, %d docs (%s)", source.split,
                 source.location, cached.n_tokens, cached.n_docs, bin_path)
        return cached

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    log.info("tokenizing %s split from %s with %s -> %s", source.split, source.location,
             tokenizer.name, bin_path)
    t0 = time.perf_counter()
    if max_tokens is not None:  # small chunks: read little past the cap (e.g. from the hub)
        chunk_docs = min(chunk_docs, 256)
    counts = {"tokens": 0, "docs": 0, "exhausted": True}

    def write_tokens(f) -> None:
        for texts in _chunks(source.iter_texts(), chunk_docs, chunk_chars):
            arr = _pack_chunk(tokenizer.encode_batch(texts), tokenizer.eos_id, dtype)
            arr.astype("<" + dtype.str[1:], copy=False).tofile(f)  # fixed little-endian
            counts["tokens"] += arr.size
            counts["docs"] += len(texts)
            if max_tokens is not None and counts["tokens"] >= max_tokens:
                counts["exhausted"] = False
                break
        if counts["docs"] == 0:
            raise ValueError(f"the {source.split} source {source.location!r} yielded no documents")

    # The shared cache is read by colleagues: the one atomic writer keeps the umask's mode.
    atomic_save(bin_path, write_tokens)
    n_tokens, n_docs, exhausted = counts["tokens"], counts["docs"], counts["exhausted"]
    elapsed = time.perf_counter() - t0
    meta = {"version": PACK_VERSION, "key": key, "split": source.split, "n_tokens": n_tokens,
            "n_docs": n_docs, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
            "max_tokens": max_tokens, "exhausted": exhausted, "source": source.describe(),
            "tokenizer": tokenizer.describe(), "build_s": round(elapsed, 3)}
    meta_path = bin_path.with_suffix(".json")
    atomic_save(meta_path, lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))
    log.info("packed %s split: %d docs -> %d tokens in %.1fs (%.2f M tokens/s)", source.split,
             n_docs, n_tokens, elapsed, n_tokens / max(elapsed, 1e-9) / 1e6)
    packed = load_packed(bin_path)
    assert packed is not None, bin_path  # just written; a failure here is a bug, not bad input
    return packed
