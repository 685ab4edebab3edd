"""Benchmark results as JSON files that say where they came from.

A number is only worth quoting with the machine, the software and the code that produced it (DESIGN habit 10),
so every result is wrapped in the same envelope: device name, torch version, thread count, git commit (and
whether the tree was dirty), UTC timestamp, the benchmark's config, then its measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

DEFAULT_DIR = Path("bench/results")
_REPO = Path(__file__).resolve().parents[2]


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's marketing name when running on CUDA, else the CPU model (what a reader compares against)."""
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        return torch.cuda.get_device_name(dev)
    return _cpu_model()


def _device_type(device: torch.device | str | None) -> str:
    if device is not None:
        return torch.device(device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_average() -> float | None:
    """The 1-minute load when the result is written (our own run included): a busy machine explains slow numbers."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> str | None:
    """HEAD of the checkout small4 runs from; None outside a git checkout (e.g. an installed wheel)."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD, i.e. whether the commit alone does not reproduce the numbers."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Everything about the run that is not the benchmark's own config."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": _device_type(device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": _load_average(),
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


def default_path(benchmark: str, directory: Path = DEFAULT_DIR) -> Path:
    """``bench/results/<benchmark>-<UTC time>.json`` (relative to the working directory): never overwrites."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return directory / f"{benchmark}-{stamp}.json"


def write_result(
    benchmark: str,
    config: dict[str, Any],
    results: dict[str, Any],
    out: str | Path | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Writes ``{benchmark, environment..., config, results}`` as indented JSON and returns the path."""
    path = Path(out) if out is not None else default_path(benchmark)
    record = {"benchmark": benchmark, **environment(device), "config": config, **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def positive_int(text: str) -> int:
    """argparse type for counts and sizes that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers ("1,8,64")."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values
