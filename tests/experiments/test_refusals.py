"""Bad input is refused before any work, everywhere: exit 2, the key/value named, nothing written.

One table feeds every config group and every class of bad input (misspelt keys with and without
`+`/`++`, unknown group options, values outside an Enum, wrong types, values out of range, keys
that would have no effect, missing or corrupt data files, unwritable or wrong-kind paths, devices
this machine lacks) through the real CLI entry point, in process (`fp4_ablate.main.main`), and a
few through a fresh interpreter. Each case must exit 2, print every expected fragment on stderr,
and leave no run directory and no cache entry behind.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pytest

from cli_support import run_cli

TOK = "tokenizer.vocab_size=512"

# (case id, overrides, fragments stderr must hold). {tmp} is the test's directory; {c4_*}, {jsonl_*},
# {file} are fixture files and directories made in it.
CASES = [
    # -- unknown keys, whatever the prefix, in every group: the key and the closest valid ones
    ("plus-train", ["+train.max_tokenz=1"], ["train.max_tokenz is not a config key", "train.max_tokens"]),
    ("plusplus-train", ["++train.max_tokenz=1"], ["train.max_tokenz is not a config key", "train.max_tokens"]),
    ("bare-train", ["train.max_tokenz=1"], ["train.max_tokenz is not a config key", "train.max_tokens"]),
    ("plus-top", ["+foo=1"], ["foo is not a config key", "results_dir"]),
    ("plusplus-top", ["++foo=1"], ["foo is not a config key"]),
    ("plus-model", ["+model.hidden_sise=7"], ["model.hidden_sise is not a config key", "model.hidden_size"]),
    ("bare-model", ["model.hidden_sise=7"], ["model.hidden_sise", "model.hidden_size"]),
    ("plus-data", ["+data.hub_pth=x"], ["data.hub_pth is not a config key", "data.hub_path"]),
    ("plus-tokenizer", ["+tokenizer.vocab=1"], ["tokenizer.vocab is not a config key", "tokenizer.vocab_size"]),
    ("plus-format", ["++format.scale=floor"], ["format.scale is not a config key", "format.scale_mode"]),
    ("plus-ladder-removed", ["+ladder=fprop", "+ladder.fp4_gemms=[wgrad]"], ["ladder.fp4_gemms is not a config key"]),
    ("bare-ladder-removed", ["+ladder=fprop", "ladder.fp4_gemms=[wgrad]"], ["ladder.fp4_gemms is not a config key"]),
    ("plus-stabilizer-removed", ["+stabilizer=sr", "+stabilizer.stochastic_rounding=true"],
     ["stabilizer.stochastic_rounding is not a config key"]),
    ("plus-logger", ["+logger.projct=x"], ["logger.projct is not a config key", "logger.project"]),
    ("plus-hardware", ["+hardware.compil=true"], ["hardware.compil is not a config key", "hardware.compile"]),
    ("plus-sweep", ["+sweep.seed=3"], ["sweep.seed is not a config key", "sweep.seeds"]),
    ("hardware-profile", ["+hardware/profile=h100"], ["hardware.profile is not a config key"]),
    # -- unknown group options: the valid options
    ("opt-ladder", ["+ladder=wgrd"], ["ladder/wgrd", "wgrad", "fprop"]),
    ("opt-stabilizer", ["+stabilizer=h17"], ["stabilizer/h17", "h16"]),
    ("opt-ablation", ["+ablation=wgrad_h17"], ["ablation/wgrad_h17", "wgrad_h16"]),
    ("opt-format", ["format=mxfp5"], ["format/mxfp5", "mxfp4"]),
    ("ablation-format", ["+ablation=nvfp4_wgrad", "format=mxfp4"],
     ["+ablation=nvfp4_wgrad sets format=nvfp4", "format=mxfp4 on the command line", "drop format=mxfp4"]),
    ("opt-model", ["model=llama-21m"], ["model/llama-21m", "llama-20m"]),
    ("opt-data", ["data=c5"], ["data/c5", "c4_local"]),
    ("opt-tokenizer", ["tokenizer=bp"], ["tokenizer/bp", "bpe"]),
    ("opt-train", ["train=gpux"], ["train/gpux", "gpu"]),
    ("opt-logger", ["logger=wandbb"], ["logger/wandbb", "wandb"]),
    ("opt-hardware", ["hardware=tpu"], ["hardware/tpu", "cuda"]),
    # -- values outside an Enum: the key, the value and the choices
    ("enum-ladder", ["ladder.name=wgrd"], ["ladder.name='wgrd'", "bf16, fp8, fprop, dgrad, wgrad"]),
    ("enum-stabilizer", ["stabilizer.name=h17"], ["stabilizer.name='h17'", "none, sr, rht, h16"]),
    ("enum-gemms", ["+stabilizer=sr", "stabilizer.gemms=[wgrd]"], ["stabilizer.gemms[0]='wgrd'", "fprop, dgrad, wgrad"]),
    ("enum-signs", ["+stabilizer=h16", "stabilizer.hadamard_signs=sometimes"],
     ["stabilizer.hadamard_signs='sometimes'", "none, fixed, step, call"]),
    ("enum-sr-operands", ["+stabilizer=sr", "stabilizer.sr_operands=weights"], ["stabilizer.sr_operands='weights'", "grad, all"]),
    ("enum-format", ["format.name=mxfp5"], ["format.name='mxfp5'", "mxfp4, nvfp4, ufp4"]),
    ("enum-scale-mode", ["format.scale_mode=flor"], ["format.scale_mode='flor'", "floor, ceil, rceil, even"]),
    ("enum-ufp4-element", ["format=ufp4", "format.ufp4_element=e2m1"], ["format.ufp4_element='e2m1'", "e1m2, int4"]),
    ("enum-fp8", ["format.fp8_forward=e4m4"], ["format.fp8_forward='e4m4'", "e4m3, e5m2"]),
    ("enum-data", ["data.name=c5"], ["data.name='c5'", "embedded, c4_local, c4, jsonl"]),
    ("enum-tokenizer", ["tokenizer.name=bp"], ["tokenizer.name='bp'", "bpe, pretrained"]),
    ("enum-logger", ["logger.name=wandbb"], ["logger.name='wandbb'", "none, wandb"]),
    ("enum-autocast", ["hardware.autocast_dtype=float8"], ["hardware.autocast_dtype='float8'", "bfloat16"]),
    ("enum-backend", ["hardware.quant_backend=cuda"], ["hardware.quant_backend='cuda'", "auto, torch, triton"]),
    ("bad-device", ["hardware.device=tpu"], ["hardware.device='tpu'", "cuda:N"]),
    # -- wrong types: OmegaConf's reason is kept
    ("type-int", ["train.max_tokens=abc"], ["train.max_tokens", "could not be converted to Integer"]),
    ("type-float", ["train.lr=fast"], ["train.lr", "could not be converted to Float"]),
    ("type-bool", ["model.tie_embeddings=maybe"], ["model.tie_embeddings", "is not a valid bool"]),
    ("type-seed", ["seed=one"], ["seed", "could not be converted to Integer"]),
    ("type-null", ["ladder.name=null"], ["ladder.name", "not Optional"]),
    # -- keys that would have no effect with their group's choice
    ("inactive-signs-none", ["stabilizer.hadamard_signs=step"], ["stabilizer.hadamard_signs=step has no effect", "no Hadamard"]),
    ("inactive-signs-sr", ["+stabilizer=sr", "stabilizer.hadamard_signs=fixed"], ["stabilizer.hadamard_signs=fixed", "stabilizer=sr"]),
    ("inactive-sr-operands", ["+stabilizer=h16", "stabilizer.sr_operands=all"], ["stabilizer.sr_operands=all has no effect"]),
    ("inactive-gemms", ["stabilizer.gemms=[fprop]"], ["stabilizer.gemms=[fprop] has no effect", "stabilizer=none"]),
    ("inactive-hadamard-size", ["+stabilizer=sr", "stabilizer.hadamard_size=32"], ["stabilizer.hadamard_size=32 has no effect"]),
    ("inactive-scale-mode", ["format=nvfp4", "format.scale_mode=floor"], ["format.scale_mode=floor has no effect", "nvfp4"]),
    ("inactive-ufp4-element", ["format.ufp4_element=int4"], ["format.ufp4_element=int4 has no effect"]),
    ("inactive-2d", ["format.nvfp4_2d_weights=true"], ["format.nvfp4_2d_weights=true has no effect"]),
    ("inactive-hub", ["data.hub_path=allenai/c4"], ["data.hub_path=allenai/c4 has no effect", "data=c4"]),
    ("inactive-data-path", ["data.path={tmp}"], ["data.path=", "has no effect with data=embedded"]),
    ("inactive-tok-path", ["tokenizer.path={file}"], ["tokenizer.path=", "has no effect with tokenizer=bpe"]),
    ("inactive-tok-vocab", ["tokenizer=pretrained", "tokenizer.path={file}", "tokenizer.vocab_size=100"],
     ["tokenizer.vocab_size=100 has no effect"]),
    ("inactive-scale-mode-mx", ["format.scale_mode=fp32"], ["format.scale_mode=fp32 is not valid with format=mxfp4",
                                                            "floor, ceil, rceil, even"]),
    ("recipe-refuses", ["+ablation=wgrad_h16_all", "stabilizer.gemms=[wgrad]"],
     ["ladder/stabilizer/format:", "h16_all acts on every GEMM"]),
    # -- out of range
    ("range-beta1", ["train.beta1=1.5"], ["train.beta1=1.5 must be in [0, 1)"]),
    ("range-beta2", ["train.beta2=-0.1"], ["train.beta2=-0.1 must be in [0, 1)"]),
    ("range-eps", ["train.eps=-1"], ["train.eps=-1.0 must be > 0"]),
    ("range-wd", ["train.weight_decay=-1"], ["train.weight_decay=-1.0 must be >= 0"]),
    ("range-ema", ["train.diverge_ema=2"], ["train.diverge_ema=2.0 must be in [0, 1)"]),
    ("range-diverge-ratio", ["train.diverge_loss_ratio=0.5"], ["train.diverge_loss_ratio=0.5 must be > 1"]),
    ("range-lr", ["train.lr=0"], ["train.lr=0.0 must be > 0"]),
    ("range-clip", ["train.grad_clip=0"], ["train.grad_clip=0.0 must be > 0"]),
    ("range-min-lr", ["train.min_lr_ratio=2"], ["train.min_lr_ratio=2.0 must be in [0, 1]"]),
    ("range-warmup", ["train.warmup_tokens=-1"], ["train.warmup_tokens=-1 must be in [0, train.max_tokens)"]),
    ("range-micro", ["train.micro_batch_size=3"], ["train.micro_batch_size=3 must divide train.batch_size=16"]),
    ("range-target", ["train.target_ppl=0.5"], ["train.target_ppl=0.5 must be > 1"]),
    ("range-max-tokens", ["train.max_tokens=0"], ["train.max_tokens=0 must be > 0"]),
    ("range-batch", ["train.batch_size=0"], ["train.batch_size=0 must be > 0"]),
    ("range-eval-every", ["train.eval_every_tokens=0"], ["train.eval_every_tokens=0 must be > 0"]),
    ("range-seed", ["seed=-1"], ["seed=-1 must be >= 0"]),
    ("range-val-tokens", ["data.val_tokens=10"], ["data.val_tokens=10 is less than one validation row", "129"]),
    ("range-max-docs", ["data.max_docs=0"], ["data.max_docs=0 must be > 0"]),
    ("range-train-docs", ["tokenizer.train_docs=0"], ["tokenizer.train_docs=0 must be > 0"]),
    ("range-vocab", ["tokenizer.vocab_size=100"], ["tokenizer.vocab_size=100 must be >= 260"]),
    ("range-head-dim-odd", ["model.hidden_size=20"], ["head dimension 5", "must be even (RoPE"]),
    ("range-heads", ["model.num_heads=3"], ["model.hidden_size=128 must be a multiple of model.num_heads=3"]),
    ("range-kv-heads", ["model.num_kv_heads=3"], ["model.num_heads=4 must be a multiple of model.num_kv_heads=3"]),
    ("range-layers", ["model.num_layers=0"], ["model.num_layers=0 must be > 0"]),
    ("range-rope", ["model.rope_theta=-1"], ["model.rope_theta=-1.0 must be > 0"]),
    ("range-norm-eps", ["model.rms_norm_eps=0"], ["model.rms_norm_eps=0.0 must be > 0"]),
    ("range-hadamard-size", ["+stabilizer=h16", "stabilizer.hadamard_size=12"], ["stabilizer.hadamard_size=12 must be a power of two"]),
    ("range-seeds", ["sweep.seeds=0"], ["sweep.seeds=0 must be >= 1"]),
    ("range-jobs", ["sweep.jobs_per_gpu=0"], ["sweep.jobs_per_gpu=0 must be >= 1"]),
    # -- devices this machine lacks (skipped where it has them)
    ("no-cuda", ["hardware=cuda"], ["hardware.device=cuda", "no usable CUDA GPU"]),
    ("no-cuda-n", ["hardware.device=cuda:7"], ["hardware.device=cuda:7"]),
    ("no-triton", ["hardware.quant_backend=triton"], ["hardware.quant_backend=triton"]),
    # -- missing or corrupt data, named
    ("missing-c4-dir", ["data=c4_local", "data.path={tmp}/nowhere"], ["data.path=", "nowhere", "does not exist"]),
    ("missing-jsonl", ["data=jsonl", "data.path={tmp}/nothing-*.jsonl", "data.val_path={jsonl_ok}"],
     ["data.path=", "nothing-*.jsonl", "matches no file"]),
    ("missing-val-path", ["data.val_path={tmp}/none.jsonl"], ["data.val_path=", "none.jsonl", "matches no file"]),
    ("no-val-shards", ["data=c4_local", "data.path={c4_train_only}"], ["data.path=", "no C4 validation shard"]),
    ("empty-gz", ["data=c4_local", "data.path={c4_empty}"], ["c4-train.00000-of-00001.json.gz", "is empty"]),
    ("truncated-gz", ["data=c4_local", "data.path={c4_truncated}"], ["c4-train.00000-of-00001.json.gz", "not readable"]),
    ("not-gzip", ["data=c4_local", "data.path={c4_plain}"], ["c4-validation.00000-of-00001.json.gz", "not a gzip file"]),
    ("no-text-field", ["data=jsonl", "data.path={jsonl_notext}", "data.val_path={jsonl_ok}"],
     ["notext.jsonl", "no string 'text' field"]),
    ("missing-tokenizer", ["tokenizer=pretrained", "tokenizer.path={tmp}/tok.json", "tokenizer.vocab_size=null"],
     ["tokenizer.path=", "tok.json", "does not exist"]),
    # -- unwritable or wrong-kind paths
    ("results-is-file", ["results_dir={file}"], ["results_dir=", "is a file, not a directory"]),
    ("results-under-file", ["results_dir={file}/runs"], ["results_dir=", "cannot be created", "is a file"]),
    ("results-unwritable", ["results_dir=/proc/fp4-ablate/runs"], ["results_dir='/proc/fp4-ablate/runs' is not writable"]),
    ("cache-is-file", ["cache_dir={file}"], ["cache_dir=", "is a file, not a directory"]),
    ("cache-unwritable", ["cache_dir=/proc/fp4-ablate-cache"], ["cache_dir='/proc/fp4-ablate-cache' is not writable"]),
]


@pytest.fixture
def inputs(tmp_path):
    """Fixture files: good and bad corpora and C4 shard directories, and a plain file."""
    rec = "".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(40)).encode()
    files = {"tmp": str(tmp_path), "file": str(tmp_path / "a-file")}
    (tmp_path / "a-file").write_text("not a directory\n")
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(rec)
    files["jsonl_ok"] = str(ok)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    files["jsonl_notext"] = str(notext)

    def c4(name, train: bytes, val: bytes | None):
        d = tmp_path / name
        d.mkdir()
        (d / "c4-train.00000-of-00001.json.gz").write_bytes(train)
        if val is not None:
            (d / "c4-validation.00000-of-00001.json.gz").write_bytes(val)
        files[name] = str(d)

    good = gzip.compress(rec)
    c4("c4_train_only", good, None)
    c4("c4_empty", b"", good)
    c4("c4_truncated", good[: len(good) // 2], good)
    c4("c4_plain", good, rec)
    return files


def _main(argv, capsys):
    from fp4_ablate.main import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _skip_if_present(case):
    if case in ("no-cuda", "no-cuda-n", "no-triton"):
        import torch
        if case == "no-cuda-n" and torch.cuda.device_count() <= 7 and torch.cuda.is_available():
            return
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")


def _written(tmp_path):
    """Everything the case may have created: run directories, caches, sweep ledgers."""
    return [p for p in (tmp_path / "runs", tmp_path / "cache", tmp_path / "sweeps") if p.exists()] + \
        list(tmp_path.glob("**/.fp4-ablate-probe-*"))


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_run_refuses_before_any_work(case, args, expected, tmp_path, inputs, capsys, monkeypatch):
    _skip_if_present(case)
    # tests/fp4/test_kernels.py sets TRITON_INTERPRET=1 for the whole session (Triton on the CPU),
    # which makes quant_backend=triton valid here.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = [a.format(**inputs) for a in args]
    code, out, err = _main(["run", f"results_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                            "train.progress_bar=false", *args], capsys)
    assert code == 2, (code, out[-2000:], err[-2000:])
    for text in expected:
        assert text.format(**inputs) in err, (text, err)
    assert not _written(tmp_path), _written(tmp_path)


def test_val_tokens_beyond_the_validation_set_fail_before_the_run_directory(tmp_path, cache_dir, capsys):
    """Known only once the validation split is tokenized: after data preparation, before the run dir."""
    code, out, err = _main(["run", f"results_dir={tmp_path / 'runs'}", f"cache_dir={cache_dir}", TOK,
                            "data.val_tokens=10000000", "hardware=cpu", "train.progress_bar=false"], capsys)
    assert code == 2, (out[-2000:], err[-2000:])
    assert "data.val_tokens=10000000" in err and "has only" in err
    assert not (tmp_path / "runs").exists()


def test_sweep_checks_every_job_before_the_first(tmp_path, inputs, capsys):
    runs = tmp_path / "runs"
    sweeps = [
        (["data=c4_local", f"data.path={tmp_path}/nowhere"], ["data.path=", "nowhere"]),
        (["+ladder=fp8,wgrad", "train.beta1=0.9,1.5"], ["train.beta1=1.5"]),
        (["+ablation=fp8,wgrad_h16", "model=demo,llama-21m"], ["model/llama-21m"]),
        (["+train.max_tokenz=1"], ["train.max_tokenz is not a config key"]),
        ([f"results_dir={inputs['file']}"], ["is a file, not a directory"]),
    ]
    for args, expected in sweeps:
        code, out, err = _main(["sweep", f"results_dir={runs}", f"cache_dir={tmp_path / 'cache'}",
                                *args], capsys)
        assert code == 2, (args, out[-2000:], err[-2000:])
        for text in expected:
            assert text in err, (args, text, err)
        assert "[sweep" not in out
        assert not _written(tmp_path), (args, _written(tmp_path))


@pytest.mark.parametrize("args, expected", [
    (["run", "+train.max_tokenz=1"], ["train.max_tokenz is not a config key", "train.max_tokens"]),
    (["run", "train.max_tokens=abc"], ["could not be converted to Integer"]),
    (["sweep", "data=jsonl", "data.path={tmp}/nothing-*.jsonl", "data.val_path={tmp}/none.jsonl"],
     ["data.path=", "nothing-*.jsonl"]),
], ids=["run-plus-typo", "run-wrong-type", "sweep-missing-data"])
def test_refusals_through_the_console_entry_point(args, expected, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    r = run_cli(*args, f"results_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    for text in expected:
        assert text in r.stderr, (text, r.stderr)
    assert "Traceback" not in r.stderr
    assert not _written(tmp_path)


def test_group_appends_and_hydra_overrides_still_pass():
    from fp4_ablate.hydra_app import precheck
    for line in (["+ladder=wgrad", "+stabilizer=h16"], ["+ablation=wgrad_rht"],
                 ["hydra.job.chdir=false", "hydra.verbose=true", "+ablation=bf16"],
                 ["format=ufp4", "format.ufp4_element=int4", "+ladder=dgrad", "+stabilizer=sr",
                  "stabilizer.sr_operands=all", "stabilizer.hadamard_size=32"],
                 ["+stabilizer=rht", "stabilizer.hadamard_signs=call", "stabilizer.gemms=[dgrad,wgrad]"],
                 ["data=c4", "data.hub_path=json", "data.val_split_name=train"]):
        precheck([*line, "hardware=cpu"])


def test_help_and_sweep_paths(tmp_path, capsys):
    code, out, _ = _main(["sweep", "--help"], capsys)
    assert code == 0 and "fp4-ablate sweep: run the paper's grid" in out
    assert "fp4-ablate run: train one configuration" not in out
    assert "hardware/profile" not in out and "ladder: bf16, dgrad, fp8, fprop, wgrad" in out
    code, out, _ = _main(["run", "--help"], capsys)
    assert code == 0 and "fp4-ablate run: train one configuration" in out
    assert "hardware/profile" not in out and "hardware: auto, cpu, cuda" in out


def test_trailing_slash_in_results_dir_keeps_the_ledger_beside_it(tmp_path, cache_dir, capsys):
    from cli_support import TINY
    code, out, err = _main(["sweep", *TINY, f"cache_dir={cache_dir}", "+ablation=fp8",
                            "train.max_tokens=768", "train.eval_every_tokens=256",
                            f"results_dir={tmp_path / 'runs'}/"], capsys)
    assert code == 0, (out[-3000:], err[-3000:])
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    assert f"ledger in {sweep_dir}" in out
    assert (sweep_dir / "multirun.yaml").exists() and list((sweep_dir / "ledger").glob("*.json"))
    assert "sweep finished: 1/1" in out and not (tmp_path / "runs" / "sweeps").exists()
