"""FP8 dense matmul (W8A8): the checkpoint's FP8 attention and shared-expert weights multiplied without dequantising.

Why: dequantising a whole weight to BF16 on every call costs a full extra read and write of the matrix and keeps
the matmul in BF16; ``torch._scaled_mm`` reads the e4m3 weight as it is and runs the FP8 tensor cores (on CPU, in
torch 2.13, it runs too, which is how tests check it). The activation is quantised to e4m3 first:

- static per-tensor when the checkpoint gives ``input_scale``: ``x / input_scale``, saturated to +-448;
- otherwise dynamic per token: each row's amax / 448 (a zero row gets a tiny scale, so zeros, never NaN).

Scales are multipliers (real value = fp8 * scale), as in ``kernels/fp8.py``. ``_scaled_mm`` takes either two
singleton scales (tensor-wise) or ``scale_a [M, 1]`` with ``scale_b [1, N]`` (row-wise), never a mix; row-wise is
accepted on CPU (verified, bf16 and float32 outputs) but on CUDA (H100) only with a BF16 output, so row-wise on CUDA
computes in BF16 and casts. Weights with one scale, or one scale per block of output rows (``[so, 1]``, e.g. the
fused gate/up halves), run here; block scales along K and shapes whose K or N is not a multiple of 16 (the CUDA
kernel's requirement) are refused by ``supports`` and stay on the dequantising path.

``fp8_linear_reference`` is the plain-PyTorch twin: the same activation quantisation, both operands dequantised,
one float32 matmul.
"""

from __future__ import annotations

import torch

from small4.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8

_ALIGN = 16  # cuBLASLt FP8 GEMMs need K and N to be multiples of 16
_MIN_AMAX = 1e-12  # a zero row still gets a finite, non-zero scale


def supports(weight: torch.Tensor, weight_scale: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> bool:
    """Whether ``fp8_linear`` can take this layer: a row-major FP8 [N, K] weight with K, N multiples of 16, a
    per-tensor or per-output-row-block weight scale, and a per-tensor activation scale if any. Shape checks only."""
    if weight_scale is None or weight.dtype != FP8_DTYPE or weight.dim() != 2 or not weight.is_contiguous():
        return False
    n, k = weight.shape
    if n % _ALIGN or k % _ALIGN:
        return False
    if input_scale is not None and input_scale.numel() != 1:
        return False
    return weight_scale.numel() == 1 or _is_row_block_scale(weight_scale, n)


def _is_row_block_scale(scale: torch.Tensor, n: int) -> bool:
    """``[so, 1]``: ``so`` blocks of output rows, one scale each, spanning all of K."""
    return scale.dim() == 2 and scale.shape[1] == 1 and scale.shape[0] <= n


def row_scale(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    """The weight scale as float32 ``[1, 1]`` (per-tensor) or ``[N, 1]`` (one multiplier per output row, blocks
    ceil-divided and cropped as ``dequantize_fp8`` does). Both are valid checkpoint forms again, so this is
    idempotent; callers cache the result instead of expanding the blocks on every call."""
    scale = weight_scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if tuple(scale.shape) == (n, 1):
        return scale.contiguous()
    rows = -(-n // scale.shape[0])
    return scale.repeat_interleave(rows, dim=0)[:n].contiguous()


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D activation [M, K] -> (e4m3 [M, K], float32 multiplier: [1, 1] static, or [M, 1] per token)."""
    xf = x.to(torch.float32)
    if input_scale is not None:
        scale = input_scale.to(torch.float32).reshape(1, 1)
    else:
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x [..., K] @ (weight * weight_scale).T`` -> [..., N] in ``out_dtype`` through ``torch._scaled_mm``.

    Needs ``supports(weight, weight_scale, input_scale)``. No host synchronisation, so CUDA graphs can capture it.
    """
    n, k = weight.shape
    lead = x.shape[:-1]
    x_q, scale_a = quantize_activation(x.reshape(-1, k), input_scale)
    scale_b = row_scale(weight_scale, n)
    rowwise = input_scale is None or scale_b.shape[0] != 1
    if rowwise:  # _scaled_mm takes no mix of tensor-wise and row-wise scales
        scale_a = scale_a.expand(x_q.shape[0], 1).contiguous()
        scale_b = scale_b.reshape(1, -1).expand(1, n).contiguous()
    mm_dtype = torch.bfloat16 if rowwise and x.device.type == "cuda" else out_dtype
    out = torch._scaled_mm(x_q, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype)
    return out.to(out_dtype).reshape(*lead, n)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-PyTorch twin of ``fp8_linear``: the same quantised activation, both operands dequantised, float32."""
    k = weight.shape[1]
    x_q, scale_a = quantize_activation(x.reshape(-1, k), input_scale)
    w = dequantize_fp8(weight, weight_scale, torch.float32)
    out = (x_q.to(torch.float32) * scale_a) @ w.t()
    return out.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])
