"""Data layer tests (CPU, offline): sources, tokenizer, packing/cache, validation slice, loader.

Everything runs on real text (the embedded C4 subset or small shards written here) with a
512-token BPE so the whole file takes seconds.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from fp4_experiments.data import (HubUnreachableError, TrainLoader, build_tokenizer,
                                  pack_documents, prepare_data, resolve_source, token_dtype)
from fp4_experiments.data.tokenizer import EOS_TOKEN, load_pretrained

LOGGER = "fp4_experiments.data"


@dataclass
class DataCfg:
    name: str = "embedded"
    path: Optional[str] = None
    val_path: Optional[str] = None
    val_tokens: int = 4 * 65
    max_docs: Optional[int] = None
    hub_path: str = "allenai/c4"
    hub_name: Optional[str] = "en"
    data_files: Optional[dict] = None
    val_split_name: str = "validation"


@dataclass
class TokCfg:
    name: str = "bpe"
    vocab_size: int = 512
    path: Optional[str] = None
    train_docs: int = 200


@pytest.fixture(scope="module")
def real_docs() -> dict:
    """Real C4 documents from the embedded asset, to write test shards with."""
    return {s: list(resolve_source(DataCfg(), s).iter_texts(limit=120 if s == "train" else 40))
            for s in ("train", "validation")}


def write_jsonl(path: Path, texts, gz: bool, extra: bool = True) -> Path:
    lines = "".join(json.dumps({"text": t, "url": f"u{i}"} if extra else {"text": t}) + "\n"
                    for i, t in enumerate(texts))
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(lines.encode())
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_c4_dir(root: Path, train, val, n_train_shards: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(train) // n_train_shards)
    for k in range(n_train_shards):
        write_jsonl(root / f"c4-train.{k:05d}-of-{n_train_shards:05d}.json.gz",
                    train[k * per:(k + 1) * per], gz=True)
    write_jsonl(root / "c4-validation.00000-of-00001.json.gz", val, gz=True)
    return root


# -- sources ----------------------------------------------------------------------------------
def test_embedded_default_loads_offline():
    train = list(resolve_source(DataCfg(), "train").iter_texts())
    val = list(resolve_source(DataCfg(), "validation").iter_texts())
    assert (len(train), len(val)) == (800, 100)
    assert train[0].startswith("Our Expatriate Tax Team helps people")
    assert val[0].startswith("Chelsea Handler Makes Her Next Move")
    src = resolve_source(DataCfg(max_docs=5), "train")
    assert len(list(src.iter_texts())) == 5 and len(src.identity["sha256"]) == 64
    sources_md = Path(str(src.files[0])).parent / "SOURCES.md"
    text = sources_md.read_text()
    assert "ODC-BY 1.0" in text and "Common Crawl" in text and "Raffel" in text


def test_c4_local_shards(tmp_path, real_docs):
    d = write_c4_dir(tmp_path / "c4", real_docs["train"][:30], real_docs["validation"][:7])
    src = resolve_source(DataCfg(name="c4_local", path=str(d)), "train")
    assert [Path(f).name for f in src.files] == ["c4-train.00000-of-00002.json.gz",
                                                 "c4-train.00001-of-00002.json.gz"]
    assert list(src.iter_texts()) == real_docs["train"][:30]
    val = resolve_source(DataCfg(name="c4_local", path=str(d)), "validation")
    assert list(val.iter_texts()) == real_docs["validation"][:7]
    capped = resolve_source(DataCfg(name="c4_local", path=str(d), max_docs=20), "train")
    assert list(capped.iter_texts()) == real_docs["train"][:20]  # crosses the shard boundary

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"c4-train\.\*\.json\.gz") as e:
        resolve_source(DataCfg(name="c4_local", path=str(empty)), "train")
    assert str(empty) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(DataCfg(name="c4_local", path=str(tmp_path / "nope")), "train")
    with pytest.raises(ValueError, match="needs data.path"):
        resolve_source(DataCfg(name="c4_local"), "train")


def test_jsonl_glob_gz_and_plain_with_c4_validation(tmp_path, real_docs):
    t = real_docs["train"]
    write_jsonl(tmp_path / "a.jsonl", t[:5], gz=False, extra=False)
    write_jsonl(tmp_path / "b.jsonl.gz", t[5:12], gz=True)
    c4 = write_c4_dir(tmp_path / "c4", t[12:20], real_docs["validation"][:3], n_train_shards=1)
    cfg = DataCfg(name="jsonl", path=str(tmp_path / "*.jsonl*"), val_path=str(c4))
    assert list(resolve_source(cfg, "train").iter_texts()) == t[:12]
    val = resolve_source(cfg, "validation")  # a directory val_path means C4's validation shard
    assert val.kind == "c4_local" and list(val.iter_texts()) == real_docs["validation"][:3]
    with pytest.raises(ValueError, match="needs data.val_path"):
        resolve_source(DataCfg(name="jsonl", path=cfg.path), "validation")


def test_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"matches no file") as e:
        resolve_source(DataCfg(name="jsonl", path=str(tmp_path / "*.jsonl")), "train")
    assert str(tmp_path / "*.jsonl") in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text here"}\n')
    src = resolve_source(DataCfg(name="jsonl", path=str(bad)), "train")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record has no string 'text' field"):
        list(src.iter_texts())


def test_unknown_names_list_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data.name 'c5'.*'embedded', 'c4_local'"):
        prepare_data(DataCfg(name="c5"), TokCfg(), 64, tmp_path)
    with pytest.raises(ValueError, match=r"unknown tokenizer.name 'gpt2'.*'bpe', 'pretrained'"):
        prepare_data(DataCfg(), TokCfg(name="gpt2"), 64, tmp_path)


def test_c4_hub_code_path_on_local_json(tmp_path, real_docs):
    train = write_jsonl(tmp_path / "tr.json.gz", real_docs["train"][:25], gz=True)
    val = write_jsonl(tmp_path / "va.json.gz", real_docs["validation"][:6], gz=True)
    cfg = DataCfg(name="c4", hub_path="json", max_docs=10,
                  data_files={"train": [str(train)], "validation": [str(val)]})
    src = resolve_source(cfg, "train", tmp_path / "cache")
    assert src.kind == "c4" and src.hub["split"] == "train"
    assert list(src.iter_texts()) == real_docs["train"][:10]
    assert list(resolve_source(cfg, "validation", tmp_path / "cache").iter_texts()) == \
        real_docs["validation"][:6]
    bundle = prepare_data(cfg, TokCfg(train_docs=10), 32, tmp_path / "cache")
    assert bundle.train.n_docs == 10 and bundle.val.shape == (260 // 33, 33)


def test_c4_hub_unreachable_error(monkeypatch, tmp_path):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    src = resolve_source(DataCfg(name="c4", max_docs=100), "train", tmp_path)
    with pytest.raises(HubUnreachableError, match=r"cannot reach the Hugging Face hub") as e:
        next(src.iter_texts())
    assert "data=c4_local data.path=DIR" in str(e.value)


def test_c4_hub_offline_mode_real_datasets(tmp_path):
    """The unpatched datasets call under HF_HUB_OFFLINE=1 (fails fast, no network attempt)."""
    code = ("from types import SimpleNamespace as NS\n"
            "from fp4_experiments.data import resolve_source, HubUnreachableError\n"
            "s = resolve_source(NS(name='c4', max_docs=10), 'train', %r)\n"
            "try:\n    next(s.iter_texts())\nexcept HubUnreachableError as e:\n    print('OK', e)\n"
            % str(tmp_path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith("OK"), out.stderr[-2000:]
    assert "data=c4_local data.path=DIR" in out.stdout


# -- tokenizer --------------------------------------------------------------------------------
def test_bpe_trains_caches_and_roundtrips(tmp_path, caplog):
    src = resolve_source(DataCfg(), "train")
    caplog.set_level(logging.INFO, logger=LOGGER)
    tok = build_tokenizer(TokCfg(), src, tmp_path)
    assert tok.vocab_size == 512 and tok.name == "bpe512"
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    text = "Validation perplexity of FP4 training, naïvely: 3.5 ± 0.1 ✓"
    ids = tok.encode_batch([text, "second"])
    assert tok.decode(ids[0]) == text and tok.eos_id not in ids[0]
    assert "tokenizer cache hit" not in caplog.text
    caplog.clear()
    t0 = time.perf_counter()
    again = build_tokenizer(TokCfg(), src, tmp_path)
    assert time.perf_counter() - t0 < 0.5 and "tokenizer cache hit" in caplog.text
    assert again.fingerprint == tok.fingerprint and again.encode_batch([text]) == ids[:1]
    other = build_tokenizer(TokCfg(vocab_size=600), src, tmp_path)  # new key -> retrained
    assert other.vocab_size == 600 and other.fingerprint != tok.fingerprint
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        build_tokenizer(TokCfg(vocab_size=100), src, tmp_path)


def test_pretrained_tokenizer_file_and_hf_directory(tmp_path):
    tok = build_tokenizer(TokCfg(), resolve_source(DataCfg(), "train"), tmp_path)
    tok_file = next((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    from_file = build_tokenizer(TokCfg(name="pretrained", path=str(tok_file)), None, tmp_path)
    text = ["The quick brown fox jumps over the lazy dog."]
    assert from_file.encode_batch(text) == tok.encode_batch(text)
    assert from_file.eos_id == tok.eos_id and from_file.fingerprint == tok.fingerprint

    from transformers import PreTrainedTokenizerFast

    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOS_TOKEN,
                            bos_token=EOS_TOKEN).save_pretrained(hf_dir)
    from_dir = load_pretrained(str(hf_dir))
    assert from_dir.encode_batch(text) == tok.encode_batch(text)  # no BOS/EOS added
    assert (from_dir.eos_id, from_dir.vocab_size) == (tok.eos_id, 512)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs tokenizer.path"):
        build_tokenizer(TokCfg(name="pretrained"), None, tmp_path)


# -- packing and prepare_data -----------------------------------------------------------------
def test_packing_joins_with_eos(tmp_path, real_docs):
    docs = real_docs["train"][:9]
    path = write_jsonl(tmp_path / "d.jsonl", docs, gz=False)
    src = resolve_source(DataCfg(name="jsonl", path=str(path)), "train")
    tok = build_tokenizer(TokCfg(), resolve_source(DataCfg(), "train"), tmp_path)
    packed = pack_documents(src, tok, tmp_path, chunk_docs=4)  # several chunks appended
    expected = [i for ids in tok.encode_batch(docs) for i in ids + [tok.eos_id]]
    assert packed.tokens.dtype == np.uint16 and packed.tokens.tolist() == expected
    assert (packed.n_docs, packed.n_tokens) == (9, len(expected))
    assert int((packed.tokens == tok.eos_id).sum()) == 9
    assert json.loads(packed.path.with_suffix(".json").read_text())["n_tokens"] == len(expected)
    assert not list((tmp_path / "tokens").glob("*.tmp"))
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_prepare_data_cache_hit_and_describe(tmp_path, real_docs, caplog):
    from omegaconf import OmegaConf

    c4 = write_c4_dir(tmp_path / "c4", real_docs["train"], real_docs["validation"])
    data = OmegaConf.create({"name": "c4_local", "path": str(c4), "val_path": None,
                             "val_tokens": 10 * 65, "max_docs": None, "hub_path": "allenai/c4",
                             "hub_name": "en", "data_files": None,
                             "val_split_name": "validation"})
    tokcfg = OmegaConf.structured(TokCfg())
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = prepare_data(data, tokcfg, 64, tmp_path / "cache")
    assert "token cache hit" not in caplog.text
    caplog.clear()
    t0 = time.perf_counter()
    second = prepare_data(data, tokcfg, 64, tmp_path / "cache")
    assert time.perf_counter() - t0 < 2.0
    assert caplog.text.count("token cache hit") == 2 and "tokenizer cache hit" in caplog.text
    assert np.array_equal(first.train_tokens, second.train_tokens)
    assert isinstance(second.train_tokens, np.memmap) and torch.equal(first.val, second.val)
    d = json.loads(json.dumps(second.describe()))
    assert d["train"]["n_docs"] == 120 and d["n_train_tokens"] == len(first.train_tokens)
    assert d["n_val_tokens"] == 650 and d["tokenizer"]["vocab_size"] == 512
    assert d["train"]["source"]["kind"] == "c4_local" and d["train"]["cache"].endswith(".bin")
    # Changing a shard (size/mtime) invalidates the token cache.
    write_jsonl(c4 / "c4-train.00001-of-00002.json.gz", real_docs["train"][60:90], gz=True)
    third = prepare_data(data, tokcfg, 64, tmp_path / "cache")
    assert third.train.n_docs == 90 and third.train.path != first.train.path


def test_validation_slice_fixed_and_sized(tmp_path):
    seq_len, val_tokens = 32, 6 * 33
    a = prepare_data(DataCfg(val_tokens=val_tokens), TokCfg(), seq_len, tmp_path / "a")
    # Other training data (same tokenizer: max_docs >= train_docs), fresh cache: same slice.
    b = prepare_data(DataCfg(val_tokens=val_tokens, max_docs=300), TokCfg(), seq_len,
                     tmp_path / "b")
    assert b.train.n_docs == 300 and b.tokenizer.fingerprint == a.tokenizer.fingerprint
    assert a.val.shape == (6, 33) and a.val.dtype == torch.int64 and a.n_val_tokens == val_tokens
    # Fixed slice: the first val_tokens tokens of the validation stream, whatever the training
    # data or seed (loaders with different seeds never touch it).
    assert a.val.flatten().tolist() == a.validation.tokens[:val_tokens].tolist()
    assert torch.equal(a.val, b.val)
    odd = prepare_data(DataCfg(val_tokens=val_tokens + 5), TokCfg(), seq_len, tmp_path / "a")
    assert torch.equal(odd.val, a.val)  # the partial row is dropped
    with pytest.raises(ValueError, match=r"has only \d+ tokens \(100 documents\), fewer than "
                                         r"data.val_tokens=10000000"):
        prepare_data(DataCfg(val_tokens=10_000_000), TokCfg(), seq_len, tmp_path / "a")
    with pytest.raises(ValueError, match="less than one validation row"):
        prepare_data(DataCfg(val_tokens=10), TokCfg(), seq_len, tmp_path / "a")


# -- loader -----------------------------------------------------------------------------------
def stream(n_windows: int = 10, seq_len: int = 7) -> np.ndarray:
    return np.arange(n_windows * (seq_len + 1) + 3, dtype=np.uint16)  # +3: unused tail


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_batches_and_determinism():
    x, y = next(TrainLoader(stream(), 7, 4, seed=0))
    assert x.shape == y.shape == (4, 7) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(x[:, 0] % 8 == 0)  # window starts
    a = take(TrainLoader(stream(), 7, 4, seed=1), 6)
    b = take(TrainLoader(stream(), 7, 4, seed=1), 6)
    c = take(TrainLoader(stream(), 7, 4, seed=2), 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_loader_epochs_reshuffle_and_fraction():
    loader = TrainLoader(stream(n_windows=10), 7, 5, seed=3)
    first = torch.cat([next(loader)[0] for _ in range(2)])[:, 0] // 8
    assert loader.epoch == 1.0 and sorted(first.tolist()) == list(range(10))
    second = torch.cat([next(loader)[0] for _ in range(2)])[:, 0] // 8
    assert sorted(second.tolist()) == list(range(10)) and first.tolist() != second.tolist()
    odd = TrainLoader(stream(n_windows=10), 7, 4, seed=3)  # batches straddle epochs
    starts = torch.cat([next(odd)[0] for _ in range(5)])[:, 0] // 8
    assert odd.epoch == 2.0 and sorted(starts[:10].tolist()) == list(range(10))
    assert sorted(starts[10:].tolist()) == list(range(10))
    next(odd)
    assert odd.epoch == pytest.approx(2.4)


def test_loader_exact_resume():
    ref = take(TrainLoader(stream(n_windows=10), 7, 3, seed=5), 12)
    run = TrainLoader(stream(n_windows=10), 7, 3, seed=5)
    take(run, 5)
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON/ckpt round trip
    resumed = TrainLoader(stream(n_windows=10), 7, 3, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == run.epoch
    for (x, y), (rx, ry) in zip(ref[5:], take(resumed, 7)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="seed=5 in the state, 6 here"):
        TrainLoader(stream(n_windows=10), 7, 3, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="n_windows"):
        TrainLoader(stream(n_windows=11), 7, 3, seed=5).load_state_dict(state)


def test_loader_warns_past_four_epochs(recwarn):
    loader = TrainLoader(stream(n_windows=4), 7, 4, seed=0)
    take(loader, 4)
    assert loader.epoch == 4.0 and not [w for w in recwarn if "epochs" in str(w.message)]
    with pytest.warns(RuntimeWarning, match="repeated data stops being nearly as good"):
        next(loader)
    recwarn.clear()
    take(loader, 3)  # only once
    assert not [w for w in recwarn if "epochs" in str(w.message)]
    with pytest.raises(ValueError, match="fewer than one window"):
        TrainLoader(np.arange(5, dtype=np.uint16), 7, 2, seed=0)


# -- cache robustness and named input errors ----------------------------------------------------
@pytest.mark.parametrize("damage", ["tokenizer-garbage", "tokenizer-cut", "meta-garbage", "meta-no-eos"])
def test_corrupt_tokenizer_cache_is_rebuilt_not_fatal(tmp_path, caplog, damage):
    src = resolve_source(DataCfg(), "train")
    tok = build_tokenizer(TokCfg(vocab_size=300, train_docs=50), src, tmp_path)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    target = entry / ("tokenizer.json" if damage.startswith("tokenizer") else "meta.json")
    text = target.read_text()
    target.write_text({"tokenizer-garbage": "{not json", "tokenizer-cut": text[: len(text) // 2],
                       "meta-garbage": "]", "meta-no-eos": "{}"}[damage])
    caplog.set_level(logging.INFO, logger=LOGGER)
    again = build_tokenizer(TokCfg(vocab_size=300, train_docs=50), src, tmp_path)
    assert "is unreadable" in caplog.text and "rebuilding" in caplog.text and str(entry) in caplog.text
    assert again.fingerprint == tok.fingerprint  # retrained: the same tokenizer
    caplog.clear()
    build_tokenizer(TokCfg(vocab_size=300, train_docs=50), src, tmp_path)
    assert "tokenizer cache hit" in caplog.text  # the rebuilt entry is whole again


def test_corrupt_token_cache_sidecar_is_rebuilt(tmp_path, caplog):
    src = resolve_source(DataCfg(), "validation")
    tok = build_tokenizer(TokCfg(vocab_size=300, train_docs=50), resolve_source(DataCfg(), "train"), tmp_path)
    first = pack_documents(src, tok, tmp_path)
    sidecar = first.path.with_suffix(".json")
    for bad in ("{cut", json.dumps({"n_tokens": 3})):
        sidecar.write_text(bad)
        caplog.set_level(logging.INFO, logger=LOGGER)
        caplog.clear()
        again = pack_documents(src, tok, tmp_path)
        assert "unreadable" in caplog.text and str(sidecar) in caplog.text
        assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))


def test_truncated_gzip_names_the_file(tmp_path, real_docs):
    good = write_jsonl(tmp_path / "good.jsonl.gz", real_docs["train"][:60], gz=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    src = resolve_source(DataCfg(name="jsonl", path=str(cut), val_path=str(good)), "train")
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: not a readable gzip file"):
        list(src.iter_texts())


def test_shared_cache_files_follow_the_umask(tmp_path, real_docs):
    """Colleagues on a shared cluster read one token cache: files are 0o666 & ~umask, not 0600."""
    train = write_jsonl(tmp_path / "tr.jsonl", real_docs["train"][:20], gz=False)
    val = write_jsonl(tmp_path / "va.jsonl", real_docs["validation"][:4], gz=False)
    cache = tmp_path / "cache"
    old = os.umask(0o022)
    try:
        prepare_data(DataCfg(name="jsonl", path=str(train), val_path=str(val)),
                     TokCfg(vocab_size=300, train_docs=20), 32, cache)
    finally:
        os.umask(old)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.suffix == ".bin" for p in files) and any(p.name.endswith(".json") for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}, \
        {p.name: oct(p.stat().st_mode & 0o777) for p in files}
