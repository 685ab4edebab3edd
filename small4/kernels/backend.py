"""Which implementation of each kernel runs: the Triton kernels or their plain-PyTorch reference twins.

``SMALL4_KERNELS=reference`` runs the whole engine without Triton; ``triton`` forces the kernels (on a CPU only
under ``TRITON_INTERPRET=1``, which is how CI tests them); ``auto`` (the default) uses Triton on CUDA devices.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["reference", "triton"]


def kernel_choice() -> Literal["auto", "reference", "triton"]:
    """``SMALL4_KERNELS`` as set (validated), before a device resolves ``auto``."""
    choice = os.environ.get("SMALL4_KERNELS", "auto")
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"SMALL4_KERNELS must be auto, reference or triton, got {choice!r}")
    return choice


def kernel_backend(device: torch.device) -> Backend:
    """The backend for a model on ``device``. Read when a model is built or placed (``Mistral4Model.set_backend``),
    never inside a forward."""
    choice = kernel_choice()
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("SMALL4_KERNELS=triton on a CPU needs TRITON_INTERPRET=1")
    return choice
