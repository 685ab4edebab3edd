"""Fused MoE: the routed experts as two grouped GEMMs over token blocks sorted by expert.

``moe_align`` sorts the T * k (token, expert) assignments ("slots", slot = token * k + j) by expert and pads each
expert's group to a multiple of BLOCK_M, so every block of BLOCK_M sorted slots belongs to one expert. Then:

1. ``_gate_up_silu_kernel``: for each (block, column tile of I) one program computes both halves of
   ``x[token] @ w13[e]^T`` (gate rows ``n`` and up rows ``I + n``) in float32 and writes ``silu(gate) * up`` in the
   activation dtype to ``h`` [T * k, I], one row per slot (rows are addressed by slot, not by padded position, so
   padding costs no memory and the down kernel gathers nothing).
2. ``_down_kernel``: ``h[slot] @ w2[e]^T`` times the slot's routing weight, written to ``y`` [T * k, H].
3. ``y.view(T, k, H).sum(1)`` in torch: the top-k results of a token summed without atomics (deterministic, and no
   bfloat16 atomic adds), at the cost of one [T, k, H] buffer.

Weights are dense (float32 / bfloat16 / float16) or FP8 e4m3 with one scale per expert and per gate/up half
(``w13_scale`` [E, 2, 1]) and one per expert (``w2_scale`` [E, 1, 1]). FP8 tiles are loaded as FP8 and converted
to the activation dtype in the kernel (exact: every e4m3 value is a bfloat16 / float16 value); the scale, constant
over a tile's whole reduction, multiplies the float32 accumulator, which is the dequantised product. Activations
stay in the input dtype; accumulation is float32. The hot path never syncs with the host: the padded length is
bounded on the host (T * k + E * (BLOCK_M - 1)) and the true one is read by the kernels from a device tensor.

The reference twin is ``small4.kernels.moe_reference.fused_moe_reference`` (dense weights; FP8 dequantised by the
caller). ``fused_moe_nvfp4`` runs the same two GEMMs over NVFP4 experts kept 4-bit in memory (section below); its
twin is ``fused_moe_nvfp4_reference``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

# The interpreter multiplies bfloat16 tiles as raw 16-bit integers (numpy has no bfloat16), so under it the dot
# operands are upcast to float32 first: the same products (exact in float32) and the same float32 accumulation.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FP8_DTYPES = (torch.float8_e4m3fn,)

# Block sizes keyed by the range of token counts T (inclusive bounds) they serve: the default, used on any device
# without a measured table. A small BLOCK_M for decode, where each expert sees a few tokens; larger tiles for
# prefill. ``small4 bench tune-moe --write-table`` measures a table on a GPU and writes it to
# ``moe_configs/<device name>.json``, which then replaces this one on that device.
_NOT_TUNED = "not yet tuned on hardware"
MOE_CONFIGS: dict[tuple[int, int], dict[str, int | str]] = {
    (0, 32): {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "status": _NOT_TUNED},
    (33, 256): {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "status": _NOT_TUNED},
    (257, 2048): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "status": _NOT_TUNED},
    (2049, 1 << 62): {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "num_warps": 8,
        "num_stages": 3,
        "status": _NOT_TUNED,
    },
}
TUNED_DIR = Path(__file__).parent / "moe_configs"


def table_path(device_name: str, directory: Path = TUNED_DIR) -> Path:
    """Where the measured table of a device lives: its name with anything but letters and digits as '_'."""
    return directory / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def load_table(path: Path) -> dict[tuple[int, int], dict[str, int | str]] | None:
    """A tuned table written by ``small4 bench tune-moe``; None when the file does not exist."""
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["table"]
    return {(row["lo"], row["hi"]): {k: v for k, v in row.items() if k not in ("lo", "hi")} for row in rows}


@functools.lru_cache(maxsize=8)
def _device_table(device: torch.device | None) -> dict[tuple[int, int], dict[str, int | str]]:
    """Looked up once per device, not on every call (the device name query and the file read are host work)."""
    if device is None or device.type != "cuda":
        return MOE_CONFIGS
    return load_table(table_path(torch.cuda.get_device_name(device))) or MOE_CONFIGS


def choose_config(num_tokens: int, device: torch.device | None = None, table: dict | None = None) -> dict:
    """The entry whose token range holds ``num_tokens``: from ``table``, else the device's tuned table, else
    ``MOE_CONFIGS``."""
    for (lo, hi), config in (table or _device_table(device)).items():
        if lo <= num_tokens <= hi:
            return dict(config)
    raise ValueError(f"no MoE block-size entry covers {num_tokens} tokens")


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the T * k slots by expert and pads each expert's group to a multiple of ``block_m``.

    Returns ``sorted_token_ids`` [max_padded] (int32 slot ids, token = slot // k; padding and the unused tail hold
    the sentinel T * k), ``expert_ids`` [max_padded // block_m] (int32 expert of each block; blocks past the end
    hold -1) and ``num_tokens_post_padded`` [1] (int32, the used length, a multiple of ``block_m``). ``max_padded``
    = round_up(T * k + (E + 1) * (block_m - 1), block_m) is known without reading the device, so nothing syncs.
    Experts with no tokens get no block. Slots of one expert keep their original (token-major) order.

    A negative id is an assignment this rank does not compute (expert parallelism: another rank holds the expert).
    Those slots sort into one last group after every expert's, whose blocks have expert id -1: the kernels do no
    work for them but store zeros into their output rows, so the combine needs no mask and no sync.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N], N = T * k
    n = flat.numel()
    flat = torch.where(flat < 0, num_experts, flat)  # not-here slots: bucket E, after every real expert
    num_experts += 1
    max_padded = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    # scatter_add, not bincount: CUDA's bincount reads the max id on the host (a sync, and no graph capture)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    start = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    order = torch.argsort(flat, stable=True)  # [N] slots sorted by expert
    expert_sorted = flat[order]  # [N]
    rank = torch.arange(n, device=device) - start[expert_sorted]  # [N] position within the expert's group
    dest = padded_start[expert_sorted] + rank  # [N]
    sorted_token_ids = torch.full((max_padded,), n, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    blocks = torch.arange(max_padded // block_m, device=device)  # [num_blocks]
    block_end = padded_end // block_m  # [E] one past each expert's last block
    expert_ids = torch.searchsorted(block_end, blocks, right=True)  # [num_blocks] experts ending at or before b
    expert_ids = torch.where(expert_ids < num_experts - 1, expert_ids, -1).to(torch.int32)  # bucket E and the tail
    num_tokens_post_padded = padded_end[-1:].to(torch.int32)  # [1]
    return sorted_token_ids, expert_ids, num_tokens_post_padded


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    h_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_slots,
    I,
    K,
    top_k,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ht,
    stride_hn,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """h[slot, n] = silu(x[t] . w13[e, n]) * (x[t] . w13[e, I + n]) for the BLOCK_M slots of one block, e its expert."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_post_padded = tl.load(num_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post_padded:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [BM]
    valid = slots < num_slots
    tokens = slots // top_k
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # slots another rank computes: no h needed
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BM, BK]
    w_base = w_ptr + expert * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN] gate rows
    u_ptrs = g_ptrs + I * stride_wn  # [BK, BN] up rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        wu = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        acc_g = _dot(a, wg, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _dot(a, wu, acc_u, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        acc_g = acc_g * tl.load(scale_ptr + expert * 2)
        acc_u = acc_u * tl.load(scale_ptr + expert * 2 + 1)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, float32
    h_ptrs = h_ptr + slots[:, None] * stride_ht + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    w_ptr,
    scale_ptr,
    topk_weights_ptr,
    y_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_slots,
    N,
    K,
    stride_ht,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_yt,
    stride_yn,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[slot, n] = topk_weight[slot] * (h[slot] . w2[e, n]) for the BLOCK_M slots of one block, e its expert."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_post_padded = tl.load(num_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post_padded:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [BM]
    valid = slots < num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if expert < 0:  # slots another rank computes: zeros, so the combine's sum over k needs no mask
        zero_ptrs = y_ptr + slots[:, None] * stride_yt + offs_n[None, :] * stride_yn
        tl.store(
            zero_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :]
        )
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + slots[:, None] * stride_ht + offs_k[None, :] * stride_hk  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        acc = _dot(a, w, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + expert)
    weight = tl.load(topk_weights_ptr + slots, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + slots[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _scale_table(scale: torch.Tensor | None, num_experts: int, parts: int, name: str) -> torch.Tensor:
    """A per-expert (per-part) scale as a contiguous float32 [E * parts] table; per-tensor scales are broadcast."""
    if scale is None:
        raise ValueError(f"FP8 weights need {name}")
    s = scale.to(torch.float32).reshape(-1)
    if s.numel() == 1:
        s = s.expand(num_experts * parts)
    elif s.numel() == num_experts and parts > 1:
        s = s.repeat_interleave(parts)
    elif s.numel() != num_experts * parts:
        raise ValueError(f"{name} of shape {tuple(scale.shape)} is not one scale per expert (and per half)")
    return s.contiguous()


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids / topk_weights [T, k] -> [T, H] in x's dtype:
    sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x)). FP8 weights come with ``w13_scale`` [E, 2, 1] and
    ``w2_scale`` [E, 1, 1]. ``config`` (BLOCK_M / BLOCK_N / BLOCK_K, optionally num_warps / num_stages) overrides
    the block sizes chosen from ``MOE_CONFIGS`` by T."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    if w13.shape[2] != H or w2.shape != (E, H, I) or two_i != 2 * I:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if T == 0:
        return torch.zeros_like(x)
    fp8 = w13.dtype in FP8_DTYPES
    if fp8 != (w2.dtype in FP8_DTYPES):
        raise ValueError("w13 and w2 must both be FP8 or both dense")
    scale13 = _scale_table(w13_scale, E, 2, "w13_scale") if fp8 else x.new_empty(1, dtype=torch.float32)
    scale2 = _scale_table(w2_scale, E, 1, "w2_scale") if fp8 else x.new_empty(1, dtype=torch.float32)
    if not fp8:
        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)  # no-op when the weights are already in the activation dtype

    cfg = config or choose_config(T, x.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {} if _INTERPRET else {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 is the parity dtype: no TF32 rounding
    upcast = _INTERPRET and x.dtype != torch.float32

    sorted_ids, expert_ids, num_post_padded = moe_align(topk_ids, E, bm)
    weights = topk_weights.reshape(-1).contiguous()  # [T * k], indexed by slot
    num_slots = T * k
    num_blocks = expert_ids.numel()

    h = x.new_empty(num_slots, I)  # [T * k, I]
    _gate_up_silu_kernel[(num_blocks, triton.cdiv(I, bn))](
        x,
        w13,
        scale13,
        h,
        sorted_ids,
        expert_ids,
        num_post_padded,
        num_slots,
        I,
        H,
        k,
        x.stride(0),
        x.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        h.stride(0),
        h.stride(1),
        HAS_SCALE=fp8,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION=precision,
        UPCAST=upcast,
        **launch,
    )
    y = x.new_empty(num_slots, H)  # [T * k, H]
    _down_kernel[(num_blocks, triton.cdiv(H, bn))](
        h,
        w2,
        scale2,
        weights,
        y,
        sorted_ids,
        expert_ids,
        num_post_padded,
        num_slots,
        H,
        I,
        h.stride(0),
        h.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_SCALE=fp8,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION=precision,
        UPCAST=upcast,
        **launch,
    )
    return y.view(T, k, H).sum(dim=1)  # [T, H]


# ---------------------------------------------------------------- NVFP4 (weight-only 4-bit)
#
# Weights packed two E2M1 codes per byte along the reduction dim (element 2j in the low nibble, 2j + 1 in the high
# one), one E4M3 scale per 16 values and a per-expert float32 divisor (``small4.kernels.nvfp4``). A K-step of
# BLOCK_K values is one [BLOCK_K / 2, BLOCK_N] tile of packed bytes: its low nibbles are the weights of the even
# k, its high nibbles those of the odd k, so the step is two dots, even activation columns against the low
# nibbles and odd columns against the high ones, and nothing is ever interleaved in registers. Both k of a byte
# share one 16-value scale block (16 is even), so one gathered scale tile serves both halves.


@triton.jit
def _e2m1(code):
    """4-bit E2M1 codes (int32) -> float32 values, exactly: magnitude (2 + m) * 2^e / 4 (e = 1..3) or m / 2 (e = 0)
    for the code's 2-bit exponent e and 1-bit mantissa m; bit 3 is the sign. Integer ops, no table, no denormals."""
    e = (code >> 1) & 3
    m = code & 1
    q = tl.where(e == 0, 2 * m, (2 + m) << e)  # 4 * |value|
    v = q.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _to_act(w, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """float32 -> the activation dtype, round to nearest even. The interpreter truncates float32 -> bfloat16
    casts (a bias of half an ulp on every weight), so under it (RNE_BF16) the rounding is done on the bits and
    the tile stays float32 holding bfloat16 values (the dot upcasts there anyway)."""
    if RNE_BF16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        return w.to(dtype)


@triton.jit
def _fp4_tiles(w_ptrs, s_ptrs, mask, inv_global, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """One [BLOCK_K / 2, BLOCK_N] tile of packed bytes and its gathered scales -> the dequantised even-k and odd-k
    weight tiles in ``dtype``: e2m1 * block_scale * (1 / global), rounded once to the activation dtype."""
    packed = tl.load(w_ptrs, mask=mask, other=0).to(tl.int32)
    step = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_global
    w_even = _to_act(_e2m1(packed & 0xF) * step, dtype, RNE_BF16)
    w_odd = _to_act(_e2m1(packed >> 4) * step, dtype, RNE_BF16)
    return w_even, w_odd


@triton.jit
def _gate_up_silu_nvfp4_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    h_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_slots,
    I,
    K,
    top_k,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_ht,
    stride_hn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """``_gate_up_silu_kernel`` over NVFP4 weights: w13 packed [E, 2I, K/2], scales [E, 2I, K/16], divisors [E, 2]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_post_padded = tl.load(num_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post_padded:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [BM]
    valid = slots < num_slots
    tokens = slots // top_k
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # slots another rank computes: no h needed
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_p = tl.arange(0, BLOCK_K // 2)  # packed column (byte) within the step; covers k = 2p and 2p + 1
    x_even = x_ptr + tokens[:, None] * stride_xt + (2 * offs_p)[None, :] * stride_xk  # [BM, BK/2]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_p[:, None] * stride_wk  # [BK/2, BN]
    u_ptrs = g_ptrs + I * stride_wn
    gs_ptrs = ws_ptr + expert * stride_se + offs_n[None, :] * stride_sn + (offs_p // 8)[:, None] * stride_sk
    us_ptrs = gs_ptrs + I * stride_sn
    inv_g = 1.0 / tl.load(wg_ptr + expert * 2)
    inv_u = 1.0 / tl.load(wg_ptr + expert * 2 + 1)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p_mask = offs_p < (K - k0) // 2  # K is a multiple of 16: a step's tail is whole bytes
        a_mask = valid[:, None] & p_mask[None, :]
        a_even = tl.load(x_even, mask=a_mask, other=0.0)
        a_odd = tl.load(x_even + stride_xk, mask=a_mask, other=0.0)
        w_mask = p_mask[:, None] & n_mask[None, :]
        g_even, g_odd = _fp4_tiles(g_ptrs, gs_ptrs, w_mask, inv_g, a_even.dtype, RNE_BF16)
        u_even, u_odd = _fp4_tiles(u_ptrs, us_ptrs, w_mask, inv_u, a_even.dtype, RNE_BF16)
        acc_g = _dot(a_even, g_even, acc_g, DOT_PRECISION, UPCAST)
        acc_g = _dot(a_odd, g_odd, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _dot(a_even, u_even, acc_u, DOT_PRECISION, UPCAST)
        acc_u = _dot(a_odd, u_odd, acc_u, DOT_PRECISION, UPCAST)
        x_even += BLOCK_K * stride_xk
        g_ptrs += (BLOCK_K // 2) * stride_wk
        u_ptrs += (BLOCK_K // 2) * stride_wk
        gs_ptrs += (BLOCK_K // 16) * stride_sk
        us_ptrs += (BLOCK_K // 16) * stride_sk
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, float32
    h_ptrs = h_ptr + slots[:, None] * stride_ht + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_nvfp4_kernel(
    h_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    topk_weights_ptr,
    y_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_slots,
    N,
    K,
    stride_ht,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_yt,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """``_down_kernel`` over NVFP4 weights: w2 packed [E, H, I/2], scales [E, H, I/16], divisors [E]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_post_padded = tl.load(num_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post_padded:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [BM]
    valid = slots < num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if expert < 0:  # slots another rank computes: zeros, so the combine's sum over k needs no mask
        zero_ptrs = y_ptr + slots[:, None] * stride_yt + offs_n[None, :] * stride_yn
        tl.store(
            zero_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :]
        )
        return
    offs_p = tl.arange(0, BLOCK_K // 2)
    a_even = h_ptr + slots[:, None] * stride_ht + (2 * offs_p)[None, :] * stride_hk  # [BM, BK/2]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_p[:, None] * stride_wk  # [BK/2, BN]
    s_ptrs = ws_ptr + expert * stride_se + offs_n[None, :] * stride_sn + (offs_p // 8)[:, None] * stride_sk
    inv_g = 1.0 / tl.load(wg_ptr + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p_mask = offs_p < (K - k0) // 2
        a_mask = valid[:, None] & p_mask[None, :]
        a0 = tl.load(a_even, mask=a_mask, other=0.0)
        a1 = tl.load(a_even + stride_hk, mask=a_mask, other=0.0)
        w0, w1 = _fp4_tiles(w_ptrs, s_ptrs, p_mask[:, None] & n_mask[None, :], inv_g, a0.dtype, RNE_BF16)
        acc = _dot(a0, w0, acc, DOT_PRECISION, UPCAST)
        acc = _dot(a1, w1, acc, DOT_PRECISION, UPCAST)
        a_even += BLOCK_K * stride_hk
        w_ptrs += (BLOCK_K // 2) * stride_wk
        s_ptrs += (BLOCK_K // 16) * stride_sk
    weight = tl.load(topk_weights_ptr + slots, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + slots[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _check_nvfp4(x, w13_packed, w13_block_scale, w13_global, w2_packed, w2_block_scale, w2_global) -> int:
    """Validates the NVFP4 operands once at the kernel's edge; returns I."""
    T, H = x.shape
    E, two_i, half_h = w13_packed.shape
    I = two_i // 2
    want = {
        "w13_packed": (w13_packed, torch.uint8, (E, 2 * I, H // 2)),
        "w13_block_scale": (w13_block_scale, torch.float8_e4m3fn, (E, 2 * I, H // 16)),
        "w13_global": (w13_global, torch.float32, (E, 2)),
        "w2_packed": (w2_packed, torch.uint8, (E, H, I // 2)),
        "w2_block_scale": (w2_block_scale, torch.float8_e4m3fn, (E, H, I // 16)),
        "w2_global": (w2_global, torch.float32, (E,)),
    }
    if H % 16 or I % 16 or two_i != 2 * I:
        raise ValueError(
            f"NVFP4 needs hidden and width multiples of 16, got x {tuple(x.shape)}, w13 {tuple(w13_packed.shape)}"
        )
    for name, (t, dtype, shape) in want.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
    return I


def fused_moe_nvfp4(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_block_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_block_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``fused_moe`` with NVFP4 expert weights kept 4-bit in memory and dequantised tile by tile in the kernels.

    x [T, H] (bfloat16, or float32 for parity); w13_packed uint8 [E, 2I, H/2] (low nibble = even element),
    w13_block_scale float8_e4m3fn [E, 2I, H/16], w13_global float32 [E, 2] (the checkpoint's divisors of the gate
    and the up half); w2_packed uint8 [E, H, I/2], w2_block_scale [E, H, I/16], w2_global float32 [E]. A weight is
    e2m1(code) * block_scale / global (``small4.kernels.nvfp4.dequantize_nvfp4``). ``config``'s BLOCK_K must be
    a multiple of 32 (two nibbles per byte times a 16-value scale block). Returns [T, H] in x's dtype.
    """
    T, H = x.shape
    I = _check_nvfp4(x, w13_packed, w13_block_scale, w13_global, w2_packed, w2_block_scale, w2_global)
    E = w13_packed.shape[0]
    k = topk_ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    cfg = config or choose_config(T, x.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk % 32:
        raise ValueError(f"NVFP4 needs BLOCK_K a multiple of 32, got {bk}")
    launch = {} if _INTERPRET else {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = _INTERPRET and x.dtype != torch.float32
    rne_bf16 = _INTERPRET and x.dtype == torch.bfloat16

    sorted_ids, expert_ids, num_post_padded = moe_align(topk_ids, E, bm)
    weights = topk_weights.reshape(-1).contiguous()  # [T * k], indexed by slot
    num_slots = T * k
    num_blocks = expert_ids.numel()
    w13_global, w2_global = w13_global.contiguous(), w2_global.contiguous()

    h = x.new_empty(num_slots, I)  # [T * k, I]
    _gate_up_silu_nvfp4_kernel[(num_blocks, triton.cdiv(I, bn))](
        x,
        w13_packed,
        w13_block_scale,
        w13_global,
        h,
        sorted_ids,
        expert_ids,
        num_post_padded,
        num_slots,
        I,
        H,
        k,
        *x.stride(),
        *w13_packed.stride(),
        *w13_block_scale.stride(),
        *h.stride(),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION=precision,
        UPCAST=upcast,
        RNE_BF16=rne_bf16,
        **launch,
    )
    y = x.new_empty(num_slots, H)  # [T * k, H]
    _down_nvfp4_kernel[(num_blocks, triton.cdiv(H, bn))](
        h,
        w2_packed,
        w2_block_scale,
        w2_global,
        weights,
        y,
        sorted_ids,
        expert_ids,
        num_post_padded,
        num_slots,
        H,
        I,
        *h.stride(),
        *w2_packed.stride(),
        *w2_block_scale.stride(),
        *y.stride(),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION=precision,
        UPCAST=upcast,
        RNE_BF16=rne_bf16,
        **launch,
    )
    return y.view(T, k, H).sum(dim=1)  # [T, H]
