"""The batched decode path of the MLA reference equals the per-sequence loop, across ragged contexts and
scrambled block tables (blocks partly filled, contexts crossing block boundaries, one-token contexts). On the test
device."""

from __future__ import annotations

import pytest
import torch

from small4.kernels.mla_reference import attention_per_sequence, decode_attention_padded
from small4.model.context import AttentionMetadata


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seq_lens", [[1], [5, 1, 17], [16, 33, 2, 64]])
def test_padded_decode_equals_loop(block_size, seq_lens, device):
    g = torch.Generator().manual_seed(len(seq_lens) * 31 + block_size)
    H, C, R, B = 4, 32, 8, len(seq_lens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    total = sum(blocks_per_seq) + 3
    cache = torch.randn(total, block_size, C + R, generator=g)
    perm = torch.randperm(total, generator=g).tolist()
    width = max(blocks_per_seq)
    tables, used = [], 0
    for nb in blocks_per_seq:
        ids = perm[used : used + nb]
        used += nb
        tables.append(ids + [0] * (width - nb))
    meta = AttentionMetadata(
        query_start_loc=list(range(B + 1)),
        seq_lens=seq_lens,
        block_tables=torch.tensor(tables, dtype=torch.int32),
        block_size=block_size,
        slot_mapping=torch.zeros(B, dtype=torch.long),
    )
    q_latent, q_rope = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    for i, n in enumerate(seq_lens):  # never-written or stale rows may hold anything, NaN included
        last, used_rows = tables[i][blocks_per_seq[i] - 1], n - (blocks_per_seq[i] - 1) * block_size
        cache[last, used_rows:] = float("nan")
    cache[[b for b in range(total) if all(b not in t[: blocks_per_seq[j]] for j, t in enumerate(tables))]] = float(
        "nan"
    )
    q_latent, q_rope, cache = q_latent.to(device), q_rope.to(device), cache.to(device)
    meta.block_tables, meta.slot_mapping = meta.block_tables.to(device), meta.slot_mapping.to(device)
    padded = decode_attention_padded(q_latent, q_rope, cache, meta.block_tables, meta.seq_lens, 0.3)
    plan = (meta.block_tables, meta.query_start_loc, meta.seq_lens, 0.3)
    loop = attention_per_sequence(q_latent, q_rope, None, cache, *plan)
    assert torch.allclose(padded, loop, atol=1e-5, rtol=1e-5)
    if max(seq_lens) > 1:  # the comparison can fail: flipping the rope queries changes the answer
        assert not torch.allclose(padded, attention_per_sequence(q_latent, -q_rope, None, cache, *plan), atol=1e-3)
