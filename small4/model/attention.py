"""Multi-head latent attention (DeepSeek-V2/V3 MLA as Mistral Small 4 uses it).

Per token the cache holds only ``kv_lora_rank + qk_rope_head_dim`` values: the normalised latent ``c`` and the
roped shared key. Two mathematically equal ways to attend over it:
- ``naive`` (expanded): ``kv_b_proj`` turns each cached latent into per-head K/V, then plain attention. Cheap for
  long prefills where the context is the chunk itself.
- ``absorb``: fold ``W_UK`` into the query and ``W_UV`` into the output so attention runs in the 256-wide latent
  space and the cache is never expanded. This is the decode path.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from small4.config import TextConfig
from small4.kernels.backend import kernel_backend
from small4.kernels.mla_reference import causal_softmax, gather_context, mla_attention_absorbed
from small4.model.context import AttentionMetadata
from small4.model.layers import Linear, RMSNorm, RotaryEmbedding, llama4_query_scale

AttnImpl = Literal["naive", "absorb"]


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
        self.impl: AttnImpl = "absorb"

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
        c, k_rope = ckv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)  # [T, C]
        cos, sin = self.rotary(positions, x.dtype)
        q_rope = self.rotary.apply(q_rope, cos, sin)  # [T, H, R]
        k_rope = self.rotary.apply(k_rope, cos, sin)  # [T, R]
        q_scale = llama4_query_scale(positions, cfg.rope).to(x.dtype)[:, None, None]  # [T, 1, 1]
        q_nope, q_rope = q_nope * q_scale, q_rope * q_scale
        latents = torch.cat([c, k_rope], dim=-1)  # [T, C + R]
        if kv_cache is not None:
            kv_cache.view(-1, cfg.latent_dim)[meta.slot_mapping] = latents.to(kv_cache.dtype)
        if self.impl == "absorb":
            out = self._attend_absorbed(q_nope, q_rope, latents, meta, kv_cache)
        else:
            out = self._attend_expanded(q_nope, q_rope, latents, meta, kv_cache)
        return self.o_proj(out.reshape(T, cfg.num_heads * cfg.v_head_dim))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _kv_b_split(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, C] and W_UV [H, v, C] from kv_b_proj's [H * (nope + v), C] weight."""
        cfg = self.cfg
        w = self.kv_b_proj.dense_weight(dtype).view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]

    def _attend_absorbed(self, q_nope, q_rope, latents, meta, kv_cache) -> torch.Tensor:
        w_uk, w_uv = self._kv_b_split(q_nope.dtype)
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, H, C]
        decode_only = meta.uses_cache and meta.num_seqs == q_latent.shape[0]  # one new token per sequence
        if decode_only and kernel_backend(q_latent.device) == "triton":
            from small4.kernels.mla_decode import mla_decode  # Triton is optional on CPU-only installs

            seq_lens = meta.device_seq_lens(q_latent.device)
            o_latent = mla_decode(
                q_latent,
                q_rope,
                kv_cache,
                meta.block_tables,
                seq_lens,
                self.cfg.softmax_scale,
                max_seq_len=max(meta.seq_lens),
            )
        else:
            o_latent = mla_attention_absorbed(q_latent, q_rope, latents, kv_cache, meta, self.cfg.softmax_scale)
        return torch.einsum("thc,hvc->thv", o_latent, w_uv)  # [T, H, v]

    def _attend_expanded(self, q_nope, q_rope, latents, meta, kv_cache) -> torch.Tensor:
        cfg = self.cfg
        C, H = cfg.kv_lora_rank, cfg.num_heads
        out = q_nope.new_empty(q_nope.shape[0], H, cfg.v_head_dim)
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if meta.uses_cache:
                ctx = gather_context(kv_cache, meta.block_tables[i], meta.seq_lens[i]).to(q_nope.dtype)
            else:
                ctx = latents[start:end]
            kv = self.kv_b_proj(ctx[:, :C]).view(-1, H, cfg.qk_nope_head_dim + cfg.v_head_dim)  # [K, H, nope+v]
            k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
            k_rope = ctx[:, C:]  # [K, R], shared by all heads
            scores = torch.einsum("qhd,khd->hqk", q_nope[start:end], k_nope)
            scores = scores + torch.einsum("qhr,kr->hqk", q_rope[start:end], k_rope)
            probs = causal_softmax(scores * cfg.softmax_scale, ctx.shape[0]).to(v.dtype)  # [H, Q, K]
            out[start:end] = torch.einsum("hqk,khv->qhv", probs, v)
        return out
