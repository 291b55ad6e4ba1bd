"""One run on several processes: torchrun, DistributedDataParallel or FSDP2, sharded checkpoints.

    torchrun --nproc_per_node=N -m fp4_ablate run parallel=ddp   ...   (or parallel=fsdp2)

`fp4-ablate run` reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK; without them (or with
parallel=none and one process) nothing here is used and the run is the one-process run of
before, bit for bit. parallel=ddp|fsdp2 without torchrun trains on a one-process group (useful for
FSDP2's mixed precision on one GPU). The process group is made in one place (`init_distributed`,
NCCL on CUDA, gloo on the CPU, `parallel.timeout_s`) and destroyed by `shutdown`.

What is the same as one process, and what is not
================================================
`train.batch_size` is the global batch of a step; `train.micro_batch_size` is per rank (null:
batch_size / N, no accumulation). Every rank walks the one-process data order and rank r takes
micro-batch c * N + r of each step as its c-th (data/loader.py), so the step sees the same tokens,
grouped into the same micro-batches, as a one-process run with that micro-batch size; tokens,
schedule and token counts are those of the one-process run. Quantization acts per micro-batch
(per-tensor and block scales, Wgrad's blocks along each rank's local tokens), so it sees the same
tensors; the SR call index of rank r's c-th micro-batch is c * N + r (fp4/state.py), so the SR
draws are those of the one-process run too, and Hadamard signs (no call index) agree on every
rank. What differs: the order in which micro-batch gradients are summed (DDP/FSDP2 all-reduce),
so losses agree with the one-process run to float32 rounding, not bit for bit; and under FSDP2 on
CUDA parameters are all-gathered in bf16 (parallel.param_dtype), so W is quantized from a bf16
copy of the float32 master weight (a second rounding; parallel.param_dtype=float32 avoids it).
Loss and gradient norm are global (all-reduced); evaluation splits the validation batches over the
ranks and all-reduces the loss sums (the per-batch losses are those of one process).

Activation checkpointing (parallel.activation_checkpointing, any mode): the recomputed forward runs
under QuantState.replaying, so it reuses its call index and draws the same SR uniforms and signs:
gradients are bit-identical to a run without it (tested on the CPU, also with SR of X and W).

Checkpoints: under ddp and fsdp2 `torch.distributed.checkpoint` (sharded, `checkpoints/last.dcp/`)
plus the loop, loader, quantization and RNG state from rank 0 (`extra.pt`); they load on any
number of ranks and in a one-process run (DCP reshards). Only rank 0 writes the run directory
(summary, metrics, meta, config, run.log); a rank that raises writes `traceback.rank<r>.txt` and
exits non-zero, torchrun stops the others (SIGTERM, turned into an exception here) and rank 0
records the run as `failed`; a rank stuck in a collective fails after `parallel.timeout_s`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as torch_dist

from fp4.linear import QuantLinear

log = logging.getLogger("fp4_experiments.distributed")

DCP_DIR = "last.dcp"
EXTRA = "extra.pt"


class RankTerminated(SystemExit):
    """SIGTERM (torchrun stopping the ranks after another one failed), raised in the main thread."""


@dataclass
class Dist:
    """Where this process stands in the run: mode, rank, world size, backend (None: no group)."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: int = 600

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: Sequence[float], device) -> List[float]:
        """Sums over the ranks of python floats, in float64."""
        if not self.enabled:
            return [float(v) for v in values]
        dev = device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        torch_dist.all_reduce(t)
        return t.tolist()

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the mean over the ranks (a float32 tensor on the training device)."""
        if self.enabled and self.world_size > 1:
            torch_dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor


def torchrun_env() -> Optional[tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun's environment, None outside torchrun.

    A SLURM job step of several tasks (hydra-submitit-launcher's tasks_per_node=K) is read as
    torchrun would set it: submitit's TorchDistributedEnvironment exports RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the SLURM variables.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SLURM_PROCID" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def env_world_size() -> int:
    env = torchrun_env()
    return env[1] if env else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg, device: torch.device) -> tuple[Dist, torch.device]:
    """The run's Dist (process group made when one is needed) and its device (cuda:LOCAL_RANK)."""
    mode = str(cfg.parallel.name)
    timeout_s = int(cfg.parallel.timeout_s)
    env = torchrun_env()
    rank, world, local = env if env else (0, 1, 0)
    if mode == "none":
        if world > 1:
            from .validate import ConfigError
            raise ConfigError(f"torchrun started {world} processes but parallel=none; choose "
                              "parallel=ddp or parallel=fsdp2")
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        if env is None:  # parallel=ddp|fsdp2 without torchrun: a one-process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch_dist.init_process_group(backend, rank=rank, world_size=world,
                                      timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    dist = Dist(mode, rank, world, local, backend, timeout_s)
    if world > 1:
        _PREVIOUS_SIGTERM[:] = [signal.signal(signal.SIGTERM, _raise_terminated)]
    log.info("rank %d of %d (%s, %s on %s)", rank, world, mode, backend, device)
    return dist, device


_PREVIOUS_SIGTERM: list = []


def _raise_terminated(signum, frame):
    # Once: a second SIGTERM must not interrupt the failure being recorded (rank 0's summary).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise RankTerminated(f"rank {os.environ.get('RANK', '?')} terminated by signal {signum} "
                         "(torchrun stops every rank when one fails: see traceback.rank*.txt)")


def hold_termination(dist: Dist) -> None:
    """While a rank records its failure: torchrun's SIGTERM (sent when another rank failed first)
    must not cut the failed summary short, so it is ignored from here to shutdown()."""
    if dist.world_size > 1 and _PREVIOUS_SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    if dist.world_size > 1 and _PREVIOUS_SIGTERM:
        signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM.pop())


def param_dtype(cfg, device) -> Optional[torch.dtype]:
    """fsdp2's all-gather / compute dtype; None: the parameters' own (float32)."""
    name = cfg.parallel.param_dtype
    if name is None:
        name = str(cfg.hardware.autocast_dtype) if device.type == "cuda" else "float32"
    dtype = getattr(torch, str(name))
    return None if dtype == torch.float32 else dtype


def decoder_layers(model) -> List[torch.nn.Module]:
    return list(model.model.layers)


def wrap_model(model, cfg, dist: Dist, device):
    """Activation checkpointing (any mode), then DDP or fully_shard per decoder layer and root."""
    if cfg.parallel.activation_checkpointing:
        # The recomputation replays the QuantLinears' call indices (QuantState.replaying): the
        # same SR draws and signs as the forward it repeats, so the gradients are unchanged.
        states = {id(m.state): m.state for m in model.modules() if isinstance(m, QuantLinear)}
        replays = [s.replaying for s in states.values()]

        @contextlib.contextmanager
        def recompute():
            with contextlib.ExitStack() as stack:
                for replaying in replays:
                    stack.enter_context(replaying())
                yield

        def context_fn():
            return contextlib.nullcontext(), recompute()

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": context_fn})
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None)
    if dist.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=param_dtype(cfg, device), reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    """The module under a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return getattr(model, "module", model)


def allreduce_dtype(dist: Dist) -> Optional[str]:
    """The dtype gradients are reduced in (summary.json); None for one process."""
    return "float32" if dist.enabled else None


# -- checkpoints -------------------------------------------------------------------------------

def dcp_path(ckpt_path: Path) -> Path:
    return Path(ckpt_path).parent / DCP_DIR


def save_sharded(ckpt_path: Path, model, optimizer, extra: dict, dist: Dist) -> None:
    """DCP shards of model and optimizer + rank 0's `extra`, swapped in whole (a kill mid-save
    leaves the previous checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = dcp_path(ckpt_path)
    tmp = final.with_name(f".{DCP_DIR}.tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if dist.is_main:
        from .rundir import atomic_save
        atomic_save(tmp / EXTRA, lambda f: torch.save(extra, f))
        old = final.with_name(f".{DCP_DIR}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        Path(ckpt_path).unlink(missing_ok=True)  # an older one-process checkpoint is stale now
    dist.barrier()


def load_sharded(ckpt_path: Path, model, optimizer, device) -> dict:
    """Load DCP shards into `model` / `optimizer` (any number of ranks, or none); rank 0's extra."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    final = dcp_path(ckpt_path)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(final))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return torch.load(final / EXTRA, map_location=device, weights_only=False)
