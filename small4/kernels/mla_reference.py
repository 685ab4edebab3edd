"""Reference twin of the paged MLA attention kernels: absorbed attention over the latent cache.

Queries arrive already absorbed into the latent space (``q_nope @ W_UK``), so a key is one cached latent row
(``kv_lora_rank`` latent + ``qk_rope_head_dim`` roped shared key) and a value is the latent part of the same row.
The output stays in latent space; the caller applies ``W_UV``. Slow and obviously correct: a loop over sequences.
Plain tensors and lists in, as the Triton kernel takes them: ``query_start_loc`` (sequence i's new tokens are rows
``query_start_loc[i]:query_start_loc[i+1]``), ``seq_lens`` (context lengths after this step) and ``block_tables``
(None: each sequence attends to its own new tokens only), the fields of ``model.context.AttentionMetadata``.
"""

from __future__ import annotations

import torch


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


def decode_attention_padded(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    softmax_scale: float,
) -> torch.Tensor:
    """A decode-only step (one query per sequence) as one batched computation over contexts padded to the longest:
    the same math as the per-sequence loop, without a Python loop over sequences."""
    B, C = q_latent.shape[0], q_latent.shape[-1]
    max_len = max(seq_lens)
    num_blocks = -(-max_len // kv_cache.shape[1])
    ctx = kv_cache[block_tables[:, :num_blocks].long()]  # [B, nb, BS, C + R]
    ctx = ctx.reshape(B, -1, kv_cache.shape[-1])[:, :max_len].to(q_latent.dtype)  # [B, K, C + R]
    lengths = torch.tensor(seq_lens, device=ctx.device)[:, None]  # [B, 1]
    valid = torch.arange(max_len, device=ctx.device)[None, :] < lengths  # [B, K]
    # rows past a sequence's end are stale or never written (possibly NaN): zero them, since 0 * NaN is NaN
    ctx = ctx.masked_fill(~valid[..., None], 0)
    c, k_rope = ctx[..., :C], ctx[..., C:]
    scores = torch.einsum("bhc,bkc->bhk", q_latent, c) + torch.einsum("bhr,bkr->bhk", q_rope, k_rope)
    probs = (scores * softmax_scale).float().masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).to(c.dtype)
    return torch.einsum("bhk,bkc->bhc", probs, c)  # [B, H, C]


def mla_attention_absorbed(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latents: torch.Tensor,
    kv_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    query_start_loc: list[int],
    seq_lens: list[int],
    softmax_scale: float,
) -> torch.Tensor:
    """q_latent [T, H, C], q_rope [T, H, R]; ``latents`` [T, C + R] are this step's new rows (used directly when
    there is no cache). Returns the attention output in latent space, [T, H, C]."""
    if block_tables is not None and len(query_start_loc) - 1 == q_latent.shape[0]:
        return decode_attention_padded(q_latent, q_rope, kv_cache, block_tables, seq_lens, softmax_scale)
    args = (block_tables, query_start_loc, seq_lens, softmax_scale)
    return attention_per_sequence(q_latent, q_rope, latents, kv_cache, *args)


def attention_per_sequence(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latents: torch.Tensor,
    kv_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    query_start_loc: list[int],
    seq_lens: list[int],
    softmax_scale: float,
) -> torch.Tensor:
    """Any mix of prefill chunks and decodes, one sequence at a time: the obviously correct form."""
    C = q_latent.shape[-1]
    out = torch.empty_like(q_latent)
    for i in range(len(seq_lens)):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if block_tables is not None:
            ctx = gather_context(kv_cache, block_tables[i], seq_lens[i])  # [K, C + R]
        else:
            ctx = latents[start:end]
        ctx = ctx.to(q_latent.dtype)
        c, k_rope = ctx[:, :C], ctx[:, C:]  # [K, C], [K, R]
        scores = torch.einsum("qhc,kc->hqk", q_latent[start:end], c)
        scores = scores + torch.einsum("qhr,kr->hqk", q_rope[start:end], k_rope)
        probs = causal_softmax(scores * softmax_scale, ctx.shape[0]).to(c.dtype)  # [H, Q, K]
        out[start:end] = torch.einsum("hqk,kc->qhc", probs, c)
    return out
