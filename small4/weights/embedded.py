"""The embedded default model: what `small4 generate` / `small4 serve` run when no model directory is given.

The shipped default is the tiny *trained* demo model (``small4/demo_model/checkpoint``, made by
``small4 train-demo``): the exact architecture at toy size, trained on synthetic chat, tool-call and image tasks, so
the first command a newcomer runs answers sensibly. If that directory is missing (a stripped install), a random
tiny checkpoint in the exact layout is written on first use into a per-user cache (``$SMALL4_CACHE`` or
``~/.cache/small4``), so the server still starts with no download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from small4.weights.tiny import make_tiny

EMBEDDED_NAME = "tiny-hf-seed0-v1"
SHIPPED_DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_model" / "checkpoint"


SHIPPED_DEMO_DRAFT_DIR = Path(__file__).resolve().parent.parent / "demo_model" / "draft"


def embedded_draft_dir() -> Path | None:
    """The shipped demo model's EAGLE draft (``small4 train-draft``), None when either is not shipped: a random
    tiny model has no draft made for it."""
    if embedded_model_dir() != SHIPPED_DEMO_DIR or not (SHIPPED_DEMO_DRAFT_DIR / "params.json").is_file():
        return None
    return SHIPPED_DEMO_DRAFT_DIR


def cache_root() -> Path:
    return Path(os.environ.get("SMALL4_CACHE", Path.home() / ".cache" / "small4"))


def embedded_model_dir() -> Path:
    """The trained demo checkpoint when shipped, else a random tiny one (created atomically on first use)."""
    if (SHIPPED_DEMO_DIR / "config.json").is_file() and (SHIPPED_DEMO_DIR / "tekken.json").is_file():
        return SHIPPED_DEMO_DIR
    return random_tiny_model_dir()


def random_tiny_model_dir() -> Path:
    target = cache_root() / EMBEDDED_NAME
    if (target / "tekken.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=EMBEDDED_NAME + ".", dir=target.parent))
    make_tiny(staging, layout="hf", seed=0)
    try:
        staging.rename(target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target
