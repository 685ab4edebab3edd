"""Paged MLA decode in the absorbed form: one query per sequence against its latent cache, split over the context.

Every head shares the same cached row (``kv_lora_rank`` latent + ``qk_rope_head_dim`` roped key; the value is the
latent part), so one program loads each row once for a block of heads and scores them all with ``tl.dot``:
``s = q_latent @ c^T + q_rope @ k_rope^T``, ``o += p @ c``. Long contexts are split (flash-decoding): the grid is
(sequence, head block, split); each program walks its share of the sequence's tokens through the block table with
an online softmax in float32 and writes a partial output plus its log-sum-exp; a second kernel merges the splits.
Lengths are read on the device (``seq_lens`` is an int32 tensor), so the hot path never syncs with the host.
The reference twin is ``small4.kernels.mla_reference.decode_attention_padded``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split heuristic (see ``choose_num_splits``): aim for this many programs per SM, never give a split fewer than
# MIN_SPLIT_TOKENS tokens of the longest possible context, and never use more than MAX_SPLITS.
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 32


# The interpreter multiplies bfloat16 tiles as raw 16-bit integers (numpy has no bfloat16), so under it the dot
# operands are upcast to float32 first: the same products (exact in float32) and the same float32 accumulation.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr,
    q_rope_ptr,
    kv_ptr,
    bt_ptr,
    lens_ptr,
    o_part_ptr,
    lse_part_ptr,
    H,
    C,
    R,
    num_splits,
    qk_scale,  # softmax_scale * log2(e): the softmax runs in base 2
    stride_qlb,
    stride_qlh,
    stride_qrb,
    stride_qrh,
    stride_kv_row,
    stride_btb,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for a float32 query (no tf32 rounding); the default otherwise
    UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < H
    mask_c = offs_c < C
    mask_r = offs_r < R

    q_lat = tl.load(
        q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_c[None, :],
        mask=mask_h[:, None] & mask_c[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_C]
    q_rope = tl.load(
        q_rope_ptr + b * stride_qrb + offs_h[:, None] * stride_qrh + offs_r[None, :],
        mask=mask_h[:, None] & mask_r[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_R]

    # This split's token range: equal shares rounded up to whole BLOCK_N tiles; trailing splits may be empty.
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)

    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        block = tl.load(bt_ptr + b * stride_btb + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        rows = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE  # flat cache row of each token
        row_ptr = kv_ptr + rows[:, None] * stride_kv_row
        c = tl.load(row_ptr + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        k_rope = tl.load(row_ptr + C + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        c = c.to(q_lat.dtype)  # [BLOCK_N, BLOCK_C]
        k_rope = k_rope.to(q_rope.dtype)  # [BLOCK_N, BLOCK_R]

        s = _dot(q_lat, tl.trans(c), DOT_PRECISION, UPCAST_DOT)
        s += _dot(q_rope, tl.trans(k_rope), DOT_PRECISION, UPCAST_DOT)  # [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(c.dtype), c, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # base 2

    part = (b * H + offs_h) * num_splits + split  # o_part [B, H, S, C], lse_part [B, H, S]
    tl.store(o_part_ptr + part[:, None] * C + offs_c[None, :], out, mask=mask_h[:, None] & mask_c[None, :])
    tl.store(lse_part_ptr + part, lse, mask=mask_h)


@triton.jit
def _mla_decode_merge_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    H,
    C,
    num_splits,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_s = offs_s < num_splits
    mask_c = offs_c < C

    lse = tl.load(lse_part_ptr + pid * num_splits + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty context (seq_len 0) merges to zeros, not NaN
    w = tl.exp2(lse - m)  # [BLOCK_S]; empty splits weigh 0
    o = tl.load(
        o_part_ptr + (pid * num_splits + offs_s)[:, None] * C + offs_c[None, :],
        mask=mask_s[:, None] & mask_c[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewest programs is fastest


def choose_num_splits(batch: int, head_blocks: int, max_context: int, device: torch.device) -> int:
    """Enough (sequence, head block, split) programs to fill the GPU: about PROGRAMS_PER_SM per SM, but no split
    shorter than MIN_SPLIT_TOKENS of the longest context and at most MAX_SPLITS. Small batches with long contexts
    split most (one sequence, 32 heads in one head block, 128k tokens on an H100's 132 SMs: 264 splits wanted, 32
    used);
    large batches or short contexts do not split at all. Depends only on host-known shapes, never on device data."""
    target = PROGRAMS_PER_SM * _num_sms(device)
    wanted = triton.cdiv(target, max(batch * head_blocks, 1))
    longest = triton.cdiv(max(max_context, 1), MIN_SPLIT_TOKENS)
    return max(1, min(wanted, longest, MAX_SPLITS))


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens_tensor: torch.Tensor,
    softmax_scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged latent cache: q_latent [B, H, C], q_rope [B, H, R], kv_cache
    [num_blocks, block_size, C + R], block_tables [B, max_blocks] int32, seq_lens_tensor [B] int32 (on the
    device) -> [B, H, C] in q_latent's dtype. Same semantics as ``decode_attention_padded``.

    ``max_seq_len`` (a host-side bound on seq_lens, e.g. ``max(meta.seq_lens)``) only steers the split count;
    without it the block table's capacity is the bound. ``num_splits``, ``block_h`` and ``block_n`` override the
    heuristics (tests; a fixed ``num_splits`` for CUDA graphs)."""
    B, H, C = q_latent.shape
    R = q_rope.shape[-1]
    assert kv_cache.dim() == 3 and kv_cache.shape[-1] == C + R, "kv_cache must be [num_blocks, block_size, C + R]"
    assert kv_cache.stride(2) == 1 and kv_cache.stride(0) == kv_cache.shape[1] * kv_cache.stride(1)
    assert q_latent.stride(2) == 1 and q_rope.stride(2) == 1 and block_tables.stride(1) == 1
    block_size = kv_cache.shape[1]
    # tl.dot wants every dimension >= 16 on a GPU; padded heads and columns are masked.
    BLOCK_H = block_h or max(16, min(triton.next_power_of_2(H), 64))
    BLOCK_N = block_n or 32
    BLOCK_C = max(16, triton.next_power_of_2(C))
    BLOCK_R = max(16, triton.next_power_of_2(R))
    head_blocks = triton.cdiv(H, BLOCK_H)
    if num_splits is None:
        max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(B, head_blocks, max_context, q_latent.device)

    o_part = torch.empty(B, H, num_splits, C, dtype=torch.float32, device=q_latent.device)
    lse_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(B, head_blocks, num_splits)](
        q_latent,
        q_rope,
        kv_cache,
        block_tables,
        seq_lens_tensor,
        o_part,
        lse_part,
        H,
        C,
        R,
        num_splits,
        softmax_scale * LOG2E,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        kv_cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R,
        DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_INTERPRET,
    )
    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=q_latent.device)
    _mla_decode_merge_kernel[(B * H,)](
        o_part,
        lse_part,
        out,
        H,
        C,
        num_splits,
        out.stride(0),
        out.stride(1),
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_C=BLOCK_C,
    )
    return out
