"""Compute kernels and their plain-PyTorch twins; a leaf package (torch, triton and the standard library only).

The face is the backend choice: ``kernel_backend(device)`` reads ``SMALL4_KERNELS`` once per model build, and
``kernel_ops(backend)`` gives the ``KernelOps`` the model's modules keep. Kernel modules themselves are imported by
name (``small4.kernels.fused_moe``, ...): the Triton ones only once that backend is chosen.
"""

from small4.kernels.backend import Backend, kernel_backend, kernel_choice
from small4.kernels.registry import REFERENCE_OPS, KernelOps, apply_backend, kernel_ops

__all__ = ["REFERENCE_OPS", "Backend", "KernelOps", "apply_backend", "kernel_backend", "kernel_choice", "kernel_ops"]
