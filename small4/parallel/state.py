"""Process groups: one for tensors (NCCL on GPUs, gloo on CPU) and one gloo group on the CPU for control bytes.

Ranks meet through torch.distributed's env rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``: what torchrun sets, and what ``launch`` sets for the local workers). Every collective has a
timeout ($SMALL4_DIST_TIMEOUT), so a rank that hangs or dies turns into an error on the others rather than a silent
wait; joining has its own, longer one ($SMALL4_DIST_JOIN_TIMEOUT), since ranks start at different speeds.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # $SMALL4_DIST_TIMEOUT; generous: first steps compile kernels on every rank


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup | None  # tensors: the default group (NCCL or gloo)
    cpu_group: dist.ProcessGroup | None  # control messages: always gloo, on CPU tensors

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"${name} is not set (the launcher or torchrun sets it)")
        return default
    return int(value)


def init_distributed(
    device: torch.device,
    rank: int | None = None,
    world_size: int | None = None,
    master: tuple[str, int] | None = None,
    timeout_s: float | None = None,
    local_rank: int | None = None,
) -> Dist:
    """Joins the process group (from the arguments, else the environment torchrun sets); ``device`` is the engine's
    device kind (the rank's GPU is ``cuda:LOCAL_RANK``)."""
    rank = env_int("RANK") if rank is None else rank
    world = env_int("WORLD_SIZE") if world_size is None else world_size
    local_rank = env_int("LOCAL_RANK", rank) if local_rank is None else local_rank
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("SMALL4_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init = "env://" if master is None else f"tcp://{master[0]}:{master[1]}"
    # the rendezvous waits for every rank to start (imports, CUDA init); the steps' collectives get ``timeout``
    join = timedelta(seconds=max(timeout.total_seconds(), float(os.environ.get("SMALL4_DIST_JOIN_TIMEOUT", 300))))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=join)
    group = dist.new_group(backend=backend, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else group
    return Dist(rank, world, local_rank, device, group, cpu_group)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Ends a rank's process after a clean stop without tearing its process group down. Once a peer has gone (a
    follower after rank 0, the store's host; rank 0 after its followers), gloo's threads can abort the process at
    teardown or at interpreter exit ("terminate called without an active exception", exit -6): seen on both sides
    in CI. The stop itself was already agreed by message; logs are flushed first and the OS frees the rest."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
