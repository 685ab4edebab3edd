"""The NVFP4 fused MoE (4-bit weights dequantised tile by tile in the kernels) equals its twin
``fused_moe_nvfp4_reference`` (``dequantize_nvfp4`` then ``fused_moe_reference``): no tokens, one token, uneven
expert loads (every token on one expert, experts with none), K tails shorter than a step, float32 and bfloat16
activations, every one of the 256 byte values and distinct divisors per expert and per gate/up half. Bad operands
fail at the edge naming the tensor. Small shapes on the test device (the interpreter on CPU); the real shapes on
CUDA only."""

from __future__ import annotations

import pytest
import torch

from small4.kernels.fused_moe import fused_moe_nvfp4
from small4.kernels.moe_reference import fused_moe_nvfp4_reference
from small4.kernels.nvfp4 import dequantize_nvfp4, quantize_nvfp4

FP32_TOL = 1e-4  # float32 activations, IEEE dots: summation order and the divisor's reciprocal differ
BF16_TOL = 2e-2  # relative to max |reference|: a few bfloat16 ulps (tiles are rounded to bfloat16 once each)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def random_nvfp4(E, out, inn, g, parts=1):
    """Uniformly random packed bytes (every code, -0 included), positive E4M3 block scales spanning a few octaves,
    and one divisor per expert (and per row part) -> (packed [E, out, inn/2], scale [E, out, inn/16], global)."""
    packed = torch.randint(0, 256, (E, out, inn // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(E, out, inn // 16, generator=g) * 60 + 2).to(torch.float8_e4m3fn)
    global_ = (torch.rand(E, parts, generator=g) * 3000 + 200).float()  # typical divisors: 448 * 6 / amax
    fan_in = inn**0.5 * 30.0  # E2M1 * scale ~ 30 on average: bring a row's dot to O(1)
    global_ = global_ * fan_in / 1000
    return packed, scale, global_.squeeze(1) if parts == 1 else global_


def make_problem(T, E, k, H, I, seed, dtype, device, ids=None):
    g = torch.Generator().manual_seed(seed)
    w13 = random_nvfp4(E, 2 * I, H, g, parts=2)
    w2 = random_nvfp4(E, H, I, g)
    x = torch.randn(T, H, generator=g)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(T, k)
    weights = torch.rand(T, ids.shape[1], generator=g)
    args = (x.to(dtype), *w13, *w2, ids, (weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)).to(dtype))
    return tuple(a.to(device) for a in args)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert bool(torch.isfinite(ref).all())
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 1.0
    assert err <= (FP32_TOL * max(1.0, scale) if dtype == torch.float32 else BF16_TOL * scale), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,E,k,H,I,block_k",
    [
        (1, 4, 1, 32, 64, 32),  # one token
        (3, 8, 2, 64, 48, 32),  # width 48: the down GEMM's last K step is half a step
        (17, 8, 2, 48, 32, 64),  # hidden 48 under a 64-wide step: every gate/up step is a tail
    ],
)
def test_matches_twin(dtype, T, E, k, H, I, block_k, device):
    args = make_problem(T, E, k, H, I, 100 * T + H + I, dtype, device)
    ref = fused_moe_nvfp4_reference(*args)
    assert_close(fused_moe_nvfp4(*args, config={**SMALL, "BLOCK_K": block_k}), ref, dtype)


@pytest.mark.parametrize(
    "ids",
    [
        torch.full((20, 1), 2),  # every token on one expert, two blocks of it; the others get nothing
        torch.stack([torch.full((6,), 3), torch.full((6,), 0)], dim=1),  # experts 1 and 2 get no tokens
        torch.tensor([[3, 1, 0, 2]] * 2 + [[3, 0, 1, 2]] * 11),  # all four experts, uneven per-expert blocks
    ],
    ids=["all-to-one", "two-experts", "uneven"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uneven_expert_loads(ids, dtype, device):
    args = make_problem(ids.shape[0], 4, ids.shape[1], 32, 64, 5, dtype, device, ids=ids)
    assert_close(fused_moe_nvfp4(*args, config=SMALL), fused_moe_nvfp4_reference(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_ranks_experts_are_skipped(dtype, device):
    """Expert parallelism: ids < 0 (another rank's experts) add nothing, the rest match the twin."""
    ids = torch.tensor([[3, -1], [-1, -1], [0, 2], [-1, 1]] * 5)
    args = make_problem(ids.shape[0], 4, 2, 32, 64, 9, dtype, device, ids=ids)
    ref = fused_moe_nvfp4_reference(*args)
    assert bool((ref[1::4] == 0).all())  # a token with no local assignment
    assert_close(fused_moe_nvfp4(*args, config=SMALL), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens(dtype, device):
    args = make_problem(0, 4, 2, 32, 64, 1, dtype, device, ids=torch.zeros(0, 2, dtype=torch.long))
    out = fused_moe_nvfp4(*args)
    assert out.shape == (0, 32) and out.dtype == dtype


def test_default_table_config_and_quantized_weights(device):
    """Weights quantised from dense ones by ``quantize_nvfp4`` (per expert and half), the default block sizes: the
    kernel equals the twin, and both stay near the dense MoE (the 4-bit error, not a convention slip)."""
    from small4.kernels.moe_reference import fused_moe_reference

    g = torch.Generator().manual_seed(3)
    E, H, I, T, k = 4, 64, 64, 5, 2
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    q13 = [[quantize_nvfp4(w13[e, h * I : (h + 1) * I]) for h in range(2)] for e in range(E)]
    q2 = [quantize_nvfp4(w2[e]) for e in range(E)]
    p13 = torch.stack([torch.cat([q[0][0], q[1][0]]) for q in q13])  # [E, 2I, H/2]
    s13 = torch.stack([torch.cat([q[0][1], q[1][1]]) for q in q13])  # [E, 2I, H/16]
    g13 = torch.stack([torch.stack([q[0][2], q[1][2]]) for q in q13]).float()  # [E, 2]
    p2, s2, g2 = (torch.stack([q[i] for q in q2]) for i in range(3))
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g).softmax(-1)
    args = tuple(a.to(device) for a in (x, p13, s13, g13, p2, s2, g2.float(), ids, weights))
    ref = fused_moe_nvfp4_reference(*args)
    assert_close(fused_moe_nvfp4(*args), ref, torch.float32)
    dense = fused_moe_reference(x, w13, w2, ids, weights).to(device)
    assert (ref - dense).abs().max() <= 0.25 * dense.abs().max()  # 4-bit weights: close, not equal
    torch.testing.assert_close(dequantize_nvfp4(p2, s2, g2), w2, atol=0.2 * w2.abs().max().item(), rtol=0)


def test_bad_operands_fail_at_the_edge(device):
    args = list(make_problem(2, 4, 2, 32, 64, 9, torch.float32, device))
    with pytest.raises(ValueError, match="BLOCK_K a multiple of 32"):
        fused_moe_nvfp4(*args, config={**SMALL, "BLOCK_K": 16})
    bad = list(args)
    bad[2] = bad[2].float()  # block scales must be E4M3
    with pytest.raises(ValueError, match="w13_block_scale"):
        fused_moe_nvfp4(*bad)
    bad = list(args)
    bad[3] = bad[3][:, 0]  # one divisor per expert is the w2 form, not w13's
    with pytest.raises(ValueError, match="w13_global"):
        fused_moe_nvfp4(*bad)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_real_shapes(T, device):
    """Hidden 4096, 128 experts, top-4, width 2048 (bfloat16 activations), default block sizes."""
    args = make_problem(T, 128, 4, 4096, 2048, T, torch.bfloat16, device)
    assert_close(fused_moe_nvfp4(*args), fused_moe_nvfp4_reference(*args), torch.bfloat16)
