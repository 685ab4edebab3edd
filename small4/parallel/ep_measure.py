"""Measures the expert dispatch's two strategies on this machine: ``python -m small4.parallel.ep_measure``.

Two gloo ranks on loopback (this process starts the second one with its rank on the command line) run one MoE
layer's routed experts (reference kernel, float32, H=1024, 16 experts, I=256, top-4) through the gather and the
all-to-all at several batch sizes, each followed by the MoE block's all-reduce, and print per rank: the time of
one call, the bytes sent off the rank and the assignments computed, beside what ran before the dispatch existed
("weight-0": every assignment computed, other ranks' at weight 0). The three outputs are checked
equal. The figures are in ARCHITECTURE.md.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.distributed as dist

from small4.kernels.moe_reference import fused_moe_reference
from small4.parallel.ep import ExpertDispatch, token_share

H, E, I, K, WORLD = 1024, 16, 256, 4, 2
SIZES = (1, 4, 16, 64, 256, 1024)


def off_rank_bytes(ids: torch.Tensor, rank: int, local: int, all_to_all: bool) -> int:
    """The ring all-reduce's 2 (n-1)/n of [T, H] fp32, plus for the all-to-all the counts, and the rows and routing
    sent to the other rank and received back."""
    T = ids.shape[0]
    total = int(2 * (WORLD - 1) / WORLD * T * H * 4)
    if all_to_all:
        start, stop = token_share(T, WORLD, rank)
        owner = ids[start:stop] // local  # [t, k]
        rows = sum(int((owner == r).any(1).sum()) for r in range(WORLD) if r != rank)
        total += WORLD * 8 + rows * (2 * H * 4 + 2 * K * 4)
    return total


def weight0(experts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, first: int) -> torch.Tensor:
    """What expert parallelism did before the dispatch: other ranks' assignments run on local expert 0 at weight 0."""
    mine = (ids >= first) & (ids < first + E // WORLD)  # [T, k]
    return experts(x, torch.where(mine, ids - first, 0), w * mine)


def run_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(0)
    local = E // WORLD
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5)[rank * local : (rank + 1) * local]  # [E / n, 2I, H]
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5)[rank * local : (rank + 1) * local]  # [E / n, H, I]
    done = [0]

    def experts(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        done[0] += int((ids >= 0).sum())
        return fused_moe_reference(x, w13, w2, ids, w)

    for T in SIZES:
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, k]
        w = torch.rand(T, K, generator=g)
        line, outs = [f"T={T:5d}"], []
        for name, threshold in (("weight-0", 0), ("gather", None), ("all_to_all", 1)):
            dispatch, reps = ExpertDispatch(rank, WORLD, local, None, threshold or None), 5 if T <= 256 else 2
            for i in range(reps + 1):  # the first call warms up
                if i == 1:
                    dist.barrier()
                    t0, done[0] = time.perf_counter(), 0
                out = weight0(experts, x, ids, w, rank * local) if threshold == 0 else dispatch(experts, x, ids, w)
                dist.all_reduce(out)
            ms = (time.perf_counter() - t0) / reps * 1e3
            kb = off_rank_bytes(ids, rank, local, threshold is not None and threshold > 0) / 1e3
            line.append(f"{name} {ms:7.2f} ms {kb:8.1f} kB {done[0] // reps} assignments")
            outs.append(out)
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)
        if rank == 0:
            print(" | ".join(line), flush=True)
    dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) == 3:
        run_rank(int(sys.argv[1]), int(sys.argv[2]))
        return
    port = 29000 + int(time.time()) % 1000
    peer = subprocess.Popen([sys.executable, "-m", "small4.parallel.ep_measure", "1", str(port)])
    run_rank(0, port)
    sys.exit(peer.wait())


if __name__ == "__main__":
    main()
