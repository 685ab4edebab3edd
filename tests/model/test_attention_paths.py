"""The three attention paths (``auto``: decodes absorbed + chunks expanded; ``absorb``; ``naive``) give the same
hidden states on one mixed step: decodes, a chunk extending a cached prefix, a fresh prompt, over a scrambled
paged cache whose unused rows hold NaN. On the test device (``device`` fixture)."""

from __future__ import annotations

import pytest
import torch

from small4.model.attention import causal_attention
from small4.model.context import AttentionMetadata
from small4.weights.loader import load_model
from small4.weights.tiny import make_tiny

BLOCK = 4
NUM_BLOCKS = 48


@pytest.fixture(scope="module")
def model(tmp_path_factory, device):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny(path, layout="hf", seed=3, dtype=torch.float32)
    return load_model(path, dtype=torch.float32, progress=False).to(device)


def _meta(cached: list[int], new: list[int], table: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
    starts, positions = [0], []
    for c, n in zip(cached, new, strict=True):
        starts.append(starts[-1] + n)
        positions.extend(range(c, c + n))
    pos = torch.tensor(positions, device=table.device)
    owner = torch.repeat_interleave(torch.arange(len(new), device=table.device), torch.tensor(new, device=table.device))
    blocks = table[owner, pos // BLOCK].long()
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=[c + n for c, n in zip(cached, new, strict=True)],
        slot_mapping=blocks * BLOCK + pos % BLOCK,
        block_tables=table,
        block_size=BLOCK,
    )
    return meta, pos


@torch.no_grad()
def test_mixed_step_same_for_every_attention_path(model, device):
    cfg = model.config.text
    g = torch.Generator().manual_seed(0)
    cached, new = [10, 5, 0, 3], [1, 6, 4, 1]  # decode, extend, fresh prompt, decode
    table = torch.randperm(NUM_BLOCKS, generator=g).to(torch.int32).view(len(new), -1).to(device)
    prefix_meta, prefix_pos = _meta([0, 0, 0, 0], cached, table)
    prefix_meta = AttentionMetadata(
        [0, *torch.tensor(cached).cumsum(0).tolist()], cached, prefix_meta.slot_mapping, table, BLOCK
    )
    ids = torch.randint(0, cfg.vocab_size, (sum(cached) + sum(new),), generator=g).to(device)
    results = {}
    for impl in ("absorb", "naive", "auto"):
        model.set_attn_impl(impl)
        shape = (NUM_BLOCKS, BLOCK, cfg.latent_dim)
        caches = [torch.full(shape, float("nan"), device=device) for _ in range(cfg.num_layers)]
        model(ids[: sum(cached)], prefix_pos, prefix_meta, caches)
        meta, pos = _meta(cached, new, table)
        results[impl] = model(ids[sum(cached) :], pos, meta, caches)
    model.set_attn_impl("auto")
    assert torch.isfinite(results["auto"]).all()
    for impl in ("naive", "auto"):
        assert (results[impl] - results["absorb"]).abs().max().item() <= 1e-4, impl


@pytest.mark.parametrize("num_q,num_k", [(1, 1), (1, 9), (5, 5), (4, 11)])
def test_causal_attention_is_bottom_right_aligned(num_q, num_k, device):
    g = torch.Generator().manual_seed(num_q * 100 + num_k)
    H, D = 3, 8
    q, k, v = (torch.randn(n, H, D, generator=g) for n in (num_q, num_k, num_k))
    got = causal_attention(q.to(device), k.to(device), v.to(device), 0.3).cpu()
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3
    q_pos = torch.arange(num_q)[:, None] + num_k - num_q
    scores = scores.masked_fill(torch.arange(num_k)[None, :] > q_pos, float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    assert (got - expected).abs().max().item() <= 1e-5
