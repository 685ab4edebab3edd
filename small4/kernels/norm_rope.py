"""RMSNorm and rotary embedding math in plain PyTorch: the one implementation of both.

The model's layers (``model/layers.py``) call these, and so do the twins of fused kernels that take the weights as
arguments (``latent_reference.py``), which is why they live here, below the model: a kernel module never imports
the model.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The math of ``RMSNorm``, for twins of fused kernels that take the weight as an argument."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotates ``x`` [T, ..., dim]. Interleaved pairs (x0,x1),(x2,x3)… come out de-interleaved (all first members,
    then all second members), as the reference lays them out; q and k share the layout, so their dot product is
    the same."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
