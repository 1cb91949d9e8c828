"""Several processes, one model: the torchrun side of data-parallel training.

Data parallelism (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", sec. 3): every process (rank) holds a full copy of the model, draws its own
share of the batch, and the gradients are averaged over ranks before each optimiser step, so the
copies stay identical. ``torchrun --nproc_per_node=N`` starts the N processes and tells each its
place through environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
``init_distributed`` reads them and joins the process group (NCCL between CUDA GPUs, Gloo on
CPUs). The averaging itself is DistributedDataParallel inside ``train.train(distributed=True)``.

    torchrun --nproc_per_node=4 -m fewstep_lab train --method edm --data cifar10 --profile gpu --out runs/edm.pt
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .profiles import get_device

__all__ = ["DistInfo", "init_distributed", "close_distributed", "rank_batch_size"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, its device and the backend (None alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prints, evaluates and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; start the "
                         "processes with torchrun, which sets it") from None


def init_distributed(device=None, backend: str | None = None) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, else gloo); a single process (no WORLD_SIZE) stays alone.

    `device` as in profiles.get_device; under torchrun with CUDA each rank takes cuda:LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return DistInfo(0, 1, 0, get_device(device), None)
    missing = [v for v in TORCHRUN_VARS + ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start the processes with "
                           "`torchrun --nproc_per_node=N ...`, which sets them all")
    rank, world, local = (_env_int(v) for v in TORCHRUN_VARS)
    device = get_device(device)
    if device.type == "cuda":
        # One GPU per process: rank r on this node takes GPU LOCAL_RANK.
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): "
                               "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device, backend)


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """The batch each rank draws: the recipe's (global) batch split evenly, so N GPUs train like one."""
    if batch_size % world_size:
        raise ValueError(f"the batch size {batch_size} does not split evenly over {world_size} processes; "
                         f"choose a multiple of {world_size} (dataclasses.replace(recipe, batch_size=...))")
    return batch_size // world_size
