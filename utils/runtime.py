"""Where and how a script runs: processes (torchrun), device, mixed precision, seeds."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as torch_dist

from utils.errors import UserInputError


class Distributed(NamedTuple):
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """One process, or the process group that torchrun describes in WORLD_SIZE, RANK and
    LOCAL_RANK (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, 0)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Distributed(torch_dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def teardown_distributed(dist: Distributed) -> None:
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def select_device(name: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` (cuda > mps > cpu) or an explicit device such as ``cpu``, ``cuda``, ``cuda:1``,
    ``mps``. With several processes, ``cuda`` means this process's GPU (its local rank).
    ``key`` names the config key in error messages."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"{key}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or "
                             "mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{key} is {name!r} but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"{key} is {name!r} but MPS is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(device: torch.device, mode: str) -> Optional[torch.dtype]:
    """Mixed precision on CUDA only: ``auto`` = bf16 where supported, else fp16."""
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the worker's torch seed."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
