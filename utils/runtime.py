"""Where and how a script runs: processes (torchrun), device, mixed precision, seeds."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import sys
from datetime import timedelta
from typing import Callable, NamedTuple, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from utils.errors import UserInputError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
T = TypeVar("T")


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
    if "TORCHELASTIC_RUN_ID" in os.environ or world_size > 1:
        stop_with_launcher()
    if world_size == 1:
        return Distributed(0, 1, 0)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Distributed(torch_dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def stop_with_launcher() -> None:
    """Let the kernel kill this process (SIGKILL) when its parent, the ``torchrun`` launcher,
    dies: otherwise killing the launcher leaves its workers training (Linux only; elsewhere a
    no-op). If the launcher is already gone, exit at once."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def run_on_main(dist: Distributed, action: Callable[[], T]) -> Optional[T]:
    """``action()`` on process 0 only (None elsewhere). A UserInputError there is raised on
    every process with the same message, so that no process waits for a peer that stopped."""
    result, error = None, None
    if dist.is_main:
        try:
            result = action()
        except UserInputError as exc:
            error = exc
    if dist.world_size > 1:
        message = [None if error is None else str(error)]
        torch_dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = UserInputError(message[0])
    if error is not None:
        raise error
    return result


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
    """The autocast dtype of a ``mixed_precision`` setting: ``bf16`` and ``fp16`` on any
    device (CPU autocast is how the tests reach the mixed-precision code), ``none`` full
    precision, ``auto`` bf16 on CUDA where supported, else fp16 on CUDA, off elsewhere."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (configs keep seeds in [0, 2**32 - 1], see
    ``utils.config.seed_range``; a process adds its rank)."""
    if seed < 0:
        raise UserInputError(f"seed must be >= 0, got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the worker's torch seed."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


_PEAK_RSS_RUNNER = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run_script_with_peak_rss(script, args, **run_kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """Run the Python ``script`` with ``args`` in a new process (``subprocess.run`` keywords:
    cwd, env, timeout, ...); returns (the finished process, its peak RSS in bytes, or -1 when
    it failed). For benchmarks and memory tests."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_RUNNER, str(script),
                             *map(str, args)], capture_output=True, text=True, **run_kwargs)
    peaks = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK_RSS")]
    return result, int(peaks[-1]) if result.returncode == 0 and peaks else -1
