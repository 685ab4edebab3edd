"""The Triton paged MLA decode kernel equals its reference twin ``decode_attention_padded`` across ragged contexts
(one-token contexts, partly filled blocks, contexts crossing block boundaries), scrambled block tables, several
head blocks and split counts, float32 and bfloat16 (and fp8) caches; and the engine's greedy tokens do not change
when attention decodes through it. Runs on the test device (the interpreter on CPU); the real shapes (32 heads, latent
256 + rope 64, 16-token blocks, long contexts) on CUDA only."""

from __future__ import annotations

import pytest
import torch

from small4.kernels.mla_decode import choose_num_splits, mla_decode
from small4.kernels.mla_reference import decode_attention_padded
from small4.model.context import AttentionMetadata

C, R, SCALE = 32, 8, 0.3


def make_case(seq_lens, H, block_size, cache_dtype, q_dtype, seed, device="cpu", C=C, R=R):
    """A paged cache whose rows are all random (unused rows too: a masking bug shows), with each sequence's blocks
    drawn from a shuffled pool, plus a query per sequence."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    total = sum(blocks_per_seq) + 3
    cache = torch.randn(total, block_size, C + R, generator=g).to(cache_dtype)
    perm = torch.randperm(total, generator=g).tolist()
    width = max(blocks_per_seq) + 1  # a spare column: tables are wider than any context
    tables, used = [], 0
    for nb in blocks_per_seq:
        tables.append(perm[used : used + nb] + [0] * (width - nb))
        used += nb
    meta = AttentionMetadata(
        query_start_loc=list(range(B + 1)),
        seq_lens=list(seq_lens),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        block_size=block_size,
    )
    q_latent = torch.randn(B, H, C, generator=g).to(q_dtype)
    q_rope = torch.randn(B, H, R, generator=g).to(q_dtype)
    if cache_dtype == torch.float32:  # never-written rows may hold NaN: it must not leak through masked loads
        for i, n in enumerate(seq_lens):
            cache[tables[i][blocks_per_seq[i] - 1], n - (blocks_per_seq[i] - 1) * block_size :] = float("nan")
    meta.block_tables = meta.block_tables.to(device)
    return q_latent.to(device), q_rope.to(device), cache.to(device), meta


def run_kernel(q_latent, q_rope, cache, meta, **kw):
    lens = torch.tensor(meta.seq_lens, dtype=torch.int32, device=cache.device)
    return mla_decode(q_latent, q_rope, cache, meta.block_tables, lens, SCALE, **kw)


SEQ_LENS = [1, 5, 16, 37]
# (H, block_h, num_splits, block_n): one head block with no split; two head blocks with splits smaller than a
# BLOCK_N-rounded share (some splits empty for short contexts); many splits, most of them empty.
CONFIGS = [(2, None, 1, None), (4, 2, 3, 8), (4, None, 8, 16)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("H,block_h,num_splits,block_n", CONFIGS)
def test_kernel_equals_reference_fp32(block_size, H, block_h, num_splits, block_n, device):
    args = (SEQ_LENS, H, block_size, torch.float32, torch.float32, block_size + H, device)
    q_latent, q_rope, cache, meta = make_case(*args)
    out = run_kernel(q_latent, q_rope, cache, meta, num_splits=num_splits, block_h=block_h, block_n=block_n)
    ref = decode_attention_padded(q_latent, q_rope, cache, meta.block_tables, meta.seq_lens, SCALE)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("block_size,num_splits", [(4, 1), (16, 3)])
def test_kernel_equals_reference_low_precision(cache_dtype, block_size, num_splits, device):
    """bfloat16 queries over a bfloat16 or fp8 cache. The bfloat16 reference rounds scores and probabilities to
    bfloat16 while the kernel keeps scores and the softmax in float32, so both are held against the float32
    reference on the same (rounded) inputs: the kernel within atol = rtol = 2e-2, and no worse than the bfloat16
    reference itself (up to one bfloat16 step)."""
    q_latent, q_rope, cache, meta = make_case([3, 16, 29], 4, block_size, cache_dtype, torch.bfloat16, 11, device)
    out = run_kernel(q_latent, q_rope, cache, meta, num_splits=num_splits, block_n=8)
    assert out.dtype == torch.bfloat16
    exact = decode_attention_padded(
        q_latent.float(), q_rope.float(), cache.float(), meta.block_tables, meta.seq_lens, SCALE
    )
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)
    ref = decode_attention_padded(q_latent, q_rope, cache, meta.block_tables, meta.seq_lens, SCALE).float()
    ulp = 2.0**-7 * exact.abs().max()  # one bfloat16 step at the largest output: the final rounding alone
    assert (out.float() - exact).abs().max() <= (ref - exact).abs().max() + ulp


def test_default_heuristics_and_empty_context(device):
    """Without overrides the heuristics pick the tiles and splits; a zero-length context (a padding row in a
    captured batch) gives zeros, not NaN, and leaves the other rows alone."""
    q_latent, q_rope, cache, meta = make_case([7, 1], 4, 4, torch.float32, torch.float32, 3, device)
    ref = decode_attention_padded(q_latent, q_rope, cache, meta.block_tables, meta.seq_lens, SCALE)
    torch.testing.assert_close(run_kernel(q_latent, q_rope, cache, meta), ref, atol=1e-4, rtol=1e-4)
    lens = torch.tensor([7, 0], dtype=torch.int32, device=device)
    out = mla_decode(q_latent, q_rope, cache, meta.block_tables, lens, SCALE, num_splits=2, block_n=4)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("seq_lens", [[1, 700, 4096], [32768], [5] * 64 + [3000] * 64], ids=["ragged", "long", "b128"])
def test_real_shapes(cache_dtype, seq_lens, device):
    """32 heads, latent 256 + rope 64, 16-token blocks, bfloat16 queries, the default tiles and split heuristic."""
    q_latent, q_rope, cache, meta = make_case(seq_lens, 32, 16, cache_dtype, torch.bfloat16, 7, device, C=256, R=64)
    q_latent, q_rope = q_latent / 16, q_rope / 16  # scores of a realistic size (not a one-hot softmax)
    out = run_kernel(q_latent, q_rope, cache, meta, max_seq_len=max(seq_lens))
    exact = decode_attention_padded(
        q_latent.float(), q_rope.float(), cache.float(), meta.block_tables, meta.seq_lens, SCALE
    )
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)


def test_split_heuristic():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_num_splits(1, 2, 10, cpu) == 1
    if torch.cuda.is_available():
        assert choose_num_splits(1, 2, 100, cuda) == 1  # too short to split
        assert choose_num_splits(1, 2, 1 << 17, cuda) == 32  # one long sequence: split to the cap
        assert choose_num_splits(512, 2, 1 << 17, cuda) == 1  # a full batch fills the GPU alone


def test_engine_greedy_tokens_unchanged(tmp_path, monkeypatch, device):
    """The real engine (decode steps through the kernel, prefill through the reference) generates the same greedy
    tokens as the all-reference engine. Only attention is switched, so the test does not depend on other kernels."""
    from small4.config import EngineConfig
    from small4.engine.engine import LLM
    from small4.engine.sampling_params import SamplingParams
    from small4.kernels import mla_decode as mla_decode_module
    from small4.kernels.registry import kernel_ops
    from small4.model.attention import MLAttention
    from small4.weights.tiny import TinySpec, make_tiny

    make_tiny(tmp_path, layout="hf", seed=7, spec=TinySpec(num_layers=1, num_bpe_ranks=300))
    prompt, params = [[1, 1100, 1200, 1299], [1, 1050]], SamplingParams(temperature=0, max_tokens=6)

    def generate(attention_backend=None):
        llm = LLM(str(tmp_path), EngineConfig(block_size=4, kv_cache_memory=1 << 20, device=str(device)))
        if attention_backend is not None:  # the attention layers alone, after the runner chose for the model
            ops = kernel_ops(attention_backend)
            for module in llm.engine.runner.model.modules():
                if isinstance(module, MLAttention):
                    module.ops = ops
        return [list(r.outputs[0].token_ids) for r in llm.generate(prompt, params)]

    monkeypatch.setenv("SMALL4_KERNELS", "reference")
    expected = generate()

    calls = []
    real = mla_decode_module.mla_decode

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mla_decode_module, "mla_decode", counted)  # the registry reads it when the backend is chosen
    assert generate("triton") == expected
    assert len(calls) >= 5  # the decode steps after the prefill went through the kernel
