"""Small building blocks shared by the decoder: norms, rotary embeddings, linear layers, the SwiGLU MLP.

Everything here is plain PyTorch and reads its shapes from the config objects; fast paths live in kernels/.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from small4.config import RopeConfig
from small4.kernels.fp8 import dequantize_fp8
from small4.kernels.fp8_linear import fp8_linear, row_scale, supports
from small4.kernels.norm_rope import apply_rotary, rms_norm
from small4.kernels.registry import KernelOps, default_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then cast back, as the reference does (weight applied after the cast)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A bias-free linear layer whose weight may stay in FP8 (e4m3) with its scale.

    With ``weight_scale`` set, the weight is FP8 in memory. When the model's kernels take FP8 linears
    (``self.ops.fp8_linear``, the Triton backend, set by ``Mistral4Model.set_backend``) and
    ``kernels.fp8_linear.supports`` the layer, it runs W8A8 through ``fp8_linear`` (static activation scale
    ``input_scale`` from the checkpoint, else dynamic per token); otherwise it is dequantised on the fly here.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight_scale: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self._fp8_plan: tuple[tuple, torch.Tensor | None] | None = None
        self.ops: KernelOps = default_ops()

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_scale is None:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None and self.ops.fp8_linear:
            scale = self._fp8_row_scale()
            if scale is not None:
                return fp8_linear(x, self.weight, scale, self.input_scale, x.dtype)
        return F.linear(x, self.dense_weight(x.dtype))

    def _fp8_row_scale(self) -> torch.Tensor | None:
        """The weight scale in ``fp8_linear``'s per-row form, or None when the kernel cannot take this layer.
        Worked out once (shape checks, one small copy, no host sync: safe under CUDA graphs) and cached until
        the weight or a scale tensor is replaced."""
        key = (self.weight, self.weight_scale, self.input_scale)
        plan = self._fp8_plan
        if plan is None or any(a is not b for a, b in zip(plan[0], key, strict=True)):
            ok = supports(self.weight, self.weight_scale, self.input_scale)
            plan = (key, row_scale(self.weight_scale, self.out_features) if ok else None)
            self._fp8_plan = plan
        return plan[1]


def yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies for ``dim`` rotary lanes, YaRN-blended exactly as transformers computes them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim  # [dim/2]
    pos_freqs = rope.theta**exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the lane keeps its original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary (flat) positions; the YaRN cos/sin factor is folded in.

    ``inv_freq`` is a plain float32 CPU tensor, not a buffer, so that casting the model to bf16 or building it
    on the meta device never degrades it; it follows the positions to their device on first use."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        self.inv_freq = yarn_inv_freq(rope, dim)
        self.factor = rope.cos_sin_factor
        self.interleave = rope.interleave

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        return (freqs.cos() * self.factor).to(dtype), (freqs.sin() * self.factor).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin, self.interleave)


def llama4_query_scale(positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama-4 attention temperature: queries at long positions are scaled up by 1 + beta*ln(1+floor(p/L))."""
    pos = positions.float()
    return 1 + rope.llama4_beta * torch.log(1 + torch.floor(pos / rope.llama4_original_max_position_embeddings))


class SwiGLU(nn.Module):
    """The shared expert: down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, H] matrix."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = Linear(hidden, 2 * intermediate)
        self.down = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
