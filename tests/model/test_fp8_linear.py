"""FP8 dense matmul (W8A8 through ``torch._scaled_mm``) against its plain-PyTorch twin, and ``Linear``'s choice
between it and the exact dequantising path.

Tolerances. ``fp8_linear`` and ``fp8_linear_reference`` quantise the activation identically, so they only differ by
summation order: float32 outputs agree to ``FP32_TOL`` of the output's magnitude; BF16 outputs are the same float32
value rounded once, at most one BF16 ulp apart (``2**-7`` of the magnitude). Against the unquantised model the error
is the e4m3 activation rounding (3 mantissa bits: up to 2**-4 relative per element, mostly averaging out in the dot
products), hence the looser per-matmul and end-to-end bounds with the tiny model below.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import small4.model.layers as layers
from small4.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8_per_tensor
from small4.kernels.fp8_linear import fp8_linear, fp8_linear_reference, quantize_activation, row_scale, supports
from small4.kernels.registry import kernel_ops
from small4.model.context import AttentionMetadata
from small4.model.layers import Linear
from small4.weights.loader import load_model
from small4.weights.tiny import TinySpec, make_tiny

FP32_TOL = 1e-5
BF16_TOL = 2**-7


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise difference relative to the reference's largest magnitude."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def _weight(n: int, k: int, per_row: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight [n, k] with a per-tensor scale, or one scale per half of the rows (like fused gate/up): [2, 1]."""
    w = torch.randn(n, k, generator=g) / k**0.5
    if not per_row:
        return quantize_fp8_per_tensor(w)
    halves = [quantize_fp8_per_tensor(h * (i + 1)) for i, h in enumerate(w.chunk(2))]
    return torch.cat([q for q, _ in halves]), torch.stack([s for _, s in halves]).reshape(2, 1)


def _fp8_linear_module(n: int, k: int, g: torch.Generator, input_scale: torch.Tensor | None = None) -> Linear:
    lin = Linear(k, n)
    q, scale = _weight(n, k, per_row=False, g=g)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    lin.weight_scale, lin.input_scale = scale, input_scale
    return lin


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("SMALL4_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("SMALL4_KERNELS", "reference")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("k,n", [(16, 16), (64, 48), (96, 160)])
@pytest.mark.parametrize("m", [1, 3, 64])
def test_matches_reference(m, k, n, per_row, static, out_dtype, device):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    q, scale = (t.to(device) for t in _weight(n, k, per_row, g))
    x = (torch.randn(m, k, generator=g) * 3).to(out_dtype).to(device)
    # a calibrated static scale that saturates the largest activations a little, as real calibration may
    input_scale = (x.float().abs().max() / FP8_MAX * 0.8).reshape(()) if static else None
    out = fp8_linear(x, q, scale, input_scale, out_dtype)
    ref = fp8_linear_reference(x, q, scale, input_scale, out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    assert _max_err(out, ref) <= (FP32_TOL if out_dtype == torch.float32 else BF16_TOL)


def test_leading_dims_are_flattened():
    g = torch.Generator().manual_seed(1)
    q, scale = _weight(32, 48, per_row=False, g=g)
    x = torch.randn(2, 5, 48, generator=g)
    out = fp8_linear(x, q, scale, None, torch.float32)
    assert out.shape == (2, 5, 32)
    assert torch.allclose(out.reshape(10, 32), fp8_linear(x.reshape(10, 48), q, scale, None, torch.float32))


def test_zero_rows_give_zeros_not_nan():
    g = torch.Generator().manual_seed(2)
    q, scale = _weight(32, 32, per_row=False, g=g)
    x = torch.randn(3, 32, generator=g)
    x[1] = 0
    out = fp8_linear(x, q, scale, None, torch.float32)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0] != 0).any()
    assert (fp8_linear(torch.zeros(4, 32), q, scale, None, torch.bfloat16) == 0).all()
    _, act_scale = quantize_activation(torch.zeros(2, 32), None)
    assert (act_scale > 0).all()


def test_row_scale_expands_blocks_like_dequantize():
    scale = torch.tensor([[0.5], [2.0], [3.0]])
    q = torch.ones(40, 16).to(FP8_DTYPE)  # 3 row blocks of ceil(40/3) = 14 rows, the last one cropped
    rows = row_scale(scale, 40)
    assert rows.shape == (40, 1) and torch.equal(dequantize_fp8(q, scale), q.float() * rows)
    assert row_scale(rows, 40) is rows  # already per-row float32: no copy
    assert row_scale(torch.tensor(0.25), 40).shape == (1, 1)


def test_supports():
    q16 = torch.zeros(32, 48, dtype=FP8_DTYPE)
    one = torch.tensor(1.0)
    assert supports(q16, one) and supports(q16, torch.ones(2, 1)) and supports(q16, torch.ones(32, 1))
    assert supports(q16, one, torch.tensor(0.5)) and supports(q16, one, torch.ones(1))
    assert not supports(torch.zeros(32, 40, dtype=FP8_DTYPE), one)  # K not a multiple of 16
    assert not supports(torch.zeros(24, 48, dtype=FP8_DTYPE), one)  # N not a multiple of 16
    assert not supports(q16, torch.ones(2, 3))  # block scales along K
    assert not supports(q16, torch.ones(32))  # 1-D: not a form dequantize_fp8 reads either
    assert not supports(q16, one, torch.ones(48))  # per-channel activation scale
    assert not supports(q16, None) and not supports(torch.zeros(32, 48), one)
    assert not supports(torch.zeros(48, 32, dtype=FP8_DTYPE).t(), one)  # not row-major


@pytest.mark.parametrize(
    "shape,scale_shape",
    [((24, 48), ()), ((32, 40), ()), ((32, 48), (2, 3))],
    ids=["N=24", "K=40", "block-scale"],
)
def test_linear_falls_back_to_exact_dequant(fast, shape, scale_shape):
    g = torch.Generator().manual_seed(3)
    n, k = shape
    lin = Linear(k, n)
    lin.weight = torch.nn.Parameter((torch.randn(n, k, generator=g) * 4).to(FP8_DTYPE), requires_grad=False)
    lin.weight_scale = torch.rand(scale_shape, generator=g) + 0.5
    x = torch.randn(5, k, generator=g)
    assert lin.ops.fp8_linear and not supports(lin.weight, lin.weight_scale)
    assert torch.equal(lin(x), F.linear(x, dequantize_fp8(lin.weight, lin.weight_scale, torch.float32)))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fast_path(fast, static, dtype):
    g = torch.Generator().manual_seed(4)
    lin = _fp8_linear_module(48, 64, g, input_scale=torch.tensor(0.02) if static else None)
    x = torch.randn(2, 7, 64, generator=g).to(dtype)
    out = lin(x)
    ref = fp8_linear_reference(x, lin.weight, lin.weight_scale, lin.input_scale, dtype)
    assert out.shape == (2, 7, 48) and out.dtype == dtype
    assert _max_err(out, ref) <= (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert torch.equal(out, fp8_linear(x, lin.weight, lin.weight_scale, lin.input_scale, dtype))


def test_linear_reference_path_is_the_old_dequant(reference):
    g = torch.Generator().manual_seed(5)
    lin = _fp8_linear_module(48, 64, g, input_scale=torch.tensor(0.02))
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    assert not lin.ops.fp8_linear
    assert torch.equal(lin(x), F.linear(x, dequantize_fp8(lin.weight, lin.weight_scale, torch.bfloat16)))


def test_selection_follows_kernel_backend(monkeypatch):
    """A linear built on the CPU takes FP8 through ``fp8_linear`` only where the Triton kernels are forced; the model
    chooses again, once, for the device it is placed on (``set_backend``), and the choice stays on the module."""
    monkeypatch.delenv("SMALL4_KERNELS", raising=False)
    assert not Linear(16, 16).ops.fp8_linear  # auto: reference on CPU
    monkeypatch.setenv("SMALL4_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lin = Linear(16, 16)
    assert lin.ops.fp8_linear
    monkeypatch.setenv("SMALL4_KERNELS", "reference")
    assert lin.ops.fp8_linear  # read at build, not in forward


def test_cached_scale_follows_a_replaced_scale(fast):
    g = torch.Generator().manual_seed(6)
    lin = _fp8_linear_module(32, 32, g)
    x = torch.randn(3, 32, generator=g)
    before = lin(x)
    lin.weight_scale = lin.weight_scale * 2
    assert torch.allclose(lin(x), before * 2, rtol=1e-6, atol=0)


def _logits(model, n: int = 24) -> torch.Tensor:
    ids = torch.arange(1000, 1000 + n) % model.config.text.vocab_size
    return model.compute_logits(model(ids, torch.arange(n), AttentionMetadata.for_prefill([n])))


def _rel_norm(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _three_runs(model, monkeypatch) -> dict:
    """Logits with only ``Linear``'s FP8 choice switched (the other kernels stay on the reference backend, so the
    differences are exactly the W8A8 matmuls): dequantised ("ref"), ``fp8_linear`` ("fast") and its twin in every
    layer ("twin"). "errors" maps the id of each weight that went through ``fp8_linear`` to its output's relative
    error against the dequantised matmul on the same (real) activation."""
    errors: dict[int, float] = {}

    def checked(x, weight, scale, input_scale, out_dtype):
        out = fp8_linear(x, weight, scale, input_scale, out_dtype)
        errors[id(weight)] = _rel_norm(out, F.linear(x, dequantize_fp8(weight, scale, x.dtype)))
        return out

    def linears_on(backend: str) -> None:
        ops = kernel_ops(backend)
        for module in model.modules():
            if isinstance(module, Linear):
                module.ops = ops

    linears_on("reference")
    ref = _logits(model)
    linears_on("triton")
    monkeypatch.setattr(layers, "fp8_linear", fp8_linear_reference)
    twin = _logits(model)
    monkeypatch.setattr(layers, "fp8_linear", checked)
    return {"ref": ref, "fast": _logits(model), "twin": twin, "errors": errors}


# e4m3 keeps 3 mantissa bits: each activation is rounded by up to 2**-4 of itself (RMS ~2**-4 / sqrt(3) = 3.6%),
# and a dot product averages those roundings, so one W8A8 matmul is a few percent off the dequantised one
# (measured: 1.7-2.9%). The random tiny model then amplifies every rounding (its bf16 logits are already 3.4% off
# its float32 logits, with 16x finer rounding than e4m3) and top-k routing may flip for a token: the logits move
# by ~21% (2 layers) or ~7% (1 layer, fewer W8A8 layers) of their norm, so LOGITS_TOL is loose on purpose; the
# per-matmul bound and the twin (same quantisation, float32 matmul) are the tight checks.
MATMUL_TOL = 0.04
LOGITS_TOL = 0.3
TWIN_TOL = 1e-4
SPEC = TinySpec(num_layers=2, num_experts=4, num_bpe_ranks=300)  # every attention/shared-expert dim a multiple of 16


@torch.no_grad()
def test_tiny_model_logits_fast_vs_reference(tmp_path, monkeypatch):
    model_dir = make_tiny(tmp_path, layout="hf", fp8=True, spec=SPEC)
    # The twin bound holds while no activation lands on an e4m3 rounding tie, where float32 noise between the two
    # matmuls flips one rounding: with the plain softmax scale (small4's reading of config.json since issue 11) one
    # of these 40 tokens does (fast vs twin 2.7e-3, routing identical); the mscale^2 scale this test was measured
    # with does not (2.9e-6). A fragility of the fast-vs-twin comparison, not of the scale: kept on the old scale.
    model = load_model(model_dir, torch.float32, keep_fp8=True, progress=False, attention_scale_mscale="on")
    runs = _three_runs(model, monkeypatch)
    for layer in model.layers:
        attn, shared = layer.self_attn, layer.mlp.shared_experts
        for lin in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj, shared.gate_up, shared.down):
            assert id(lin.weight) in runs["errors"]  # the fast path ran for every aligned FP8 layer
    assert max(runs["errors"].values()) <= MATMUL_TOL
    assert _max_err(runs["fast"], runs["twin"]) <= TWIN_TOL
    assert _rel_norm(runs["fast"], runs["ref"]) <= LOGITS_TOL


@torch.no_grad()
def test_tiny_model_unaligned_layers_fall_back(tmp_path, monkeypatch):
    spec = TinySpec(num_layers=1, num_experts=4, num_bpe_ranks=300, v_head_dim=18)  # o_proj K=72, kv_b N=136
    model_dir = make_tiny(tmp_path, layout="hf", fp8=True, spec=spec)
    model = load_model(model_dir, torch.float32, keep_fp8=True, progress=False)
    runs = _three_runs(model, monkeypatch)
    attn = model.layers[0].self_attn
    assert id(attn.q_a_proj.weight) in runs["errors"]
    assert id(attn.o_proj.weight) not in runs["errors"] and id(attn.kv_b_proj.weight) not in runs["errors"]
    assert max(runs["errors"].values()) <= MATMUL_TOL
    assert _max_err(runs["fast"], runs["twin"]) <= TWIN_TOL
    assert _rel_norm(runs["fast"], runs["ref"]) <= LOGITS_TOL
