"""Turns a freshly built Mistral4Model (usually on the meta device) into one rank's shard, gpt-fast ``tp.py`` style.

The model code stays single-device. This transform only
- gives split parameters their local shapes (heads of q_b / kv_b / o_proj, expert rows, shared-expert width),
- tells each attention module its local head count (its config is replaced by one with ``num_heads`` local),
- swaps the embedding and lm_head for vocab-parallel modules with the same parameter names,
- adds the collectives as forward hooks: one all-reduce after attention (o_proj is row-parallel, so its output is a
  partial sum), one after each MoE block (partial expert sums plus the partial shared expert), and, with expert
  parallelism, the experts' ``ExpertDispatch`` (ep.py: each rank runs only the assignments to its own experts).

The MLA latent cache is not split: every rank computes the same latents (kv_a is replicated) and keeps a full copy.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from small4.model.mistral4 import Mistral4Model
from small4.parallel.ep import ExpertDispatch
from small4.parallel.plan import ShardPlan


def _param(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=False)


def _resize_linear(linear: nn.Module, out_features: int | None = None, in_features: int | None = None) -> None:
    linear.out_features = out_features or linear.out_features
    linear.in_features = in_features or linear.in_features
    linear.weight = _param((linear.out_features, linear.in_features), linear.weight)


def _all_reduce_hook(group: dist.ProcessGroup | None):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the embedding table; other ids give zeros here and their rank fills them in the
    all-reduce. Keeps the parameter name ``weight``, so the loader and the runner see an ``nn.Embedding``."""

    def __init__(self, weight: torch.Tensor, start: int, stop: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = _param((stop - start, weight.shape[1]), weight)
        self.start, self.stop, self.group = start, stop, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)  # [T]
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine[:, None].to(self.weight.dtype)  # [T, hidden]
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """lm_head rows [start, stop): local logits [N, V / tp], gathered into [N, V] on every rank."""

    def __init__(self, weight: torch.Tensor, start: int, stop: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = _param((stop - start, weight.shape[1]), weight)
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [N, V / tp]
        if local.shape[0] == 0:  # every rank has the same (empty) sampling rows: no collective needed
            return local.new_empty(0, local.shape[1] * dist.get_world_size(self.group))
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def parallelize(model: Mistral4Model, plan: ShardPlan, group: dist.ProcessGroup | None = None) -> Mistral4Model:
    """Applies ``plan`` to ``model`` in place (before the weights are loaded) and returns it."""
    text = plan.text
    if plan.tp > 1:
        local_text = replace(text, num_heads=plan.heads.size)
        for layer in model.layers:
            attn = layer.self_attn
            attn.cfg = local_text
            q = attn.q_proj if text.q_lora_rank is None else attn.q_b_proj
            _resize_linear(q, out_features=plan.heads.size * text.qk_head_dim)
            _resize_linear(attn.kv_b_proj, out_features=plan.heads.size * (text.qk_nope_head_dim + text.v_head_dim))
            _resize_linear(attn.o_proj, in_features=plan.heads.size * text.v_head_dim)
            attn.register_forward_hook(_all_reduce_hook(group))
        v = plan.vocab
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, v.start, v.stop, group)
        model.lm_head = VocabParallelHead(model.lm_head.weight, v.start, v.stop, group)
    if plan.moe_parts > 1:
        for layer in model.layers:
            moe = layer.mlp
            experts, E, I, H = moe.experts, plan.experts.size, plan.inter.size, text.hidden_size
            experts.w13 = _param((E, 2 * I, H), experts.w13)
            experts.w2 = _param((E, H, I), experts.w2)
            experts.dims = (E, H, I)  # the local shapes ``to_nvfp4`` allocates (NVFP4 experts kept 4-bit)
            if plan.expert_parallel:
                experts.dispatch = ExpertDispatch(
                    plan.rank, plan.moe_parts, E, group, plan.parallel.all_to_all_min_tokens
                )
            if moe.shared_experts is not None:
                _resize_linear(moe.shared_experts.gate_up, out_features=2 * plan.shared.size)
                _resize_linear(moe.shared_experts.down, in_features=plan.shared.size)
            moe.register_forward_hook(_all_reduce_hook(group))
    model.requires_grad_(False)
    return model
