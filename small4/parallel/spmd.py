"""Same-program ranks for benchmarks: every rank runs the whole command in lockstep on its own shard.

``small4 bench full --tensor-parallel-size N`` starts N - 1 copies of its own command line with RANK set (as
torchrun would); each builds its shard of the random-weight model and runs the same measurements, so every model
call (and so every collective) happens on every rank in the same order. Decisions that could differ between
ranks (does this combo fit in free memory?) are agreed with ``agree_any``. Rank 0 reports.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from small4.parallel.launch import free_port
from small4.parallel.state import Dist, init_distributed

SPAWNED = "SMALL4_SPMD_RANK"


def start_ranks(argv: list[str], world_size: int, device: torch.device) -> tuple[Dist, list[subprocess.Popen]]:
    """Joins (a spawned rank) or starts (the first process) the group; returns it and the processes started."""
    if os.environ.get(SPAWNED) is not None:
        return init_distributed(device), []
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "small4.cli", *argv],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), SPAWNED: str(r)},
            stdout=subprocess.DEVNULL,
        )
        for r in range(1, world_size)
    ]
    return init_distributed(device, 0, world_size, ("127.0.0.1", port)), procs


def agree_any(flag: bool, d: Dist | None) -> bool:
    """True on every rank when it is true on any rank (``d`` None: one process, the flag as it is)."""
    if d is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.cpu_group)
    return bool(t.item())


def finish(procs: list[subprocess.Popen], timeout: float = 120.0) -> int:
    """Waits for the started ranks; the worst exit code among them (0 when all succeeded)."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    dist.destroy_process_group()
    return max([abs(c) for c in codes], default=0)
