"""Tokenizers that never touch the network at run time.

Two kinds (``tokenizer.name``):

* ``bpe`` (default) - a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer with its regex,
  all 256 byte symbols in the initial alphabet so any text encodes, ``<|endoftext|>`` as the
  single special token and EOS) trained with the ``tokenizers`` library on the first
  ``train_docs`` training documents (and at most ``TRAIN_CHAR_CAP`` characters, so training
  stays a matter of seconds even when ``train_docs`` is set high). Scaled-down models want a
  small vocabulary (the embedding is a large share of their parameters), and training our own
  avoids shipping or downloading one. The result is cached under
  ``cache_dir/tokenizers/`` keyed by (training-data fingerprint, vocab size, algorithm
  version): the fingerprint is the training source's identity (paths+sizes+mtimes or content
  hash, see :mod:`.sources`) plus the number of documents used, so a cache hit reads no text.
* ``pretrained`` - any local tokenizer: a ``tokenizer.json`` file (loaded with ``tokenizers``)
  or a Hugging Face tokenizer directory (``transformers.AutoTokenizer.from_pretrained(path,
  local_files_only=True)``), e.g. the Llama 3.1 tokenizer where the user has a copy.

Both are wrapped in :class:`TextTokenizer`, which exposes only what the data layer needs:
``vocab_size``, ``eos_id``, ``encode_batch`` (Rust-parallel batch encoding, no special tokens
added: documents are joined with EOS by the packer, BOS is not used), ``fingerprint`` (hash of
the tokenizer's files, part of every token-cache key) and ``name``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

log = logging.getLogger("fp4_experiments.data")

TOKENIZER_NAMES = ("bpe", "pretrained")
EOS_TOKEN = "<|endoftext|>"
BPE_ALGO_VERSION = 1          # bump when the BPE recipe below changes: old caches are ignored
TRAIN_CHAR_CAP = 32_000_000   # ~8 M tokens of text: plenty for an 8k-32k vocab, ~1 min at most
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class TextTokenizer:
    """Minimal tokenizer interface used by the packer and recorded in run metadata."""

    def __init__(self, backend, name: str, fingerprint: str, eos_id: Optional[int] = None,
                 hf_tokenizer: Any = None):
        self._backend = backend       # tokenizers.Tokenizer, or None for a slow HF tokenizer
        self._hf = hf_tokenizer
        self.name = name
        self.fingerprint = fingerprint
        if backend is not None:
            # A tokenizer.json may carry truncation/padding settings; packing wants neither.
            backend.no_truncation()
            backend.no_padding()
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        else:
            self.vocab_size = len(hf_tokenizer)
        self.eos_id = eos_id if eos_id is not None else self._find_eos()

    def _find_eos(self) -> int:
        if self._hf is not None and self._hf.eos_token_id is not None:
            return int(self._hf.eos_token_id)
        for tok in _EOS_CANDIDATES:
            tid = (self._backend.token_to_id(tok) if self._backend is not None
                   else self._hf.convert_tokens_to_ids(tok))
            if tid is not None and tid >= 0:
                return int(tid)
        raise ValueError(f"tokenizer {self.name!r} has no EOS token (looked for the HF "
                         f"eos_token and for {list(_EOS_CANDIDATES)}); documents cannot be joined")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (the packer adds EOS between documents)."""
        texts = list(texts)
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self._hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=False)
        return self._hf.decode(list(ids))

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return (f"TextTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, fingerprint={self.fingerprint!r})")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    # The shared token cache is read by colleagues: the one atomic writer keeps the umask's mode.
    from ..rundir import atomic_write_text
    atomic_write_text(path, text)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with ``<|endoftext|>`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _capped(texts: Iterable[str], char_cap: int, stats: dict) -> Iterable[str]:
    """Pass texts through until ``char_cap`` characters; count docs/chars into ``stats``."""
    for t in texts:
        if stats["chars"] >= char_cap:
            return
        stats["docs"] += 1
        stats["chars"] += len(t)
        yield t


def build_bpe(train_source, vocab_size: int, train_docs: int, cache_dir) -> TextTokenizer:
    """Load the cached BPE for this (data, vocab, version) or train and cache it."""
    from tokenizers import Tokenizer

    if not 258 <= int(vocab_size) < 2**31:
        raise ValueError(f"tokenizer.vocab_size must be >= 258 (256 bytes + EOS + a merge), "
                         f"got {vocab_size!r}")
    if int(train_docs) <= 0:
        raise ValueError(f"tokenizer.train_docs must be a positive integer, got {train_docs!r}")
    n_docs = int(train_docs) if train_source.max_docs is None else min(int(train_docs),
                                                                       train_source.max_docs)
    key_src = {"data": train_source.identity, "train_docs": n_docs, "char_cap": TRAIN_CHAR_CAP,
               "vocab_size": int(vocab_size), "algo": BPE_ALGO_VERSION}
    key = _sha(json.dumps(key_src, sort_keys=True).encode())
    out = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-v{BPE_ALGO_VERSION}-{key}"
    tok_file, meta_file = out / "tokenizer.json", out / "meta.json"
    name = f"bpe{vocab_size}"

    if tok_file.is_file() and meta_file.is_file():
        try:
            text = tok_file.read_text(encoding="utf-8")
            cached = TextTokenizer(Tokenizer.from_str(text), name, _sha(text.encode()),
                                   eos_id=int(json.loads(meta_file.read_text())["eos_id"]))
        except Exception as err:  # a corrupt or cut cache entry is rebuilt, never fatal
            log.warning("tokenizer cache %s is unreadable (%s: %s); rebuilding it", out,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        else:
            log.info("tokenizer cache hit: %s", tok_file)
            return cached

    t0 = time.perf_counter()
    stats = {"docs": 0, "chars": 0}
    tok = train_bpe(_capped(train_source.iter_texts(limit=n_docs), TRAIN_CHAR_CAP, stats),
                    int(vocab_size))
    if stats["docs"] == 0:
        raise ValueError(f"cannot train the BPE tokenizer: the training source "
                         f"{train_source.location!r} yielded no documents")
    text = tok.to_str()
    eos_id = tok.token_to_id(EOS_TOKEN)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        log.warning("BPE reached only %d of the %d requested tokens (too little training text: "
                    "%d docs); the model will use vocab_size=%d", got, vocab_size, stats["docs"], got)
    _atomic_write_text(tok_file, text)
    meta = {"name": name, "vocab_size": got, "requested_vocab_size": int(vocab_size),
            "eos_id": eos_id, "trained_on_docs": stats["docs"], "trained_on_chars": stats["chars"],
            "key": key_src, "train_s": round(time.perf_counter() - t0, 3)}
    _atomic_write_text(meta_file, json.dumps(meta, indent=1, default=str))  # written last
    log.info("trained BPE tokenizer %s on %d docs / %d chars in %.1fs -> %s", name, stats["docs"],
             stats["chars"], meta["train_s"], tok_file)
    return TextTokenizer(Tokenizer.from_str(text), name, _sha(text.encode()), eos_id=eos_id)


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                       "added_tokens.json")


def load_pretrained(path: str) -> TextTokenizer:
    """A local ``tokenizer.json`` file or HF tokenizer directory; never downloads."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        from tokenizers import Tokenizer

        data = p.read_bytes()
        try:
            backend = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"tokenizer.path={str(p)!r} is not a tokenizers JSON file: {e}") from e
        log.info("loaded tokenizer file %s", p)
        return TextTokenizer(backend, f"pretrained:{p.name}", _sha(data))
    if p.is_dir():
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise ValueError(f"tokenizer.path={str(p)!r} is not a loadable Hugging Face tokenizer "
                             f"directory: {type(e).__name__}: {e}") from e
        h = hashlib.sha256()
        for fname in _HF_TOKENIZER_FILES:  # the files that define the ids, in a fixed order
            if (p / fname).is_file():
                h.update(fname.encode() + b"\0" + (p / fname).read_bytes())
        backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
        if backend is not None:  # work on a copy: disabling truncation must not touch `hf`
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
        log.info("loaded Hugging Face tokenizer directory %s (%s)", p, type(hf).__name__)
        eos = hf.eos_token_id
        return TextTokenizer(backend, f"pretrained:{p.name}", h.hexdigest()[:16],
                             eos_id=None if eos is None else int(eos), hf_tokenizer=hf)
    raise FileNotFoundError(f"tokenizer.path={str(p)!r} does not exist (expected a tokenizer.json "
                            "file or a Hugging Face tokenizer directory)")


def build_tokenizer(tokenizer_cfg, train_source, cache_dir) -> TextTokenizer:
    """The tokenizer named by ``tokenizer_cfg`` (BPE trained on ``train_source`` if needed)."""
    from .sources import cfg_get

    name = cfg_get(tokenizer_cfg, "name", "bpe")
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"unknown tokenizer.name {name!r}; valid choices: {list(TOKENIZER_NAMES)}")
    if name == "pretrained":
        path = cfg_get(tokenizer_cfg, "path")
        if not path:
            raise ValueError("tokenizer=pretrained needs tokenizer.path (a tokenizer.json file or "
                             "a Hugging Face tokenizer directory)")
        return load_pretrained(path)
    return build_bpe(train_source, int(cfg_get(tokenizer_cfg, "vocab_size", 8192)),
                     int(cfg_get(tokenizer_cfg, "train_docs", 2000)), cache_dir)
