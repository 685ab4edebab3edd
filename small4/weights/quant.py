"""FP8 (e4m3) weights with scales: dequantise on CPU, quantise for the tiny checkpoints.

A scale tensor of shape ``[..., so, si]`` (or a scalar) covers the weight ``[..., out, in]`` in ``so x si`` equal
blocks: a scalar is per-tensor, ``[E, 2, 1]`` is per expert and per half of a fused gate/up matrix, ``[out/128,
in/128]`` is DeepSeek-style blocks. One broadcast rule serves all of them. Scales are multipliers (the
checkpoints' ``weight_scale_inv`` and ``qscale_weight`` both multiply the stored value).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def _expand_scale(scale: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Repeats a block scale so it has the weight's shape (ceil-divided blocks, cropped at the edge)."""
    if scale.numel() == 1:
        return scale.reshape([1] * len(weight_shape))
    if scale.dim() == len(weight_shape) - 1 and len(weight_shape) == 3:
        scale = scale[:, None, None] if scale.dim() == 1 else scale
    if scale.dim() != len(weight_shape):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight shape {tuple(weight_shape)}")
    out, inn = weight_shape[-2], weight_shape[-1]
    so, si = scale.shape[-2], scale.shape[-1]
    rows, cols = -(-out // so), -(-inn // si)
    expanded = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return expanded[..., :out, :inn]


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 weight [..., out, in] times its (block) scale, computed in float32 and returned in ``dtype``."""
    w = weight.to(torch.float32)
    return (w * _expand_scale(scale.to(torch.float32), weight.shape)).to(dtype)


def quantize_fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax quantisation: returns (fp8 weight, float32 scalar scale) with weight ~= q * scale."""
    amax = weight.detach().abs().max().float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(())
