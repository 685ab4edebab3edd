"""NVFP4 (compressed-tensors ``nvfp4-pack-quantized``): the format's math in plain PyTorch.

One definition of the format that the loader, the tiny-checkpoint writer, the model's dequantised path and the
Triton kernels' twins all share, so they cannot disagree on a convention:

- values are FP4 E2M1 (sign bit 3, magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``), two per byte: element ``2j`` in
  the low nibble, ``2j + 1`` in the high nibble (``weight_packed`` U8 ``[out, in / 2]``);
- one FP8 E4M3 scale per 16 consecutive input values (``weight_scale`` ``[out, in / 16]``);
- one float32 ``weight_global_scale`` per tensor, stored as a *divisor* (``FP8_MAX * FP4_MAX / amax``), so the
  value is ``e2m1 * weight_scale / weight_global_scale``. Kernels take its reciprocal (a multiplier).

Hopper has no FP4 tensor cores: small4 serves NVFP4 as weight-only 4-bit (dequantised in-kernel to BF16 tiles).
"""

from __future__ import annotations

import torch

FP4_BLOCK = 16
FP4_MAX = 6.0
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code points of E2M1 as float32, indexed by the 4-bit code (bit 3 is the sign)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """U8 ``[..., n / 2]`` -> float32 ``[..., n]`` E2M1 values (low nibble first)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be uint8, got {packed.dtype}")
    low = (packed & 0x0F).long()
    high = (packed >> 4).long()
    codes = torch.stack([low, high], dim=-1).flatten(-2)  # [..., n]
    return e2m1_table(packed.device)[codes]


def _nearest_e2m1_code(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already scaled into [-6, 6]) to the nearest E2M1 code, ties to the even code."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    dist = (x.abs().clamp(max=FP4_MAX)[..., None] - mags).abs()  # [..., 8]
    nearest = dist == dist.amin(dim=-1, keepdim=True)  # one candidate, or two at a mid-point
    odd = (torch.arange(8, device=x.device) % 2).expand_as(dist)
    code = torch.where(nearest, odd, 2).argmin(dim=-1)  # the even code (even mantissa) wins a tie
    return torch.where(x < 0, code + 8, code).to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., n]`` (uint8, values < 16) -> U8 ``[..., n / 2]``, low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of values per row")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., out, in]`` -> (packed U8 ``[..., out, in/2]``, E4M3 scales ``[..., out, in/16]``, global divisor).

    The global scale is one float32 scalar per call (per tensor), as compressed-tensors writes it.
    """
    if weight.shape[-1] % FP4_BLOCK:
        raise ValueError(f"NVFP4 needs the input dim to be a multiple of {FP4_BLOCK}, got {weight.shape[-1]}")
    w = weight.detach().float()
    amax = w.abs().max().clamp(min=1e-12)
    global_scale = (FP8_E4M3_MAX * FP4_MAX) / amax
    blocks = w.reshape(*w.shape[:-1], -1, FP4_BLOCK)  # [..., out, in/16, 16]
    block_amax = blocks.abs().amax(dim=-1)
    scale_fp8 = (block_amax / FP4_MAX * global_scale).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    step = scale_fp8.float() / global_scale  # [..., out, in/16]
    scaled = torch.where(step[..., None] > 0, blocks / step[..., None].clamp(min=1e-30), torch.zeros_like(blocks))
    codes = _nearest_e2m1_code(scaled).reshape(w.shape)
    return pack_fp4(codes), scale_fp8, global_scale.reshape(())


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed ``[..., out, in/2]`` + E4M3 ``[..., out, in/16]`` + divisor (scalar or ``[...]``) -> ``[..., out, in]``.

    The divisor is a scalar (per tensor) or one per leading index (per expert).
    """
    values = unpack_fp4(packed)  # [..., out, in]
    step = block_scale.float()
    g = global_scale.float()
    if g.dim() > 0 and g.numel() > 1:
        g = g.reshape(*g.shape, *([1] * (step.dim() - g.dim())))
    step = step / g  # [..., out, in/16]
    out = values.reshape(*values.shape[:-1], -1, FP4_BLOCK) * step[..., None]
    return out.reshape(values.shape).to(dtype)
