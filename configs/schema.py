"""Structured-config schemas: the typed table of contents of every experiment parameter.

Hydra merges the YAML files of `configs/` onto these dataclasses, so a misspelt key in a
YAML file or an override fails at composition, before any work, naming the key. Values
with a fixed set of choices are checked by `fp4_experiments.validate.validate_config`
(which lists the valid choices), because they come from the numerics core (`fp4`) and the
data layer, and the schema must not import either.

`ladder` and `stabilizer` are deliberately *not* in the defaults list of `config.yaml`:
their schema defaults below are the FP8 baseline with no stabilizer, and a rung or a
stabilizer is appended with `+ladder=wgrad +stabilizer=h16`, as the command line of the
paper's ablation reads.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LadderConfig:
    # Rung of the FP8 -> FP4 ladder; rung k keeps the earlier rungs' GEMMs in FP4.
    name: str = "fp8"
    fp4_gemms: List[str] = field(default_factory=list)


@dataclass
class StabilizerConfig:
    name: str = "none"
    # Which GEMMs the stabilizer acts on (only those that are in FP4 are affected).
    gemms: List[str] = field(default_factory=lambda: ["wgrad"])
    stochastic_rounding: bool = False
    # "grad": dY only (TE, torchao, UFP4); "all": every backward operand (Tseng et al., Quartet).
    sr_operands: str = "grad"
    hadamard: bool = False
    hadamard_size: int = 16
    # none: unsigned H (deterministic); fixed: one random sign vector kept for the run;
    # step: fresh signs every optimizer step; call: fresh signs every GEMM call.
    hadamard_signs: str = "none"


@dataclass
class FormatConfig:
    name: str = "mxfp4"
    # MX shared-exponent rule: floor | ceil | rceil | even; null = the format default.
    scale_mode: Optional[str] = "even"
    nvfp4_2d_weights: bool = False
    ufp4_element: str = "e1m2"
    fp8_forward: str = "e4m3"
    fp8_backward: str = "e5m2"


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
    name: str = "embedded"
    path: Optional[str] = None
    val_path: Optional[str] = None
    val_tokens: int = 16384
    max_docs: Optional[int] = None
    hub_path: str = "allenai/c4"
    hub_name: str = "en"
    data_files: Optional[Dict[str, Any]] = None
    val_split_name: str = "validation"


@dataclass
class TokenizerConfig:
    name: str = "bpe"
    vocab_size: int = 2048
    path: Optional[str] = None
    train_docs: int = 4000


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
    log_every_steps: int = 10
    progress_bar: bool = True


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "fp4-ablate"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None
    entity: Optional[str] = None


@dataclass
class HardwareConfig:
    name: str = "auto"
    # auto: cuda when available, else cpu.
    device: str = "auto"
    compile: bool = False
    # Autocast dtype on CUDA; CPU runs in float32.
    autocast_dtype: str = "bfloat16"
    # auto: Triton kernels on CUDA when available; torch: the reference everywhere.
    quant_backend: str = "auto"
    # Real FP8 GEMMs through torch._scaled_mm on sm_89+ (emulated elsewhere).
    real_fp8: bool = True


@dataclass
class SweepConfig:
    seeds: int = 1
    force: bool = False
    # Runs sharing one GPU at a time. A ~20M-parameter model under FP4 emulation keeps the GPU
    # idle most of each step (the eager step is bound by the host launching small kernels), so
    # several runs side by side finish a grid several times sooner. Throughput per run then
    # depends on its neighbours: compare speed with `fp4-ablate bench`, not with a shared sweep.
    jobs_per_gpu: int = 1
    # Filled in by `fp4-ablate sweep`: the number of jobs, for the progress line.
    total: Optional[int] = None
    id: Optional[str] = None


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


# Keys that do not change what an experiment computes: left out of the run key, so a sweep
# re-run with other logging or output options finds the same runs.
NON_EXPERIMENT_KEYS = (
    "results_dir", "cache_dir", "logger", "hardware", "sweep",
    "train.checkpoint_every_steps", "train.log_every_steps", "train.progress_bar",
    "train.eval_batch_size", "train.check_finite",
)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)


register()
