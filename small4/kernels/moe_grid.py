"""The fused-MoE tile configs ``small4 bench tune-moe`` may pick: its grid, and the grid's configs one by one.

Kept among the kernels (not in the benchmark) because the ahead-of-time compile check (``aot.py``) compiles the same
grid, and kernel modules import only other kernel modules.
"""

from __future__ import annotations

import itertools

FULL_GRID = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [64, 128],
    "BLOCK_K": [64, 128],
    "num_warps": [4, 8],
    "num_stages": [3, 4],
}


def candidates(grid: dict[str, list[int]]) -> list[dict[str, int]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
