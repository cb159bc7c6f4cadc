"""Data-parallel training under ``torchrun`` (which sets RANK, LOCAL_RANK and WORLD_SIZE): the
process group, and sums over every process."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch

__all__ = ["setup", "all_sum", "world_size", "rank"]


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device) -> Tuple[int, int]:
    """This process's rank and the world size, the process group started under torchrun
    (nccl on GPUs, this process's GPU made current; gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist  # only under torchrun

    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl needs this process's GPU as current
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: List[float], device) -> List[float]:
    """``values`` summed over every process (as they are without a process group)."""
    import torch.distributed as dist  # only under torchrun

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
