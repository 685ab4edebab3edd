"""Multi-head latent attention (DeepSeek-V2/V3 MLA as Mistral Small 4 uses it).

Per token the cache holds only ``kv_lora_rank + qk_rope_head_dim`` values: the normalised latent ``c`` and the
roped shared key. Two mathematically equal ways to attend over it:
- ``naive`` (expanded): ``kv_b_proj`` turns each cached latent into per-head K/V (128-wide), then plain attention
  through ``scaled_dot_product_attention`` (flash attention on a GPU: no [Q, K] score matrix in memory). Per
  (query, key) pair this is 2.2x fewer FLOPs than the absorbed form, at the price of expanding every context row
  once per step: the right trade for prefill chunks.
- ``absorb``: fold ``W_UK`` into the query and ``W_UV`` into the output so attention runs in the 256-wide latent
  space and the cache is never expanded: the right trade for decode (one query reads the whole context).
- ``auto`` (the engine's default): decode rows absorbed, prefill/extend chunks expanded, in the same step.
  An absorbed extend kernel would win below about 300 queries per sequence (speculative decoding); until then
  every multi-token chunk is expanded.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from small4.config import TextConfig
from small4.kernels.latent_reference import latent_write_reference
from small4.kernels.mla_reference import gather_context, mla_attention_absorbed
from small4.kernels.registry import KernelOps, default_ops
from small4.model.context import AttentionMetadata
from small4.model.layers import Linear, RMSNorm, RotaryEmbedding, llama4_query_scale

AttnImpl = Literal["auto", "naive", "absorb"]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, D], k [K, H, D], v [K, H, Dv] -> [Q, H, Dv]; the queries are the last Q of the K positions
    (bottom-right causal), so a chunk that extends a cached prefix sees all of it."""
    num_q, num_k = q.shape[0], k.shape[0]
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
    if num_q == num_k:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:  # imported here: torch.nn.attention.bias pulls in torch._dynamo (and Triton), a second of import time
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(num_q, num_k), scale=scale)
    return out[0].transpose(0, 1)


class MLAttention(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = rotary
        H, nope, rope, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, H * cfg.qk_head_dim)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + rope)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (nope + v))
        self.o_proj = Linear(H * v, cfg.hidden_size)
        self.impl: AttnImpl = "auto"
        self.ops: KernelOps = default_ops()

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        q = self._query(x).view(T, cfg.num_heads, cfg.qk_head_dim)  # [T, H, nope + rope]
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        ckv = self.kv_a_proj_with_mqa(x)  # [T, C + R]
        cos, sin, q_scale = meta.rope_tables(positions, x.dtype, lambda: self._rope_tables(positions, x.dtype))
        q_rope = self.rotary.apply(q_rope, cos, sin)  # [T, H, R]
        q_nope, q_rope = q_nope * q_scale, q_rope * q_scale
        # the Triton kernel has no backward: the demo model trains through the twin
        write_latents = latent_write_reference if ckv.requires_grad else self.ops.latent_write
        norm, slots = self.kv_a_layernorm, meta.slot_mapping if kv_cache is not None else None
        # [c, k_rope] = [kv_a_layernorm(c), rope(k_rope)]: [T, C + R], also cast into the cache at the token's slot
        latents = write_latents(ckv, norm.weight, norm.eps, cos, sin, self.rotary.interleave, slots, kv_cache)
        if self.impl == "absorb":
            out = self._attend_absorbed(q_nope, q_rope, latents, meta, kv_cache)
        elif self.impl == "naive":
            out = self._attend_expanded(q_nope, q_rope, latents, meta, kv_cache)
        else:
            out = self._attend_split(q_nope, q_rope, latents, meta, kv_cache)
        return self.o_proj(out.reshape(T, cfg.num_heads * cfg.v_head_dim))

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin [T, R/2] and the llama-4 query scale [T, 1, 1]: once per step, shared by every layer."""
        cos, sin = self.rotary(positions, dtype)
        return cos, sin, llama4_query_scale(positions, self.cfg.rope).to(dtype)[:, None, None]

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _kv_b_split(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, C] and W_UV [H, v, C] from kv_b_proj's [H * (nope + v), C] weight.

        An FP8 weight is dequantised once and kept (3 MiB per layer in bf16 at real shapes), not on every decode
        step; the cache key is the weight object itself, so reloading weights invalidates it."""
        proj = self.kv_b_proj
        key = (proj.weight, proj.weight_scale, dtype)
        cached = getattr(self, "_absorbed_weights", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        cfg = self.cfg
        w = proj.dense_weight(dtype).view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
        split = (w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :])
        if proj.weight_scale is not None and not torch.is_grad_enabled():
            self._absorbed_weights = (key, split)
        return split

    def _attend_split(self, q_nope, q_rope, latents, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        """``auto``: sequences with one new token go through the absorbed path, the others through the expanded."""
        decode, chunked = meta.split_decode_rows(q_nope.device)
        if not chunked:
            return self._attend_absorbed(q_nope, q_rope, latents, meta, kv_cache)
        if not decode:
            return self._attend_expanded(q_nope, q_rope, latents, meta, kv_cache)
        out = q_nope.new_empty(q_nope.shape[0], self.cfg.num_heads, self.cfg.v_head_dim)
        for part in (decode, chunked):
            rows = part.rows
            attend = self._attend_absorbed if part is decode else self._attend_expanded
            out[rows] = attend(q_nope[rows], q_rope[rows], latents[rows], part.meta, kv_cache)
        return out

    def _attend_absorbed(self, q_nope, q_rope, latents, meta, kv_cache) -> torch.Tensor:
        w_uk, w_uv = self._kv_b_split(q_nope.dtype)
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, H, C]
        decode_only = meta.uses_cache and meta.num_seqs == q_latent.shape[0]  # one new token per sequence
        if decode_only and self.ops.mla_decode is not None:
            seq_lens = meta.device_seq_lens(q_latent.device)
            o_latent = self.ops.mla_decode(
                q_latent,
                q_rope,
                kv_cache,
                meta.block_tables,
                seq_lens,
                self.cfg.softmax_scale,
                max_seq_len=meta.max_seq_len,
            )
        else:
            plan = (meta.block_tables, meta.query_start_loc, meta.seq_lens, self.cfg.softmax_scale)
            o_latent = mla_attention_absorbed(q_latent, q_rope, latents, kv_cache, *plan)
        return torch.einsum("thc,hvc->thv", o_latent, w_uv)  # [T, H, v]

    def _attend_expanded(self, q_nope, q_rope, latents, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        cfg = self.cfg
        C, H, nope = cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_head_dim
        out = q_nope.new_empty(q_nope.shape[0], H, cfg.v_head_dim)
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if meta.uses_cache:
                ctx = gather_context(kv_cache, meta.block_tables[i], meta.seq_lens[i]).to(q_nope.dtype)
            else:
                ctx = latents[start:end]
            kv = self.kv_b_proj(ctx[:, :C]).view(-1, H, nope + cfg.v_head_dim)  # [K, H, nope + v]
            k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
            k_rope = ctx[:, None, C:].expand(-1, H, -1)  # [K, H, R]: the roped key is shared by all heads
            q = torch.cat([q_nope[start:end], q_rope[start:end]], dim=-1)  # [Q, H, nope + R]
            k = torch.cat([k_nope, k_rope], dim=-1)
            out[start:end] = causal_attention(q, k, v, cfg.softmax_scale)
        return out
