"""``small4 bench tune-moe``: measures the fused-MoE block sizes per token count on this GPU.

The best tile shape of a grouped GEMM depends on how many tokens each expert sees (decode: a handful, so a small
BLOCK_M wastes less padding; prefill: hundreds, so big tiles reuse weights) and on the device. For each token count
T of a ladder, every candidate config of a small grid runs ``fused_moe`` on random weights of the real shapes
(128 experts, hidden 4096, width 2048, top-4; FP8 or BF16) with random routing, and the fastest wins. Consecutive
ladder points become inclusive token ranges (T_prev + 1 .. T), the last one open-ended. The result is a benchmark
JSON; ``--write-table`` also writes the table where ``fused_moe`` looks for it on this device. Grid configs that
the ahead-of-time compile check (``small4.kernels.aot``) recorded as over this architecture's shared memory or
spilling are dropped before timing, and listed in the result.

``--tiny`` runs tiny shapes and a two-config grid: a CPU smoke test of the plumbing (under ``TRITON_INTERPRET=1``),
not a tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from small4.bench.results import device_name, int_list, positive_int, write_result
from small4.kernels.moe_grid import FULL_GRID, candidates

FULL_SHAPES = {"experts": 128, "hidden": 4096, "width": 2048, "top_k": 4}
TINY_SHAPES = {"experts": 4, "hidden": 32, "width": 32, "top_k": 2}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192]
TINY_GRID = {"BLOCK_M": [16, 32], "BLOCK_N": [16], "BLOCK_K": [32], "num_warps": [4], "num_stages": [3]}


def make_problem(shapes: dict[str, int], dtype: str, device: torch.device, seed: int) -> dict[str, Any]:
    """Random expert weights (FP8 with per-expert scales, NVFP4 packed with block scales, or BF16/FP32) made
    directly on the device."""
    from small4.kernels.fp8 import FP8_DTYPE

    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = shapes["experts"], shapes["hidden"], shapes["width"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "nvfp4":  # random codes: the timing does not depend on the values
        u8, f8 = torch.uint8, torch.float8_e4m3fn

        def packed(out: int, inn: int) -> tuple[torch.Tensor, torch.Tensor]:
            codes = torch.randint(0, 256, (E, out, inn // 2), generator=g, device=device, dtype=u8)
            return codes, torch.ones(E, out, inn // 16, device=device).to(f8)

        w13, w2 = packed(2 * I, H), packed(H, I)
        glob13, glob2 = torch.full((E, 2), 448.0 * 6 * H**0.5, device=device), torch.full((E,), 2688.0, device=device)
        return {"nvfp4": (*w13, glob13, *w2, glob2), "act": act, "device": device}
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=act) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=act) * I**-0.5
    problem: dict[str, Any] = {"w13": w13, "w2": w2, "w13_scale": None, "w2_scale": None, "act": act, "device": device}
    if dtype == "fp8":
        problem["w13"], problem["w2"] = w13.to(FP8_DTYPE), w2.to(FP8_DTYPE)
        problem["w13_scale"] = torch.ones(E, 2, 1, device=device)
        problem["w2_scale"] = torch.ones(E, 1, 1, device=device)
    return problem


def _routing(tokens: int, shapes: dict[str, int], device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(tokens, shapes["experts"], generator=g, device=device)
    weights, ids = scores.softmax(-1).topk(shapes["top_k"], dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def time_config(
    problem: dict[str, Any], tokens: int, shapes: dict[str, int], config: dict[str, int], repeats: int
) -> float | None:
    """Median seconds of one ``fused_moe`` call; None when the config does not compile or run (e.g. shared memory)."""
    from small4.kernels.fused_moe import fused_moe, fused_moe_nvfp4

    device = problem["device"]
    x = torch.randn(tokens, shapes["hidden"], device=device, dtype=problem["act"])
    ids, weights = _routing(tokens, shapes, device, seed=tokens)

    def call() -> torch.Tensor:
        if "nvfp4" in problem:
            return fused_moe_nvfp4(x, *problem["nvfp4"], ids, weights, config=config)
        return fused_moe(
            x, problem["w13"], problem["w2"], ids, weights, problem["w13_scale"], problem["w2_scale"], config=config
        )

    try:
        call()  # compile
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - a config the compiler or the device rejects is simply not a candidate
        return None
    return statistics.median(times)


def to_table(best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ladder points -> inclusive token ranges: (previous point + 1 .. point), the first from 0, the last open."""
    rows, lo = [], 0
    for i, entry in enumerate(best):
        hi = entry["tokens"] if i < len(best) - 1 else 1 << 62
        rows.append({"lo": lo, "hi": hi, **entry["config"], "measured_us": entry["us"], "tuned_at": entry["tokens"]})
        lo = hi + 1
    return rows


def fitting(configs: list[dict[str, int]], dtype: str, fit: dict[str, Any] | None) -> tuple[list, list]:
    """(kept, dropped) grid configs: dropped are those the recorded compile check found over the target's shared
    memory or spilling registers (``python -m small4.kernels.aot --subset grid --write-fit``), and for NVFP4 those
    whose BLOCK_K is not a multiple of 32. Without a record for this GPU's architecture everything is kept."""
    kept, dropped = [], []
    for c in configs:
        entry = (fit or {}).get(dtype, {}).get(json.dumps(c, sort_keys=True))
        if dtype == "nvfp4" and c["BLOCK_K"] % 32:
            dropped.append({"config": c, "why": ["NVFP4 needs BLOCK_K a multiple of 32"]})
        elif entry is not None and not entry["fits"]:
            dropped.append({"config": c, "why": entry["why"]})
        else:
            kept.append(c)
    return kept, dropped


def _grid_fit(device: torch.device) -> dict[str, Any] | None:
    if device.type != "cuda":
        return None
    from small4.kernels.aot import load_grid_fit

    major, minor = torch.cuda.get_device_capability(device)
    return load_grid_fit(arch=10 * major + minor)


def tune(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], torch.device]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(device)
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    grid = TINY_GRID if args.tiny else FULL_GRID
    fit = None if args.tiny else _grid_fit(device)
    if fit is None and not args.tiny:
        print("  no recorded compile check for this GPU's architecture: every grid config is timed")
    configs, dropped = fitting(candidates(grid), args.dtype, fit)
    for d in dropped:
        print(f"  dropped {d['config']}: {'; '.join(d['why'])}")
    problem = make_problem(shapes, args.dtype, device, args.seed)
    best = []
    for tokens in sorted(set(args.tokens)):
        timed = [(time_config(problem, tokens, shapes, c, args.repeats), c) for c in configs]
        ok = [(t, c) for t, c in timed if t is not None]
        if not ok:
            raise RuntimeError(f"no candidate config ran at {tokens} tokens")
        seconds, config = min(ok, key=lambda tc: tc[0])
        best.append({"tokens": tokens, "config": config, "us": seconds * 1e6, "candidates_ok": len(ok)})
        print(f"  T={tokens:>6}: {config} {seconds * 1e6:.1f} us ({len(ok)}/{len(timed)} configs ran)")
    config = {
        "shapes": shapes,
        "dtype": args.dtype,
        "tokens": sorted(set(args.tokens)),
        "grid": grid,
        "dropped": dropped,
    }
    return config, {"best": best, "table": to_table(best)}, device


def main(args: argparse.Namespace) -> int:
    from small4.kernels.fused_moe import TUNED_DIR, table_path

    config, results, device = tune(args)
    path = write_result("tune-moe", config, results, out=args.out, device=device)
    print(f"wrote {path}")
    if args.write_table:
        name = device_name(device)
        table = table_path(name, Path(args.table_dir) if args.table_dir else TUNED_DIR)
        table.parent.mkdir(parents=True, exist_ok=True)
        record = {"device": name, "shapes": config["shapes"], "dtype": args.dtype, "table": results["table"]}
        table.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote the block-size table for {name} to {table}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``tune-moe`` under ``small4 bench``."""
    p = sub.add_parser("tune-moe", help="measure fused-MoE block sizes per token count on this GPU")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and grid (a CPU smoke run, not a tuning)")
    p.add_argument("--dtype", choices=["fp8", "bf16", "nvfp4"], default="fp8", help="expert weight storage")
    p.add_argument("--tokens", type=int_list, default=DEFAULT_TOKENS, help="token counts to tune at")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed calls per config (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON path (default: bench/results/tune-moe-<UTC time>.json)")
    p.add_argument("--write-table", action="store_true", help="also write the table fused_moe uses on this device")
    p.add_argument("--table-dir", help="where to write the table (default: small4/kernels/moe_configs)")
    p.set_defaults(func=main)
