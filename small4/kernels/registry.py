"""The kernels a model runs, chosen once when the model is built for its device and kept on each module.

mini-sglang's habit: a small registry of ops per backend. ``kernel_ops(backend)`` gives one ``KernelOps`` (the
callable of each op, or None where the backend has no kernel and the module's own reference path runs); the
model hands it to every module that calls a kernel (``Mistral4Model.set_backend``), so a ``forward`` reads
``self.ops`` and never the environment, and never imports Triton. The Triton modules are imported here, when that
backend is chosen: they read ``TRITON_INTERPRET`` when their kernels are decorated, and CPU-only installs may lack
Triton altogether.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from small4.kernels.backend import Backend, kernel_choice
from small4.kernels.latent_reference import latent_write_reference


@dataclass(frozen=True)
class KernelOps:
    """One backend's ops. ``latent_write`` always exists (its twin is the reference); ``mla_decode`` (decode-only
    absorbed attention), ``fused_moe`` / ``fused_moe_nvfp4`` (routed experts) are None on the reference backend,
    and ``fp8_linear`` says whether FP8 linears multiply through ``torch._scaled_mm`` (W8A8) or dequantise."""

    backend: Backend
    latent_write: Callable[..., torch.Tensor]
    mla_decode: Callable[..., torch.Tensor] | None = None
    fused_moe: Callable[..., torch.Tensor] | None = None
    fused_moe_nvfp4: Callable[..., torch.Tensor] | None = None
    fp8_linear: bool = False


REFERENCE_OPS = KernelOps(backend="reference", latent_write=latent_write_reference)


def kernel_ops(backend: Backend) -> KernelOps:
    """The ops of ``backend`` ("reference" or "triton"). Not cached: each call reads the kernel modules' current
    attributes, so a model built later sees what is there then."""
    if backend == "reference":
        return REFERENCE_OPS
    if backend != "triton":
        raise ValueError(f"unknown kernel backend {backend!r}")
    from small4.kernels import fused_moe, latent_write, mla_decode  # Triton, imported only when chosen

    return KernelOps(
        backend="triton",
        latent_write=latent_write.latent_write,
        mla_decode=mla_decode.mla_decode,
        fused_moe=fused_moe.fused_moe,
        fused_moe_nvfp4=fused_moe.fused_moe_nvfp4,
        fp8_linear=True,
    )


def apply_backend(module: torch.nn.Module, backend: Backend) -> None:
    """Hands ``backend``'s ops to every submodule of ``module`` that calls a kernel (those with a ``KernelOps`` as
    ``ops``): one choice for a whole model, or for a draft model built beside it."""
    ops = kernel_ops(backend)
    for sub in module.modules():
        if isinstance(getattr(sub, "ops", None), KernelOps):
            sub.ops = ops


def default_ops() -> KernelOps:
    """What a module starts with, before its model is placed on a device: the Triton kernels when
    ``SMALL4_KERNELS=triton`` forces them, else the reference (``auto`` is resolved by ``set_backend`` once the
    device is known)."""
    return kernel_ops("triton" if kernel_choice() == "triton" else "reference")
