"""Checkpoint files to tensors: ``load_model`` (either layout, FP8 / NVFP4 kept or dequantised), its
``CheckpointError``, and the tiny random checkpoints tests and benchmarks write. Names resolve on first use
(``small4._face``)."""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it
_FACE = {
    "CheckpointError": "loader",
    "WeightLoader": "loader",
    "load_model": "loader",
    "TinySpec": "tiny",
    "make_tiny": "tiny",
    "embedded_model_dir": "embedded",
    "embedded_draft_dir": "embedded",
}

__all__ = sorted(_FACE)
__getattr__ = lazy_face(__name__, _FACE)
