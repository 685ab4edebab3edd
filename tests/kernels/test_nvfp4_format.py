"""The NVFP4 format's math: code points, nibble order, rounding, round trip error."""

import torch

from small4.kernels.nvfp4 import (
    E2M1_VALUES,
    FP4_BLOCK,
    dequantize_nvfp4,
    pack_fp4,
    quantize_nvfp4,
    unpack_fp4,
)


def test_low_nibble_is_the_first_value():
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8)  # codes 1,2 then 7,15
    assert unpack_fp4(packed).tolist() == [[0.5, 1.0, 6.0, -6.0]]


def test_pack_unpack_round_trip_every_code():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3).reshape(2, 24)
    values = unpack_fp4(pack_fp4(codes))
    table = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES])
    assert torch.equal(values, table[codes.long()])


def test_exact_values_survive_quantisation():
    # Each 16-block holds +-6 so its scale is exactly amax/6 and every E2M1 point is representable.
    row = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES])
    w = torch.stack([row, row.flip(0)]) * 0.25  # [2, 16]
    packed, scale, glob = quantize_nvfp4(w)
    assert packed.shape == (2, 8) and scale.shape == (2, 1) and scale.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(dequantize_nvfp4(packed, scale, glob), w, rtol=0, atol=1e-6)


def test_round_trip_error_is_fp4_sized():
    torch.manual_seed(0)
    w = torch.randn(4, 32, 8 * FP4_BLOCK)
    packed, scale, glob = quantize_nvfp4(w)
    back = dequantize_nvfp4(packed, scale, glob)
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.12  # 4-bit with 16-value blocks; exactness would mean the test checks nothing
    # per-expert divisors broadcast over [E, out, in]
    globs = torch.stack([quantize_nvfp4(w[e])[2] for e in range(4)])
    per_expert = [quantize_nvfp4(w[e]) for e in range(4)]
    stacked = dequantize_nvfp4(
        torch.stack([p for p, _, _ in per_expert]), torch.stack([s for _, s, _ in per_expert]), globs
    )
    for e in range(4):
        torch.testing.assert_close(stacked[e], dequantize_nvfp4(*per_expert[e]))
