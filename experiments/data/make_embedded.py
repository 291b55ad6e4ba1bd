"""Regenerate the embedded default dataset ``experiments/assets/c4_mini/``.

The package ships a tiny slice of real C4 English so that ``data=embedded`` (the default)
trains and evaluates with no network and no user-supplied files. The slice is cut from the
local C4 sample in ``/work/shared/data/c4`` (itself real C4 ``en`` documents; see its
SOURCES.md for provenance):

* ``c4-train.00000-of-00001.json.gz``      = the first ``--train-docs`` (800) lines of that
  folder's ``c4-train.00000-of-00001.json.gz``;
* ``c4-validation.00000-of-00001.json.gz`` = the first ``--val-docs`` (100) lines of its
  ``c4-validation.00000-of-00001.json.gz``.

Lines are copied byte for byte (no JSON re-encoding), so every document keeps C4's own
``text``/``timestamp``/``url`` record exactly as in the source. The output is written with
gzip level 9, ``mtime=0`` and an empty embedded file name, so rerunning the script on the
same input produces byte-identical files (their SHA-256 is printed and recorded in
SOURCES.md). The licence/attribution notes in SOURCES.md are written by this script too, so
the asset can never lose them.

Usage::

    python -m fp4_experiments.data.make_embedded [--src /work/shared/data/c4] [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from pathlib import Path

DEFAULT_SRC = Path("/work/shared/data/c4")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "c4_mini"
SHARDS = {
    "train": "c4-train.00000-of-00001.json.gz",
    "validation": "c4-validation.00000-of-00001.json.gz",
}


def _first_lines(path: Path, n: int) -> list[bytes]:
    """The first ``n`` non-empty lines of a gzip JSON-lines file, raw bytes with newline."""
    lines: list[bytes] = []
    with gzip.open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            json.loads(line)["text"]  # fail loudly on a broken record rather than ship it
            lines.append(line if line.endswith(b"\n") else line + b"\n")
            if len(lines) == n:
                break
    if len(lines) < n:
        raise ValueError(f"{path} has only {len(lines)} documents, {n} requested")
    return lines


def _write_gzip(path: Path, lines: list[bytes]) -> bytes:
    """Deterministic gzip: fixed level, mtime=0 and no file name in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.writelines(lines)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


SOURCES_TEMPLATE = """\
# c4_mini: the embedded default dataset

A tiny, deterministic subset of **real C4 English** (`allenai/c4`, config `en`) shipped inside
the package so that `data=embedded` works offline with nothing to download. It is meant for
smoke tests, the demo and CI, not for meaningful perplexity numbers.

## Licence and attribution

C4 is released by AllenAI under the **ODC-BY 1.0** licence (Open Data Commons Attribution
License). The underlying text comes from **Common Crawl** and is also subject to the
**Common Crawl Terms of Use**. Attribution: *AllenAI (allenai/c4) / Common Crawl; C4 was
introduced in Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer" (T5), JMLR 21(140).*

## Files

Same layout as C4's own shards: gzip-compressed JSON lines, one document per line, keys
`text`, `timestamp`, `url` (some documents carry only `text`).

| file | docs | text chars | gzip bytes | sha256 |
| --- | ---: | ---: | ---: | --- |
{rows}

## How the subset was cut

Source: the local C4 sample `{src}` (real C4 `en` documents collected from public
repositories; its own SOURCES.md lists every origin, commit and check). Note that its
train/validation split is that sample's split (a seeded shuffle), not C4's original one.

- `{train}`: the first {n_train} lines of `{src}/{train}`.
- `{val}`: the first {n_val} lines of `{src}/{val}`.

Lines were copied byte for byte (no re-encoding of the JSON). The gzip files were written at
level 9 with `mtime=0` and an empty header file name, so they are reproducible:

    python -m fp4_experiments.data.make_embedded --src {src} \\
        --train-docs {n_train} --val-docs {n_val}

regenerates byte-identical files (compare the sha256 column).
"""


def build(src: Path, out: Path, train_docs: int, val_docs: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", train_docs), ("validation", val_docs)):
        name = SHARDS[split]
        lines = _first_lines(src / name, n)
        data = _write_gzip(out / name, lines)
        chars = sum(len(json.loads(line)["text"]) for line in lines)
        rows.append({"file": name, "docs": len(lines), "chars": chars, "gzip_bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
    table = "\n".join(f"| `{r['file']}` | {r['docs']:,} | {r['chars']:,} | {r['gzip_bytes']:,} "
                      f"| `{r['sha256']}` |" for r in rows)
    (out / "SOURCES.md").write_text(SOURCES_TEMPLATE.format(
        rows=table, src=src, train=SHARDS["train"], val=SHARDS["validation"],
        n_train=train_docs, n_val=val_docs), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder with C4 shards")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="asset folder to (re)write")
    ap.add_argument("--train-docs", type=int, default=800)
    ap.add_argument("--val-docs", type=int, default=100)
    args = ap.parse_args(argv)
    for r in build(args.src, args.out, args.train_docs, args.val_docs):
        print(f"{r['file']}: {r['docs']} docs, {r['chars']} chars, {r['gzip_bytes']} bytes, "
              f"sha256 {r['sha256']}")


if __name__ == "__main__":
    main()
