"""The fused MLA latent write (``latent_write``: kv_a_layernorm + rope of the shared key + cast + paged-cache scatter)
equals its reference twin, the attention module's own ops: over token counts, the real and small latent and rope
widths, both rope layouts, float32 / bfloat16 / float8_e4m3fn caches, block sizes, scrambled and padding (-1)
slots; rows it must not write stay bit-for-bit untouched; and the engine's greedy tokens do not change when the
attention layers write through it. Runs on the test device (the interpreter on CPU); a long chunk at the real widths on
CUDA only.

Tolerances: the rope half and every cast are bit-exact (the kernel rounds where PyTorch rounds, and casts by
round-to-nearest-even with float8 saturation exactly like ``Tensor.to``); only the RMSNorm sum of squares is summed
in another float32 order, so the normed latent may differ in its last bit: 1 float32 ulp-ish (rtol 1e-6) for a
float32 model, one bfloat16 ulp (2^-8 relative) for a bfloat16 one, and what that ulp becomes in the cache (one
float8 step, 2^-3 relative, at a rounding tie)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from small4.config import RopeConfig
from small4.kernels.latent_reference import latent_write_reference
from small4.kernels.latent_write import latent_write
from small4.model.layers import RotaryEmbedding

EPS = 1e-6
FP8 = torch.float8_e4m3fn
# relative tolerance of the normed latent per model dtype (the sum-of-squares order), and of its cached copy
LATENT_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8}
CACHE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, FP8: 2**-3}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def make_case(T, C, R, interleave, x_dtype, cache_dtype, block_size, seed):
    """Inputs as the attention layer has them (YaRN cos/sin with the factor folded in, a non-trivial norm weight,
    a rope part large enough to saturate float8), a cache full of random rows, and scrambled slots with padding."""
    g = torch.Generator().manual_seed(seed)
    ckv = torch.randn(T, C + R, generator=g)
    ckv[:, C:] *= 300.0  # |rope| reaches past float8's 448 for some rows
    ckv = ckv.to(x_dtype)
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(x_dtype)
    rotary = RotaryEmbedding(RopeConfig(interleave=interleave), R)
    cos, sin = rotary(torch.randint(0, 70_000, (T,), generator=g), x_dtype)
    num_blocks = -(-(T + 3) // block_size) + 1
    cache = (4 * torch.randn(num_blocks, block_size, C + R, generator=g)).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    if T > 1:
        slots[torch.randperm(T, generator=g)[: max(1, T // 4)]] = -1
    return ckv, weight, cos, sin, slots, cache


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    """Relative to the row's largest value (a last-bit slip is relative to the value's own exponent, at most)."""
    got, want = got.float(), want.float()
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    err = ((got - want).abs() / scale).max().item() if got.numel() else 0.0
    assert err <= rtol, err
    return err


GRID = [(T, C, R) for T in (1, 5, 33) for C, R in ((16, 8), (256, 64), (16, 64), (256, 8))]


@pytest.mark.parametrize("T,C,R", GRID)
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize(
    "x_dtype,cache_dtype,block_size",
    [
        (torch.bfloat16, torch.bfloat16, 16),
        (torch.bfloat16, FP8, 4),
        (torch.bfloat16, torch.float32, 1),
        (torch.float32, torch.float32, 4),
        (torch.float32, FP8, 16),
        (torch.float32, torch.bfloat16, 1),
    ],
)
def test_matches_reference(T, C, R, interleave, x_dtype, cache_dtype, block_size, device):
    check_matches_reference(T, C, R, interleave, x_dtype, cache_dtype, block_size, device)


@pytest.mark.cuda
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_real_shapes(cache_dtype, device):
    """A long prefill chunk at the real widths (latent 256 + rope 64), 16-token blocks, a bfloat16 model."""
    check_matches_reference(8192, 256, 64, True, torch.bfloat16, cache_dtype, 16, device)


def check_matches_reference(T, C, R, interleave, x_dtype, cache_dtype, block_size, device):
    case = make_case(T, C, R, interleave, x_dtype, cache_dtype, block_size, seed=T + C)
    ckv, weight, cos, sin, slots, cache = (t.to(device) for t in case)
    initial = cache.clone()
    ref_cache, got_cache = cache.clone(), cache.clone()
    want = latent_write_reference(ckv, weight, EPS, cos, sin, interleave, slots, ref_cache)
    got = latent_write(ckv, weight, EPS, cos, sin, interleave, slots, got_cache)

    assert got.dtype == want.dtype == x_dtype and got.shape == (T, C + R)
    assert torch.equal(bits(got[:, C:]), bits(want[:, C:]))  # the rope half: bit-exact
    assert_close_rel(got[:, :C], want[:, :C], LATENT_RTOL[x_dtype])

    flat, initial_flat = got_cache.view(-1, C + R), initial.view(-1, C + R)
    written = slots[slots >= 0]
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=device)
    untouched[written] = False
    assert torch.equal(bits(flat[untouched]), bits(initial_flat[untouched]))  # padding and foreign rows
    valid = slots >= 0
    assert torch.equal(bits(flat[written]), bits(got[valid].to(cache_dtype)))  # the cast is exactly Tensor.to's
    assert_close_rel(flat[written], ref_cache.view(-1, C + R)[written], CACHE_RTOL[cache_dtype])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_casts_match_torch_at_the_edges(cache_dtype, device):
    """Ties, float8 subnormals, values past float8's 448 (saturated, also past 464) cast exactly as ``Tensor.to``
    does. The rope part is [x1, x2] with cos=1, sin=0, so x1 reaches the cache unchanged (no infinities: inf * 0)."""
    edges = [447.0, 456.0, 464.0, 465.0, 480.0, 1e6, 1e30, -1e30, -500.0, 1.0625, 1.1875, -0.0]
    edges += [2**-10, 1.5 * 2**-9, 2.5 * 2**-9, 3 * 2**-11, 1.00390625, 1.01171875, -(2**-12), 2**-6 - 2**-11]
    R = 2 * len(edges)
    ckv = torch.cat([torch.ones(1, 4), torch.tensor([edges + [0.0] * len(edges)])], dim=-1).to(device)  # x2 = 0
    cos, sin = torch.ones(1, R // 2, device=device), torch.zeros(1, R // 2, device=device)
    cache = torch.zeros(1, 1, 4 + R, dtype=cache_dtype, device=device)
    got = latent_write(ckv, torch.ones(4, device=device), EPS, cos, sin, False, torch.tensor([0], device=device), cache)
    assert torch.equal(bits(cache[0]), bits(got.to(cache_dtype)))
    assert torch.equal(got[0, 4 : 4 + len(edges)].cpu(), torch.tensor(edges))


def test_without_cache_only_returns_latents(device):
    case = make_case(5, 16, 8, True, torch.bfloat16, torch.bfloat16, 4, seed=1)
    ckv, weight, cos, sin, slots, cache = (t.to(device) for t in case)
    want = latent_write_reference(ckv, weight, EPS, cos, sin, True)
    initial = cache.clone()
    for slot_mapping, kv_cache in ((None, None), (slots, None), (None, cache)):
        got = latent_write(ckv, weight, EPS, cos, sin, True, slot_mapping, kv_cache)
        assert_close_rel(got, want, LATENT_RTOL[torch.bfloat16])
    assert torch.equal(bits(cache), bits(initial))
    empty = latent_write(ckv[:0], weight, EPS, cos[:0], sin[:0], True, slots[:0], cache)
    assert empty.shape == (0, 24)


def test_rejects_mismatched_shapes(device):
    case = make_case(5, 16, 8, True, torch.float32, torch.float32, 4, seed=2)
    ckv, weight, cos, sin, slots, cache = (t.to(device) for t in case)
    with pytest.raises(ValueError, match="cos/sin"):
        latent_write(ckv, weight, EPS, cos[:, :3], sin[:, :3], True)
    with pytest.raises(ValueError, match="kv_cache"):
        latent_write(ckv, weight, EPS, cos, sin, True, slots, cache[..., :-1])
    with pytest.raises(ValueError, match="slot_mapping"):
        latent_write(ckv, weight, EPS, cos, sin, True, slots[:-1], cache)


def test_reference_imports_without_triton():
    """CPU-only installs have no Triton: the model, the kernel module and the reference twin (the CPU path) import,
    and the twin runs."""
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import small4.model.mistral4, small4.kernels.latent_write\n"
        "from small4.kernels.latent_reference import latent_write_reference as f\n"
        "cache = torch.zeros(2, 2, 6)\n"
        "out = f(torch.randn(3, 6), torch.ones(4), 1e-6, torch.ones(3, 1), torch.zeros(3, 1), True,"
        " torch.tensor([3, -1, 0]), cache)\n"
        "assert torch.equal(cache.view(-1, 6)[[3, 0]], out[[0, 2]]) and cache.view(-1, 6)[[1, 2]].eq(0).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_engine_greedy_tokens_unchanged(tmp_path, monkeypatch, device):
    """The real engine with the attention layers on the Triton path (latent write and MLA decode) generates the same
    greedy tokens as the all-reference engine, every prefill and decode step writing its latents through the
    kernel. Only attention is switched, so the test does not depend on other kernels."""
    from small4.config import EngineConfig
    from small4.engine.engine import LLM
    from small4.engine.sampling_params import SamplingParams
    from small4.kernels import latent_write as latent_write_module
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

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return latent_write(*args, **kwargs)

    # the registry reads the module's attribute when the backend is chosen
    monkeypatch.setattr(latent_write_module, "latent_write", counted)
    assert generate("triton") == expected
    assert len(calls) >= 6 and max(calls) > 1  # the prefill and the decode steps went through the kernel
