"""Document sources: where the raw text of each split comes from.

A source is resolved from the ``data`` config into a :class:`DocumentSource`, a small frozen
description that knows (a) how to stream its documents as ``str`` and (b) its *identity*: a
JSON-able dict that changes whenever the documents could change (file paths + sizes + mtimes,
content hashes for the embedded asset, hub name/config/split/data_files). The identity is all
the token cache hashes, so a cache hit never needs to read a document.

Sources (``data.name``):

* ``embedded`` (default) - the ~0.8 MB C4 subset shipped in ``fp4_experiments/assets/c4_mini``,
  read through :mod:`importlib.resources` so it works from a wheel, offline.
* ``c4_local`` - a directory in C4's shard layout (``c4-train.*.json.gz`` and
  ``c4-validation.*.json.gz``), e.g. ``/work/shared/data/c4`` or a download of ``allenai/c4``.
* ``c4`` - the Hugging Face hub dataset (``allenai/c4``, config ``en``), streamed with
  :func:`datasets.load_dataset` so nothing is downloaded up front. C4 ``en`` is ~365 M
  documents, so ``max_docs`` should cap the training stream. Pointing ``hub_path="json"`` at
  local ``data_files`` runs the very same code path without a network (the tests do this).
* ``jsonl`` - a glob of JSON-lines files (optionally ``.gz``), one ``{"text": ...}`` per line.

Validation may come from somewhere else than training: ``data.val_path`` (any source) names a
C4-layout directory (its ``c4-validation.*.json.gz`` shards are used) or a JSON-lines glob. That
allows e.g. training on a large jsonl mix while validating on C4's validation shard, so
perplexities stay comparable across training mixes. ``jsonl`` has no split of its own and so
requires ``val_path``. ``max_docs`` caps the training split only; validation is bounded by
``val_tokens`` downstream.

Local files are read directly (gzip + ``json.loads`` per line) rather than through the
``datasets`` "json" builder: it is faster, writes nothing to ``~/.cache`` and gives error
messages with ``file:line``. The hub path must go through ``datasets`` (auth, mirrors,
streaming of remote shards); its builder cache is pointed under our own ``cache_dir``.
"""
from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger("fp4_experiments.data")

SOURCE_NAMES = ("embedded", "c4_local", "c4", "jsonl")
SPLITS = ("train", "validation")
# The datasets builders that read local files: for these hub_name is not a builder config.
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
_ASSET_DIR = "assets/c4_mini"
_ASSET_FILES = {"train": "c4-train.00000-of-00001.json.gz",
                "validation": "c4-validation.00000-of-00001.json.gz"}


class HubUnreachableError(ConnectionError):
    """The Hugging Face hub could not be reached (offline, DNS, firewall, HF_HUB_OFFLINE=1)."""


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """Attribute access that tolerates a missing optional field (dataclass, DictConfig, dict)."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    try:
        value = getattr(cfg, name)
    except (AttributeError, KeyError):  # omegaconf struct mode raises a KeyError subclass
        return default
    return default if value is None else value


def to_plain(obj: Any) -> Any:
    """DictConfig/ListConfig -> dict/list (datasets rejects omegaconf containers)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "items"):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or hasattr(obj, "__iter__"):
        return [to_plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class DocumentSource:
    """One split's documents. ``files`` are local files (Paths or package Traversables)."""

    kind: str
    split: str
    files: tuple = ()
    location: str = ""                      # what the user pointed at (dir, glob, hub id)
    max_docs: Optional[int] = None
    hub: Optional[dict] = None              # load_dataset kwargs for kind == "c4"
    identity: dict = field(default_factory=dict)

    def iter_texts(self, limit: Optional[int] = None) -> Iterator[str]:
        """Yield document texts in a fixed order; at most min(limit, max_docs) of them."""
        caps = [c for c in (limit, self.max_docs) if c is not None]
        cap = min(caps) if caps else None
        if cap is not None and cap <= 0:
            return
        it = self._iter_hub() if self.hub is not None else self._iter_files()
        for n, text in enumerate(it, 1):
            yield text
            if cap is not None and n >= cap:
                return

    def _iter_files(self) -> Iterator[str]:
        for f in self.files:
            yield from iter_jsonl_texts(f)

    def _iter_hub(self) -> Iterator[str]:
        import datasets  # heavy import, only when the hub path is used

        kw = dict(self.hub)
        where = f"{kw['path']}" + (f" (config {kw['name']})" if kw.get("name") else "")
        try:
            ds = datasets.load_dataset(kw.pop("path"), kw.pop("name", None), streaming=True, **kw)
            for i, rec in enumerate(ds):
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{where} split {self.hub['split']!r}: record {i} has no "
                                     f"string 'text' field (keys: {sorted(rec)})")
                yield text
        except Exception as e:  # streaming errors surface lazily, during iteration
            if _is_network_error(e) and self.hub["path"] not in _LOCAL_BUILDERS:
                raise HubUnreachableError(
                    f"cannot reach the Hugging Face hub to stream {where} split "
                    f"{self.hub['split']!r} ({type(e).__name__}: {e}). Offline? Use a local copy "
                    "in C4's shard layout instead: data=c4_local data.path=DIR (a directory with "
                    "c4-train.*.json.gz and c4-validation.*.json.gz), or data=embedded.") from e
            raise

    def describe(self) -> dict:
        d = {"kind": self.kind, "split": self.split, "location": self.location}
        if self.files:
            d["files"] = [str(f) for f in self.files]
        if self.hub is not None:
            d["hub"] = {k: v for k, v in self.hub.items() if k != "cache_dir"}
        if self.max_docs is not None:
            d["max_docs"] = self.max_docs
        return d


def _is_network_error(e: BaseException) -> bool:
    """True for connection/timeout errors from builtins, requests, httpx or huggingface_hub.

    Matched by class name so none of those libraries has to be imported; FileNotFoundError
    (e.g. a misspelt dataset id while online) is deliberately not a network error.
    """
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "Timeout", "TransportError",
                         "OfflineModeIsEnabled", "ConnectTimeout", "ReadTimeout"})


def iter_jsonl_texts(path) -> Iterator[str]:
    """Stream the ``text`` field of a JSON-lines file (``.gz`` decompressed on the fly)."""
    name = str(path)
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw
        for lineno, line in _lines_naming(stream, name):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{name}:{lineno}: not valid JSON ({e})") from None
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{name}:{lineno}: record has no string 'text' field "
                                 f"(found {keys}); every line must be a JSON object with 'text'")
            yield text


def _lines_naming(stream, name: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of `stream`; a truncated or corrupt gzip file fails naming the file."""
    lineno = 0
    try:
        for lineno, line in enumerate(stream, 1):
            yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{name}: not a readable gzip file after line {lineno} "
                         f"({type(e).__name__}: {e})") from None


def _file_identity(paths) -> list[dict]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _c4_shards(directory: str, split: str) -> list[Path]:
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"C4 directory {str(d)!r} does not exist or is not a directory "
                                f"(expected shards named c4-{split}.*.json.gz)")
    pattern = f"c4-{split}.*.json.gz"
    files = sorted(d.glob(pattern))
    if not files:
        present = sorted(p.name for p in d.iterdir())[:10]
        raise FileNotFoundError(f"no C4 {split} shard in {str(d)!r}: nothing matches "
                                f"{str(d / pattern)!r} (directory holds {present})")
    return files


def _glob_files(pattern: str, what: str) -> list[Path]:
    files = sorted(Path(p) for p in _glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"{what}: the glob {pattern!r} matches no file (expected "
                                "JSON-lines files, optionally .gz, with a 'text' field per line)")
    return files


def _local_source(kind: str, spec: str, split: str, max_docs, what: str) -> DocumentSource:
    """A directory means C4 layout; anything else is a JSON-lines glob."""
    if os.path.isdir(os.path.expanduser(spec)):
        files, kind = _c4_shards(spec, split), "c4_local"
    elif kind == "c4_local":
        files = _c4_shards(spec, split)  # raises the "not a directory" error
    else:
        files = _glob_files(spec, what)
    return DocumentSource(kind=kind, split=split, files=tuple(files), location=str(spec),
                          max_docs=max_docs, identity={"kind": kind, "split": split,
                                                       "files": _file_identity(files)})


def _embedded_source(split: str, max_docs) -> DocumentSource:
    # Anchored on this subpackage (then its parent folder) rather than on the top-level name:
    # that stays right even when another distribution claims the name "fp4_experiments".
    pkg = importlib.resources.files(__name__.rpartition(".")[0])
    f = pkg.parent.joinpath(*_ASSET_DIR.split("/"), _ASSET_FILES[split])
    if not f.is_file():
        raise FileNotFoundError(f"embedded dataset file {f} is missing from the package; "
                                "regenerate it with python -m fp4_experiments.data.make_embedded")
    # Content hash, not path/mtime: a reinstall or a moved checkout keeps the same cache key.
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    return DocumentSource(kind="embedded", split=split, files=(f,), location=f"{_ASSET_DIR}",
                          max_docs=max_docs, identity={"kind": "embedded", "split": split,
                                                       "file": _ASSET_FILES[split],
                                                       "sha256": digest})


def _hub_source(data_cfg, split: str, max_docs, cache_dir) -> DocumentSource:
    path = cfg_get(data_cfg, "hub_path", "allenai/c4")
    name = None if path in _LOCAL_BUILDERS else cfg_get(data_cfg, "hub_name", "en")
    hub_split = split if split == "train" else cfg_get(data_cfg, "val_split_name", "validation")
    data_files = to_plain(cfg_get(data_cfg, "data_files"))
    hub = {"path": path, "name": name, "split": hub_split, "data_files": data_files}
    ident = dict(hub, kind="c4")
    if data_files:  # local data_files: let edits to those files invalidate the cache
        flat = data_files.values() if isinstance(data_files, dict) else [data_files]
        locals_ = sorted({p for v in flat for p in ([v] if isinstance(v, str) else v)
                          if os.path.isfile(p)})
        ident["local_files"] = _file_identity(locals_)
    if cache_dir is not None:
        hub["cache_dir"] = str(Path(cache_dir) / "hf_datasets")  # never ~/.cache by default
    loc = f"hf://{path}" + (f"/{name}" if name else "")
    return DocumentSource(kind="c4", split=split, location=loc, max_docs=max_docs, hub=hub,
                          identity=ident)


def resolve_source(data_cfg, split: str, cache_dir=None) -> DocumentSource:
    """The :class:`DocumentSource` for ``split`` ("train" | "validation") of ``data_cfg``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {list(SPLITS)}")
    name = cfg_get(data_cfg, "name", "embedded")
    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown data.name {name!r}; valid choices: {list(SOURCE_NAMES)}")
    max_docs = cfg_get(data_cfg, "max_docs") if split == "train" else None
    if max_docs is not None and int(max_docs) <= 0:
        raise ValueError(f"data.max_docs must be a positive integer or null, got {max_docs!r}")
    max_docs = None if max_docs is None else int(max_docs)
    path = cfg_get(data_cfg, "path")
    val_path = cfg_get(data_cfg, "val_path")

    if split == "validation" and val_path:
        return _local_source("jsonl", str(val_path), split, None, "data.val_path")
    if name == "embedded":
        return _embedded_source(split, max_docs)
    if name == "c4":
        return _hub_source(data_cfg, split, max_docs, cache_dir)
    if not path:
        example = "DIR (with c4-train.*.json.gz)" if name == "c4_local" else "'DIR/*.jsonl.gz'"
        raise ValueError(f"data={name} needs data.path, e.g. data.path={example}")
    if name == "c4_local":
        return _local_source("c4_local", str(path), split, max_docs, "data.path")
    if split == "validation":  # jsonl files have no split to take validation from
        raise ValueError("data=jsonl needs data.val_path for validation: a C4-layout directory "
                         "(its c4-validation.*.json.gz shards, e.g. data.val_path=/path/to/c4) "
                         "or a JSON-lines glob")
    return _local_source("jsonl", str(path), split, max_docs, "data.path")
