"""Reference twin of the paged MLA attention kernels: absorbed attention over the latent cache.

Queries arrive already absorbed into the latent space (``q_nope @ W_UK``), so a key is one cached latent row
(``kv_lora_rank`` latent + ``qk_rope_head_dim`` roped shared key) and a value is the latent part of the same row.
The output stays in latent space; the caller applies ``W_UV``. Slow and obviously correct: a loop over sequences.
"""

from __future__ import annotations

import torch

from small4.model.context import AttentionMetadata


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` latent rows of one sequence from the paged cache [NB, BS, D] -> [length, D]."""
    block_size = kv_cache.shape[1]
    num_blocks = -(-length // block_size)
    rows = kv_cache[block_table[:num_blocks].long()]  # [n, BS, D]
    return rows.reshape(-1, kv_cache.shape[-1])[:length]


def causal_softmax(scores: torch.Tensor, context_len: int) -> torch.Tensor:
    """Softmax over keys in float32 with the causal mask of queries that are the last rows of the context.

    ``scores`` is [H, Q, K]; query q sits at context position ``K - Q + q`` and sees keys up to it."""
    num_q, num_k = scores.shape[-2], scores.shape[-1]
    q_pos = torch.arange(num_q, device=scores.device)[:, None] + (context_len - num_q)
    k_pos = torch.arange(num_k, device=scores.device)[None, :]
    masked = scores.float().masked_fill(k_pos > q_pos, float("-inf"))
    return masked.softmax(dim=-1)


def mla_attention_absorbed(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latents: torch.Tensor,
    kv_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    softmax_scale: float,
) -> torch.Tensor:
    """q_latent [T, H, C], q_rope [T, H, R]; ``latents`` [T, C + R] are this step's new rows (used directly when
    there is no cache). Returns the attention output in latent space, [T, H, C]."""
    C = q_latent.shape[-1]
    out = torch.empty_like(q_latent)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        if meta.uses_cache:
            ctx = gather_context(kv_cache, meta.block_tables[i], meta.seq_lens[i])  # [K, C + R]
        else:
            ctx = latents[start:end]
        ctx = ctx.to(q_latent.dtype)
        c, k_rope = ctx[:, :C], ctx[:, C:]  # [K, C], [K, R]
        scores = torch.einsum("qhc,kc->hqk", q_latent[start:end], c)
        scores = scores + torch.einsum("qhr,kr->hqk", q_rope[start:end], k_rope)
        probs = causal_softmax(scores * softmax_scale, ctx.shape[0]).to(c.dtype)  # [H, Q, K]
        out[start:end] = torch.einsum("hqk,kc->qhc", probs, c)
    return out
