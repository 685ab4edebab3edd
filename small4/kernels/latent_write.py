"""The MLA latent write: ``kv_a_layernorm`` of the latent, rope of the shared key, the cast and the paged-cache
scatter, fused into one pass over each token's ``kv_a_proj_with_mqa`` row.

Every layer turns its ``[T, C + R]`` projection into the cached latent: RMSNorm (float32) of the first C values,
the rotary embedding of the last R (interleaved pairs in, de-interleaved halves out, as ``RotaryEmbedding.apply``
lays them out), a cast to the cache dtype and a scatter to ``slot_mapping``. In PyTorch that is about six small
kernels plus an index_put per layer and step, each re-reading the row; here one program per token reads the row
once, writes the ``latents`` the attention still needs (in the dtype PyTorch's ops would give: x's dtype for a
model in one dtype) and the cache row.

Bit-for-bit the same as the reference twin ``latent_reference.latent_write_reference`` (the model's own ops), except the
RMSNorm sum of squares, summed in another float32 order (and ``rsqrt`` is the hardware's on a GPU, as in PyTorch):
a few float32 ulps in the normed latent, which its rounding to bfloat16 almost always absorbs:
- every rounding PyTorch does is done here at the same point (the norm to x's dtype before the weight, each rope
  product, sum and difference in the rope dtype), so no fused multiply-add and no skipped rounding changes a bit;
- casts are rounded here explicitly, round-to-nearest-even on the float32 bits (``_round``), and only then stored,
  so the store casts an exactly representable value: the same result whatever rounding the backend's cast uses.
  The interpreter's casts truncate (bfloat16) or neither round to nearest nor saturate (float8), so this is also
  what makes the CPU tests meaningful. float8_e4m3fn rounds to nearest even and saturates to +-448 (infinities
  too), NaN stays NaN: exactly ``Tensor.to(torch.float8_e4m3fn)`` of the installed PyTorch (2.13; older releases
  gave NaN past 464) and the GPU's ``cvt.rn.satfinite``. (The interpreter alone stores a NaN as 384 in float8.)
- the mean of squares is an IEEE division (``div_rn``), not Triton's approximate ``/``.

A negative slot (vLLM's padding convention) writes nothing; the engine itself pads into a spare block instead.
Shapes are read on the host and nothing on the device is, so the launch is CUDA-graph safe (no sync).
Triton is optional on CPU-only installs: without it this module still imports. The attention imports it only when
the Triton backend is chosen, so that ``TRITON_INTERPRET`` is read when the kernels are decorated, not earlier.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # pragma: no cover - CPU-only installs; the kernels below are never launched there
    triton = tl = None

    def _jit(fn):
        return fn


# Rounding formats: the code ``_round`` switches on for each dtype the kernel rounds to.
_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}


@_jit
def _round_mantissa(x, DROP: tl.constexpr):
    """Round-to-nearest-even of float32 ``x`` to ``23 - DROP`` mantissa bits, on its bits (overflow carries into
    the exponent, up to infinity, as it should)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    return ((bits >> DROP) << DROP).to(tl.float32, bitcast=True)


@_jit
def _round_subnormal(x, rounded, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr):
    """Below the format's smallest normal its step is fixed, and ``|x| + MAGIC`` (MAGIC's float32 ulp is that step)
    rounds to nearest even at it; the sign is copied back bitwise, so -0.0 stays -0.0."""
    a = tl.abs(x)
    sub = ((a + MAGIC) - MAGIC).to(tl.uint32, bitcast=True)
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return tl.where(a < MIN_NORMAL, (sub | sign).to(tl.float32, bitcast=True), rounded)


@_jit
def _round(x, FMT: tl.constexpr):
    """float32 ``x`` rounded as ``.to(dtype)`` rounds it, still in float32 (exactly representable in the dtype):
    0 float32, 1 bfloat16, 2 float16, 3 float8_e4m3fn (saturating)."""
    if FMT == 1:
        x = _round_mantissa(x, 16)  # bfloat16 has float32's exponent range: its subnormals round the same way
    elif FMT == 2:
        x = _round_subnormal(x, _round_mantissa(x, 13), 6.103515625e-05, 0.5)  # 2^-14, step 2^-24
    elif FMT == 3:
        x = _round_subnormal(x, _round_mantissa(x, 20), 0.015625, 16384.0)  # 2^-6, step 2^-9
        x = tl.where(tl.abs(x) > 448.0, tl.where(x < 0.0, -448.0, 448.0), x)  # NaN compares false: stays NaN
    return x


@_jit
def _latent_write_kernel(
    ckv_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    out_ptr,
    cache_ptr,
    C,
    HALF,
    eps,
    block_size,
    stride_ckv,
    stride_cos,
    stride_sin,
    stride_out,
    stride_cache_block,
    stride_cache_row,
    BLOCK_C: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    FMT_X: tl.constexpr,  # the norm is cast back to x's dtype before the weight, as RMSNorm does
    FMT_C: tl.constexpr,  # weight * normed: promote(weight, x)
    FMT_ROPE: tl.constexpr,  # every rope product and sum: promote(x, cos)
    FMT_CACHE: tl.constexpr,
):
    t = tl.program_id(0)
    row = ckv_ptr + t * stride_ckv

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x = tl.load(row + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.math.div_rn(tl.sum(x * x, axis=0), C * 1.0) + eps)  # mean: IEEE division
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    c = _round(w * _round(x * inv_rms, FMT_X), FMT_C)

    offs_h = tl.arange(0, BLOCK_HALF)
    mask_h = offs_h < HALF
    if INTERLEAVE:  # pairs (x0, x1), (x2, x3), ...
        first, second = 2 * offs_h, 2 * offs_h + 1
    else:
        first, second = offs_h, offs_h + HALF
    x1 = tl.load(row + C + first, mask=mask_h, other=0.0).to(tl.float32)
    x2 = tl.load(row + C + second, mask=mask_h, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t * stride_cos + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    r1 = _round(_round(x1 * cos, FMT_ROPE) - _round(x2 * sin, FMT_ROPE), FMT_ROPE)
    r2 = _round(_round(x2 * cos, FMT_ROPE) + _round(x1 * sin, FMT_ROPE), FMT_ROPE)

    out = out_ptr + t * stride_out  # the latents' dtype holds c and r1/r2 exactly: the store casts nothing away
    tl.store(out + offs_c, c.to(out_ptr.dtype.element_ty), mask=mask_c)
    tl.store(out + C + offs_h, r1.to(out_ptr.dtype.element_ty), mask=mask_h)
    tl.store(out + C + HALF + offs_h, r2.to(out_ptr.dtype.element_ty), mask=mask_h)

    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        keep = slot >= 0  # a negative slot is padding: nothing is written (masks of zero width)
        n_c, n_h = tl.where(keep, C, 0), tl.where(keep, HALF, 0)
        slot = tl.where(keep, slot, 0)
        dst = cache_ptr + (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_row
        ty = cache_ptr.dtype.element_ty
        tl.store(dst + offs_c, _round(c, FMT_CACHE).to(ty), mask=offs_c < n_c)
        tl.store(dst + C + offs_h, _round(r1, FMT_CACHE).to(ty), mask=offs_h < n_h)
        tl.store(dst + C + HALF + offs_h, _round(r2, FMT_CACHE).to(ty), mask=offs_h < n_h)


def _format(dtype: torch.dtype) -> int:
    if dtype not in _FORMATS:
        raise ValueError(f"latent_write supports {sorted(map(str, _FORMATS))}, got {dtype}")
    return _FORMATS[dtype]


def _check_shapes(
    ckv: torch.Tensor,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    kv_cache: torch.Tensor | None,
) -> None:
    T, width = ckv.shape
    C = norm_weight.shape[0]
    R = width - C
    if R <= 0 or R % 2 or cos.shape != (T, R // 2) or sin.shape != cos.shape:
        raise ValueError(f"ckv {tuple(ckv.shape)}, norm {C}: cos/sin must be [T, R/2], got {tuple(cos.shape)}")
    if kv_cache is not None and (kv_cache.dim() != 3 or kv_cache.shape[-1] != width or kv_cache.stride(-1) != 1):
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {width}] (rows contiguous), got {kv_cache.shape}")
    if slot_mapping is not None and slot_mapping.shape != (T,):
        raise ValueError(f"slot_mapping must be [{T}], got {tuple(slot_mapping.shape)}")


def latent_write(
    ckv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    slot_mapping: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ckv`` [T, C + R] -> latents [T, C + R] = [RMSNorm(c) * weight, rope(k_rope)], each token's row also cast
    into ``kv_cache`` [num_blocks, block_size, C + R] at ``slot_mapping[t]`` (block * block_size + offset;
    negative: not written). With no slot mapping or no cache nothing is written. Not differentiable."""
    _check_shapes(ckv, norm_weight, cos, sin, slot_mapping, kv_cache)
    T, width = ckv.shape
    C = norm_weight.shape[0]
    rope_dtype = torch.promote_types(ckv.dtype, cos.dtype)
    c_dtype = torch.promote_types(norm_weight.dtype, ckv.dtype)
    latents = ckv.new_empty(T, width, dtype=torch.promote_types(c_dtype, rope_dtype))
    write = slot_mapping is not None and kv_cache is not None
    if T == 0:
        return latents
    ckv, cos, sin, norm_weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (ckv, cos, sin, norm_weight))
    cache = kv_cache if write else latents  # a placeholder pointer when nothing is written
    slots = slot_mapping if write else latents
    block_c = triton.next_power_of_2(C)
    _latent_write_kernel[(T,)](
        ckv,
        norm_weight,
        cos,
        sin,
        slots,
        latents,
        cache,
        C,
        (width - C) // 2,
        eps,
        cache.shape[1] if write else 1,
        ckv.stride(0),
        cos.stride(0),
        sin.stride(0),
        latents.stride(0),
        cache.stride(0) if write else 0,
        cache.stride(1) if write else 0,
        BLOCK_C=block_c,
        BLOCK_HALF=triton.next_power_of_2((width - C) // 2),
        INTERLEAVE=interleave,
        WRITE_CACHE=write,
        FMT_X=_format(ckv.dtype),
        FMT_C=_format(c_dtype),
        FMT_ROPE=_format(rope_dtype),
        FMT_CACHE=_format(cache.dtype),
        num_warps=max(1, min(4, block_c // 256)),
        enable_fp_fusion=False,  # PyTorch rounds each float32 product before the sum: no fma
    )
    return latents
