"""The MoE block: softmax router, top-k (renormalised, scaled), routed experts plus the shared expert.

The module owns the math and the parameters; the expert computation itself is a kernel call, so the Triton
fused MoE and its reference twin are interchangeable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from small4.config import TextConfig
from small4.kernels.fp8 import dequantize_fp8
from small4.kernels.moe_reference import fused_moe_reference
from small4.kernels.nvfp4 import FP4_BLOCK, dequantize_nvfp4
from small4.kernels.registry import KernelOps, default_ops
from small4.model.layers import SwiGLU


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, renormalise them to sum to one, scale. -> (ids, weights) [T, k]."""
    scores = router_logits.softmax(dim=-1)  # [T, E]
    weights, ids = torch.topk(scores, k=top_k, dim=-1)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


class RoutedExperts(nn.Module):
    """All routed experts as two stacked tensors; FP8 weights keep their per-expert scales beside them.

    After ``to_nvfp4`` (the loader's ``keep_nvfp4``) the experts are 4-bit instead (kernels/nvfp4.py format):
    ``w13_packed`` U8 [E, 2I, H/2], ``w13_block_scale`` E4M3 [E, 2I, H/16], ``w13_global`` f32 [E, 2] (the
    stored divisors of the gate and up halves), ``w2_packed`` [E, H, I/2], ``w2_block_scale`` [E, H, I/16],
    ``w2_global`` [E]; ``w13`` / ``w2`` no longer exist. The Triton backend runs them as they are (weight-only
    4-bit, FP4 tiles dequantised in-kernel); the reference backend dequantises them for each call.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)
        self.w13_scale: torch.Tensor | None = None  # [E, 2, 1]: one scale per expert and per gate/up half
        self.w2_scale: torch.Tensor | None = None  # [E, 1, 1]
        self.w13_packed: nn.Parameter | None = None
        self.dims = (num_experts, hidden, intermediate)
        # expert parallelism (parallel/ep.py): routes (x, ids, weights) to the ranks holding the experts and calls
        # ``compute`` on this rank's share with local ids (-1: another rank's expert, skipped); None: one device
        self.dispatch = None
        self.ops: KernelOps = default_ops()

    def to_nvfp4(self) -> None:
        """Swaps the dense expert tensors for empty 4-bit ones (filled by the loader), on the same device."""
        E, H, I = self.dims
        dev = self.w13.device
        del self.w13, self.w2

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=dev), requires_grad=False)

        self.w13_packed = param(E, 2 * I, H // 2, dtype=torch.uint8)
        self.w2_packed = param(E, H, I // 2, dtype=torch.uint8)
        self.w13_block_scale = torch.empty(E, 2 * I, H // FP4_BLOCK, dtype=torch.float8_e4m3fn, device=dev)
        self.w2_block_scale = torch.empty(E, H, I // FP4_BLOCK, dtype=torch.float8_e4m3fn, device=dev)
        self.w13_global = torch.ones(E, 2, dtype=torch.float32, device=dev)
        self.w2_global = torch.ones(E, dtype=torch.float32, device=dev)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w13_packed is not None:
            return self._dequantized_nvfp4(dtype)
        if self.w13_scale is None:
            return self.w13.to(dtype), self.w2.to(dtype)
        return dequantize_fp8(self.w13, self.w13_scale, dtype), dequantize_fp8(self.w2, self.w2_scale, dtype)

    def _dequantized_nvfp4(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        E, H, I = self.dims
        # gate and up halves have their own divisor: view [E, 2I, .] as [E, 2, I, .] so each half gets one
        w13 = dequantize_nvfp4(
            self.w13_packed.view(E, 2, I, H // 2), self.w13_block_scale.view(E, 2, I, -1), self.w13_global, dtype
        ).view(E, 2 * I, H)
        return w13, dequantize_nvfp4(self.w2_packed, self.w2_block_scale, self.w2_global, dtype)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.dispatch is not None:
            return self.dispatch(self.compute, x, topk_ids, topk_weights)
        return self.compute(x, topk_ids, topk_weights)

    def compute(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The experts this module holds over ``x``; a negative id adds nothing (another rank holds that expert)."""
        if self.w13_packed is not None and self.ops.fused_moe_nvfp4 is not None:
            return self.ops.fused_moe_nvfp4(
                x,
                self.w13_packed,
                self.w13_block_scale,
                self.w13_global,
                self.w2_packed,
                self.w2_block_scale,
                self.w2_global,
                topk_ids,
                topk_weights,
            )
        if self.ops.fused_moe is not None:
            # FP8 weights go to the kernel as they are, with their scales; it dequantises tile by tile.
            return self.ops.fused_moe(x, self.w13, self.w2, topk_ids, topk_weights, self.w13_scale, self.w2_scale)
        w13, w2 = self.dense(x.dtype)
        return fused_moe_reference(x, w13, w2, topk_ids, topk_weights)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = SwiGLU(cfg.hidden_size, shared) if cfg.num_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.gate.weight.to(x.dtype))  # [T, E]
        ids, weights = route(
            logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob, self.cfg.routed_scaling_factor
        )
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
