"""Structured-config schemas: the typed table of contents of every experiment parameter.

Hydra merges the YAML files of `configs/` onto these dataclasses, so a misspelt key in a
YAML file or an override fails at composition, before any work, naming the key (the CLI's
precheck also refuses keys added with `+key=` / `++key=`, which Hydra lets through). Values
with a fixed set of choices are typed by Enums: the numerics' names come from `fp4.names`
(the one vocabulary of the numerics core), the experiment layer's (data sources, tokenizers,
loggers, autocast dtypes) are defined here, so a bad value fails at composition too, naming
the key and listing the valid choices. `fp4_experiments.validate` keeps only cross-field,
range and environment checks.

Every key is read by the code it describes. A key that only matters for some choices of its
own group (Hadamard signs for a Hadamard stabilizer, SR operands for `sr`, `ufp4_element` for
`ufp4`, hub settings for `data=c4`, ...) is Optional: null means "the default of that
choice", and a non-null value where it has no effect is refused by validation rather than
silently ignored (it would change the run key and nothing else). Which GEMMs a rung puts in
FP4 and what a stabilizer does are defined once, in `fp4` (`fp4.names.FP4_GEMMS`,
`fp4.recipe.Recipe`), not repeated here.

`ladder` and `stabilizer` are deliberately *not* in the defaults list of `config.yaml`:
their schema defaults below are the FP8 baseline with no stabilizer, and a rung or a
stabilizer is appended with `+ladder=wgrad +stabilizer=h16`, as the command line of the
paper's ablation reads.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from fp4.names import (Fp8Format, Gemm, Ladder, NameEnum, QuantBackend, RecipeFormat, ScaleMode,
                       SignCadence, SrOperands, Stabilizer, UfpElement)


class DataSource(NameEnum):
    """embedded: the C4 sample in the package; c4_local: a C4 shard directory; c4: the hub;
    jsonl: any JSON-lines corpus."""
    embedded = "embedded"
    c4_local = "c4_local"
    c4 = "c4"
    jsonl = "jsonl"


class TokenizerKind(NameEnum):
    bpe = "bpe"
    pretrained = "pretrained"


class LoggerKind(NameEnum):
    none = "none"
    wandb = "wandb"


class AutocastDtype(NameEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class LadderConfig:
    # Rung of the FP8 -> FP4 ladder; rung k keeps the earlier rungs' GEMMs in FP4. Which GEMMs
    # that is is defined once, in fp4.names.FP4_GEMMS.
    name: Ladder = Ladder.fp8


@dataclass
class StabilizerConfig:
    # What the stabilizer does (SR, a Hadamard transform and its default signs) is defined by
    # its name, in fp4.recipe.Recipe; the keys below only tune it.
    name: Stabilizer = Stabilizer.none
    # Which GEMMs the stabilizer acts on (only those that are in FP4 are affected);
    # null: Wgrad. Refused with stabilizer=none (it acts on nothing).
    gemms: Optional[List[Gemm]] = None
    # sr only. "grad": dY only (TE, torchao, UFP4); "all": every operand of the targeted GEMMs
    # (Tseng et al., Quartet). null: grad.
    sr_operands: Optional[SrOperands] = None
    # Block of the Hadamard transform (rht, h16, and format=ufp4's built-in one); null: 16.
    hadamard_size: Optional[int] = None
    # rht / h16 only. none: unsigned H (deterministic); fixed: one random sign vector kept for
    # the run; step: fresh signs every optimizer step; call: fresh signs every GEMM call.
    # null: the stabilizer's own default (rht: step, h16: none).
    hadamard_signs: Optional[SignCadence] = None


@dataclass
class FormatConfig:
    name: RecipeFormat = RecipeFormat.mxfp4
    # MX shared-exponent rule (mxfp4, ufp4): floor | ceil | rceil | even; null = the format
    # default (even; rceil under stochastic rounding). Refused with nvfp4 (E4M3 block scales).
    scale_mode: Optional[ScaleMode] = None
    # nvfp4 only (refused otherwise): 16x16 weight tiles.
    nvfp4_2d_weights: bool = False
    # ufp4 only (refused otherwise): e1m2 | int4; null = e1m2.
    ufp4_element: Optional[UfpElement] = None
    fp8_forward: Fp8Format = Fp8Format.e4m3
    fp8_backward: Fp8Format = Fp8Format.e5m2


@dataclass
class ModelConfig:
    name: str = "demo"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The paper keeps embedding and output head in high precision; these switch them to the recipe.
    quantize_embedding: bool = False
    quantize_head: bool = False


@dataclass
class DataConfig:
    name: DataSource = DataSource.embedded
    # c4_local / jsonl only (required there, refused otherwise).
    path: Optional[str] = None
    val_path: Optional[str] = None
    val_tokens: int = 16384
    max_docs: Optional[int] = None
    # data=c4 only (refused otherwise); null: allenai/c4, en, no data_files, validation.
    hub_path: Optional[str] = None
    hub_name: Optional[str] = None
    data_files: Optional[Dict[str, Any]] = None
    val_split_name: Optional[str] = None


@dataclass
class TokenizerConfig:
    name: TokenizerKind = TokenizerKind.bpe
    # bpe only (refused with pretrained, whose vocabulary is its own).
    vocab_size: Optional[int] = 2048
    # pretrained only (required there, refused with bpe).
    path: Optional[str] = None
    # bpe only: documents the BPE is trained on.
    train_docs: Optional[int] = 4000


@dataclass
class TrainConfig:
    max_tokens: int = 600_000
    # null: run to max_tokens without a target (used to calibrate one).
    target_ppl: Optional[float] = None
    stop_at_target: bool = True
    batch_size: int = 16
    micro_batch_size: Optional[int] = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_tokens: int = 40_000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every_tokens: int = 40_000
    eval_batch_size: int = 16
    # Diverged when the smoothed train loss exceeds its best value times this ratio.
    diverge_loss_ratio: float = 2.0
    diverge_ema: float = 0.9
    check_finite: bool = False
    checkpoint_every_steps: int = 50
    keep_final_checkpoint: bool = False  # true: a finished run keeps checkpoints/last.pt
    log_every_steps: int = 10
    progress_bar: bool = True


@dataclass
class LoggerConfig:
    name: LoggerKind = LoggerKind.none
    project: str = "fp4-ablate"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None
    entity: Optional[str] = None


class CompileBackend(NameEnum):
    inductor = "inductor"
    aot_eager = "aot_eager"
    eager = "eager"


@dataclass
class HardwareConfig:
    name: str = "auto"
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # torch.compile, per decoder layer (experiments/training/compile.py); the quantized linears are
    # custom ops inside the compiled layers, so they quantize exactly as in eager. null (auto): on
    # CUDA, off on the CPU.
    compile: Optional[bool] = None
    # torch.compile backend: inductor (fused kernels, the fast path), aot_eager (traced, no fusion:
    # the same bits as eager, for checking), eager (dynamo only).
    compile_backend: CompileBackend = CompileBackend.inductor
    # Autocast dtype on CUDA; CPU runs in float32.
    autocast_dtype: AutocastDtype = AutocastDtype.bfloat16
    # auto: Triton kernels on CUDA when available; torch: the reference everywhere.
    quant_backend: QuantBackend = QuantBackend.auto
    # Real FP8 GEMMs through torch._scaled_mm on sm_89+ (emulated elsewhere).
    real_fp8: bool = True
    # The step's forward+backward captured once as a CUDA graph and replayed (the host then launches
    # one graph instead of thousands of kernels; experiments/training/graphed.py). Same bits as the
    # plain step, compiled or eager layers; SR and random Hadamard signs are drawn inside the graph
    # from generators re-seeded per step (where this torch registers generators with a graph); the
    # steps diagnostics probe run plain among the replays. Not for several processes or
    # check_finite; a failed capture, or one whose attention masks differ from the uncaptured
    # step's, falls back to the plain step.
    # null (auto): on CUDA whenever nothing blocks it; true: refuse to start if something the
    # config shows does; false: never.
    cuda_graphs: Optional[bool] = None


@dataclass
class SweepConfig:
    seeds: int = 1
    force: bool = False
    # Runs sharing one GPU at a time. A ~20M-parameter model under FP4 emulation keeps the GPU
    # idle most of each step (the eager step is bound by the host launching small kernels), so
    # several runs side by side finish a grid several times sooner. Throughput per run then
    # depends on its neighbours: compare speed with `fp4-ablate bench`, not with a shared sweep.
    jobs_per_gpu: int = 1
    # GPUs per run, for a local sweep: K > 1 starts each job's run as
    #   python -m torch.distributed.run --standalone --nproc_per_node=K -m fp4_ablate run ...
    # on K consecutive free GPUs (locked for the run, experiments/gpu_slots.py; CUDA_VISIBLE_DEVICES
    # set to them), and records its summary.json in the ledger as an in-process job's. K must
    # divide the visible GPU count; on the CPU (hardware=cpu, or auto without CUDA) K means K gloo
    # processes. K > 1 needs an explicit parallel=ddp or parallel=fsdp2 (never picked for you:
    # fsdp2's param_dtype enters the run key) and sweep.jobs_per_gpu=1 (a K-GPU run holds its GPUs
    # alone). Refused with a remote launcher (SLURM): there, hydra.launcher.tasks_per_node=K and
    # hydra.launcher.gpus_per_node=K give each run K GPUs, one task per rank (README).
    gpus_per_run: int = 1
    # Filled in by `fp4-ablate sweep`: the number of jobs, for the progress line.
    total: Optional[int] = None
    id: Optional[str] = None


class ParallelMode(NameEnum):
    """none: one process; ddp: DistributedDataParallel; fsdp2: torch.distributed.fsdp.fully_shard
    per decoder layer and on the root (experiments/distributed.py)."""
    none = "none"
    ddp = "ddp"
    fsdp2 = "fsdp2"


@dataclass
class ParallelConfig:
    # How one run spreads over the processes torchrun starts (WORLD_SIZE, RANK, LOCAL_RANK).
    # train.batch_size stays the global batch and each rank takes its micro-batches
    # (train.micro_batch_size, per rank) from the one-process order, so the world size is not an
    # experiment key: a run resumes on any number of ranks and finds the same run directory. What
    # it can change in the numbers is listed in experiments/distributed.py (reduction order; SR
    # draws of a micro-batch stay the same; with a null micro_batch_size each rank's micro-batch is
    # batch_size / N). The one parallel setting that changes the numerics, fsdp2's param_dtype when
    # it is not float32, *is* in the run key (rundir.experiment_dict); the rest (name, timeout_s,
    # activation_checkpointing: bit-identical, see distributed.py) is not.
    name: ParallelMode = ParallelMode.none
    # Process-group timeout: a rank stuck in a collective fails the run after this many seconds.
    timeout_s: int = 600
    # Recompute each decoder layer's activations in backward (torch.utils.checkpoint).
    activation_checkpointing: bool = False
    # fsdp2 only: the dtype parameters are all-gathered and computed in. null: the
    # hardware.autocast_dtype on CUDA, float32 on the CPU. Gradients are reduced in float32 and
    # master weights stay float32 either way. Other than float32 it is an experiment key (W is
    # then quantized from a rounded copy of the master weight): for the key, null means the
    # autocast dtype unless hardware.device=cpu (the key must not depend on the machine that
    # computes it, and `auto` is read as CUDA), so under hardware=auto on a machine without CUDA
    # an fsdp2 run gets its own run directory although it computes in float32.
    param_dtype: Optional[AutocastDtype] = None


@dataclass
class DiagnosticsConfig:
    # GEMM quantization-error diagnostics during training (experiments/diagnostics): every N-th
    # optimizer step is probed (fp4/probe.py, an observer: the step computes exactly what it would
    # unprobed) and one record per (layer, GEMM) goes to diagnostics.jsonl. null / 0: off.
    # Suggested: 50 (configs/diagnostics/on.yaml: with window=4 about 2-4% of a CPU demo run).
    every_steps: Optional[int] = None
    # Layers probed: layer indices (their order among the quantized linears) or substrings of the
    # module name ("mlp", "layers.0."); null: all.
    layers: Optional[List[Any]] = None
    # Error consistency across steps: each probed step opens a window of this many consecutive
    # optimizer steps over which the Wgrad output error and the Fprop / Dgrad weight-operand errors
    # are tracked (step-to-step correlation, ||sum e_t|| / sum ||e_t||; one "consistency" record per
    # layer and GEMM). 0: off; else 2 <= window <= every_steps (windows never overlap). Costs, during
    # a window only, up to 36 bytes per probed weight element (float32 running sum and previous
    # error per GEMM). Only read when every_steps is on.
    window: int = 4


@dataclass
class ProfileConfig:
    # torch.profiler over a few optimizer steps of the run (experiments/training/profile.py):
    # profile.txt / profile.json in the run directory. 0: off. `+profile=on` for the defaults below.
    steps: int = 0
    # The first profiled step (optimizer steps count from 1); past the 10 untimed first steps, so
    # compilation and warm-up stay out of it.
    start_step: int = 20
    # Also write the Chrome / Perfetto trace (profile_trace.json.gz; tens of MB for a large model).
    trace: bool = False
    row_limit: int = 30


@dataclass
class ExperimentConfig:
    seed: int = 0
    results_dir: str = "results/runs"
    cache_dir: str = ".cache/fp4-ablate"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


# Keys that do not change what an experiment computes: left out of the run key, so a sweep
# re-run with other logging or output options finds the same runs.
NON_EXPERIMENT_KEYS = (
    "results_dir", "cache_dir", "logger", "hardware", "sweep", "parallel",
    # Diagnostics only observe (the probe never changes a GEMM, draws no random numbers and reads no
    # data), so a run with them trains bit for bit the same weights as one without.
    "diagnostics",
    # The profiler records only; the profiled steps compute the same bits.
    "profile",
    "train.checkpoint_every_steps", "train.log_every_steps", "train.progress_bar",
    "train.eval_batch_size", "train.check_finite", "train.keep_final_checkpoint",
)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)


register()
