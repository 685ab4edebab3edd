"""Timing and memory probes of the benchmarks: wall and device time of a call, a captured-graph replay, copy
bandwidth, free and peak device memory. Plain functions over torch; no model, no engine."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


# ---- timing -------------------------------------------------------------------------------------------------
def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn`` with the device drained before and after (what a synchronous engine step costs)."""
    sync_device(device)
    start = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - start


def time_device(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``, ``warmup`` calls first and excluded: CUDA events on a GPU, else host clock."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return [time_host(fn, device) for _ in range(repeats)]
    sync_device(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync_device(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def time_graph(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """``fn`` captured once as a CUDA graph and replayed (what the step costs without launch gaps); a capture that
    fails (a host sync or a host-to-device copy inside ``fn``) is recorded as the error, not raised."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        seconds = time_device(graph.replay, device, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - any capture failure is a result to report
        torch.cuda.synchronize(device)
        first = str(e).splitlines()[0] if str(e) else ""
        return {"status": "failed", "error": f"{type(e).__name__}: {first}"}
    return {"status": "ok", "ms_median": median_ms(seconds), "ms_all": [t * 1e3 for t in seconds]}


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Achievable device memory bandwidth: a large device-to-device copy, bytes read + written per second."""
    if device.type != "cuda":
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_device(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * nbytes / statistics.median(seconds)


# ---- memory -------------------------------------------------------------------------------------------------
def free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def gib(n: int) -> str:
    """Human-readable bytes (the name is historic: small sizes print in KiB or MiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
