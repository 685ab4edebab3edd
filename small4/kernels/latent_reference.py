"""Reference twin of ``latent_write.py``: the MLA latent write in plain PyTorch, with the model's own ops
(``norm_rope.py``).

Kept apart from the Triton module so that the model imports it without importing Triton (whose kernels read
``TRITON_INTERPRET`` when they are decorated).
"""

from __future__ import annotations

import torch

from small4.kernels.norm_rope import apply_rotary, rms_norm


def latent_write_reference(
    ckv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    slot_mapping: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain-PyTorch twin of ``latent_write``: the model's own ``rms_norm`` and ``apply_rotary``, so there is
    one implementation of the math.
    Differentiable (the demo model trains through it). Skipping negative slots takes a boolean index, a host sync
    on CUDA: fine here, since decode steps are only captured as CUDA graphs with the Triton kernels."""
    C = norm_weight.shape[0]
    c, k_rope = ckv.split([C, ckv.shape[-1] - C], dim=-1)
    c = rms_norm(c, norm_weight, eps)  # [T, C]
    k_rope = apply_rotary(k_rope, cos, sin, interleave)  # [T, R]
    latents = torch.cat([c, k_rope], dim=-1)  # [T, C + R]
    if slot_mapping is not None and kv_cache is not None:
        keep = slot_mapping >= 0
        kv_cache.view(-1, ckv.shape[-1])[slot_mapping[keep]] = latents[keep].to(kv_cache.dtype)
    return latents
