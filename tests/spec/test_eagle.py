"""The EAGLE draft module: shapes, parameter names, and cached incremental forwards equal to a stateless one."""

import torch

from small4.config import TextConfig
from small4.model.context import AttentionMetadata
from small4.spec.eagle import EagleConfig, EagleDraft

TEXT = TextConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)


def random_draft(seed: int = 0, layers: int = 2) -> EagleDraft:
    draft = EagleDraft(EagleConfig.from_target(TEXT, num_layers=layers, intermediate_size=48))
    g = torch.Generator().manual_seed(seed)
    for p in draft.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return draft


def test_parameter_names_are_the_documented_ones():
    names = set(dict(random_draft(layers=1).named_parameters()))
    attn = ["q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    expected = {"fc.weight", "norm.weight"} | {
        f"layers.0.{n}.weight"
        for n in ["input_layernorm", "post_attention_layernorm", "mlp.gate_up", "mlp.down"]
        + [f"self_attn.{a}" for a in attn]
    }
    assert names == expected
    sd = random_draft(layers=1).state_dict()
    assert sd["fc.weight"].shape == (32, 64) and sd["layers.0.mlp.gate_up.weight"].shape == (96, 32)


def test_cached_steps_match_one_stateless_forward():
    """A prefill chunk then single-token steps through the paged cache give the same hidden rows as one pass."""
    draft = random_draft()
    T, block = 7, 4
    emb, hid = torch.randn(T, 32), torch.randn(T, 32)
    pos = torch.arange(T)
    full = draft(emb, hid, pos, AttentionMetadata.for_prefill([T]))
    caches = [torch.zeros(3, block, TEXT.latent_dim) for _ in range(2)]
    tables = torch.tensor([[2, 0, 1]])
    slots = torch.tensor([int(tables[0, p // block]) * block + p % block for p in range(T)])
    rows = []
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        meta = AttentionMetadata([0, b - a], [b], slots[a:b], tables, block)
        rows.append(draft(emb[a:b], hid[a:b], pos[a:b], meta, caches))
    torch.testing.assert_close(torch.cat(rows), full, atol=1e-5, rtol=1e-4)


def test_concatenation_order_is_embedding_then_hidden():
    draft = random_draft(layers=1)
    emb, hid = torch.randn(3, 32), torch.randn(3, 32)
    meta = AttentionMetadata.for_prefill([3])
    out = draft(emb, hid, torch.arange(3), meta)
    draft.fc.weight[:, 32:] = 0  # the hidden half no longer matters ...
    a = draft(emb, hid, torch.arange(3), meta)
    b = draft(emb, torch.randn(3, 32), torch.arange(3), meta)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, out)
