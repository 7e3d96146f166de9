"""Which share of the work this process does, and waiting for the others, under `accelerate launch`.

Outside a launch (WORLD_SIZE unset or 1) a process can still take a share given by hand
(`--slide-shard INDEX/COUNT`); under a launch the rank and world size decide.

On a machine without GPUs, processes started by `accelerate launch --multi_gpu` (or torchrun) must
tell accelerate to run on the CPU, with gloo; otherwise each one thinks it runs alone. (accelerate's
own `--cpu`/`MULTI_CPU` launch starts one process unless MPI is set up, so it is not used here.)
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_share(index: int = 0, count: int = 1) -> tuple[int, int]:
    """(index, count) of this process among those `accelerate launch` started, else the one given."""
    world = world_size()
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (index, count)


def cpu_only() -> bool:
    """No GPU to run on: what accelerate's `cpu=` must say for a multi-process launch to join up."""
    import torch

    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def barrier() -> None:
    """Wait for every process of a launch (no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu_only()).wait_for_everyone()


def end_with_parent(parent_pid: int) -> None:
    """Make this (worker) process die with its parent, even a parent killed with SIGKILL, which runs no
    clean-up: Linux's PR_SET_PDEATHSIG; elsewhere nothing. Exits at once if the parent is already gone."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
