"""The embedded default model: what `small4 generate` / `small4 serve` run when no model directory is given.

It is a tiny checkpoint in the exact real layout, written on first use by the make-tiny code into a per-user
cache (``$SMALL4_CACHE`` or ``~/.cache/small4``) and reused afterwards, so the README's main command works on any
machine with no download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from small4.weights.tiny import make_tiny

EMBEDDED_NAME = "tiny-hf-seed0-v1"


def cache_root() -> Path:
    return Path(os.environ.get("SMALL4_CACHE", Path.home() / ".cache" / "small4"))


def embedded_model_dir() -> Path:
    """Path of the embedded tiny model, creating it atomically (temp dir + rename) if it is not there yet."""
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
