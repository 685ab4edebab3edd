"""FP8 (e4m3) weights with scales: dequantise, and quantise (for the tiny checkpoints and the benchmarks).

Plain PyTorch, and a leaf: the model (dequantising linears and experts), the weight loader and the FP8 kernels all
need this math, so it lives below all three and imports none of them.

A scale tensor of shape ``[..., so, si]`` (or a scalar) covers the weight ``[..., out, in]``: a scalar is
per-tensor, ``[E, 2, 1]`` is per expert and per half of a fused gate/up matrix (``so`` equal row groups).
DeepSeek-style block scales (``[ceil(out/b0), ceil(in/b1)]``) take the block size from the config's
``weight_block_size``, never from the scale's shape: with out = 320 and 128-row blocks the scale has 3 rows, and
320 / 3 would give 107-row blocks, misplacing two thirds of the scales. Scales are multipliers (the checkpoints'
``weight_scale_inv`` and ``qscale_weight`` both multiply the stored value).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


BlockSize = tuple[int, int]


def block_scale_shape(weight_shape: tuple[int, ...], block: BlockSize) -> tuple[int, ...]:
    """The scale shape a weight ``[..., out, in]`` has under ``block`` (rows, cols): ceil-divided, edges partial."""
    *lead, out, inn = weight_shape
    return (*lead, -(-out // block[0]), -(-inn // block[1]))


def _expand_scale(scale: torch.Tensor, weight_shape: torch.Size, block: BlockSize | None = None) -> torch.Tensor:
    """Repeats a scale so it has the weight's shape (cropped at the edge). ``block`` given: DeepSeek-style blocks
    of exactly that size (the scale must have ``block_scale_shape``); else ``so`` equal row groups and ``si``
    equal column groups (per tensor, per expert, per gate/up half)."""
    if scale.numel() == 1:
        return scale.reshape([1] * len(weight_shape))
    if scale.dim() == len(weight_shape) - 1 and len(weight_shape) == 3:
        scale = scale[:, None, None] if scale.dim() == 1 else scale
    if scale.dim() != len(weight_shape):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight shape {tuple(weight_shape)}")
    out, inn = weight_shape[-2], weight_shape[-1]
    so, si = scale.shape[-2], scale.shape[-1]
    if block is not None:
        want = block_scale_shape(tuple(weight_shape), block)
        if tuple(scale.shape[-2:]) != want[-2:]:
            raise ValueError(
                f"scale shape {tuple(scale.shape)} does not fit weight {tuple(weight_shape)} in {block} blocks"
            )
        rows, cols = block
    else:
        rows, cols = -(-out // so), -(-inn // si)
    expanded = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return expanded[..., :out, :inn]


def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: BlockSize | None = None
) -> torch.Tensor:
    """FP8 weight [..., out, in] times its scale (``block``: the config's weight_block_size), in float32, returned
    in ``dtype``."""
    w = weight.to(torch.float32)
    return (w * _expand_scale(scale.to(torch.float32), weight.shape, block)).to(dtype)


def quantize_fp8_blocks(weight: torch.Tensor, block: BlockSize) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block quantisation of ``[..., out, in]``: one float32 scale per ``block`` (edges partial)."""
    *lead, out, inn = weight.shape
    so, si = block_scale_shape(tuple(weight.shape), block)[-2:]
    padded = torch.zeros(*lead, so * block[0], si * block[1], dtype=torch.float32)
    padded[..., :out, :inn] = weight.float()
    tiles = padded.reshape(*lead, so, block[0], si, block[1])  # [..., so, b0, si, b1]
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)  # [..., so, si]
    q = (weight.float() / _expand_scale(scale, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax quantisation: returns (fp8 weight, float32 scalar scale) with weight ~= q * scale."""
    amax = weight.detach().abs().max().float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(())
