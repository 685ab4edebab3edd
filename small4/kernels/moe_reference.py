"""Reference twin of the fused MoE kernel: routed experts applied to sorted token groups.

Same signature as the Triton kernel: tokens [T, H], fused gate/up weights w13 [E, 2I, H] and down weights
w2 [E, H, I] (dense here; FP8 with scales is dequantised by the caller), top-k expert ids and weights [T, k].
Returns sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x)); a negative id is an assignment another rank computes
(expert parallelism) and adds nothing. A loop over the experts that received tokens:
slow and obviously correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from small4.kernels.nvfp4 import dequantize_nvfp4


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    T, k = topk_ids.shape
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)  # [T * k]
    order = torch.argsort(flat_ids, stable=True)
    skipped = int((flat_ids < 0).sum())  # another rank's experts (expert parallelism): they sort first, add nothing
    order = order[skipped:]
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start : start + count]  # positions in the flat [T * k] assignment list
        start += count
        tokens = slots // k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w2[expert])  # [n, H]
        y = y * topk_weights.reshape(-1)[slots, None].to(y.dtype)
        out.index_add_(0, tokens, y)
    return out


def fused_moe_nvfp4_reference(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_block_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_block_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Twin of ``fused_moe_nvfp4``: the weights dequantised to x's dtype (gate and up halves each with their own
    divisor, ``w13_global`` [E, 2]), then ``fused_moe_reference``."""
    I = w13_packed.shape[1] // 2
    gate = dequantize_nvfp4(w13_packed[:, :I], w13_block_scale[:, :I], w13_global[:, 0], x.dtype)  # [E, I, H]
    up = dequantize_nvfp4(w13_packed[:, I:], w13_block_scale[:, I:], w13_global[:, 1], x.dtype)  # [E, I, H]
    w2 = dequantize_nvfp4(w2_packed, w2_block_scale, w2_global, x.dtype)  # [E, H, I]
    return fused_moe_reference(x, torch.cat([gate, up], dim=1), w2, topk_ids, topk_weights)
