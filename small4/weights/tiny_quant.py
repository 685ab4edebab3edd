"""Quantised tiny checkpoints beyond per-tensor FP8: DeepSeek-style block-scaled FP8 and compressed-tensors NVFP4.

Both start from the same BF16 random weights as ``tiny.py``'s, so a test can load the quantised and the BF16
checkpoint of one seed side by side and measure what quantisation costs.
"""

from __future__ import annotations

import torch

from small4.kernels.fp8 import quantize_fp8_blocks
from small4.kernels.nvfp4 import FP4_BLOCK, quantize_nvfp4

# What the block-scaled tiny checkpoints use: small enough that the tiny's dims (48-row latent projection,
# 160-row kv_b, 96-wide o_proj) are not multiples of it, as the real 320-row latent projection is not of 128.
TINY_FP8_BLOCK = (32, 32)


def _hf_quant_target(name: str) -> bool:
    """Attention and expert matrices of the HF layout (norms, router, embeddings, head and vision stay)."""
    if "vision" in name or "multi_modal" in name:
        return False
    if ".self_attn." in name:
        return "layernorm" not in name
    return ".experts." in name or ".shared_experts." in name


def quantize_fp8_block_state_dict(sd: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """HF names: every target matrix (fused experts included) as FP8 with ``weight_scale_inv`` blocks."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not _hf_quant_target(name):
            out[name] = w
            continue
        q, scale = quantize_fp8_blocks(w, block)
        out[name] = q
        fused = not name.endswith(".weight")
        out[name + "_scale_inv" if fused else name[: -len(".weight")] + ".weight_scale_inv"] = scale
    return out


def fp8_block_quantization_config(block: tuple[int, int]) -> dict:
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head", "mlp.gate"],
    }


def _native_routed_expert(name: str) -> bool:
    return ".experts." in name and ".shared_experts." not in name and name.endswith(".weight")


def quantize_nvfp4_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native names: each routed expert's w1 / w2 / w3 as NVFP4 (its own global divisor, as compressed-tensors
    writes one per module); everything else as it was (BF16), which the config's ``ignore`` list says."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not _native_routed_expert(name):
            out[name] = w
            continue
        packed, block_scale, divisor = quantize_nvfp4(w)
        base = name[: -len(".weight")]
        out[base + ".weight_packed"] = packed
        out[base + ".weight_scale"] = block_scale
        out[base + ".weight_global_scale"] = divisor.reshape(1)
        # a static activation divisor as compressed-tensors calibrates it (W4A4 kernels); unused by small4
        out[base + ".input_global_scale"] = torch.tensor([448.0 * 6.0 / 8.0])
    return out


def nvfp4_quantization_config() -> dict:
    """compressed-tensors ``nvfp4-pack-quantized`` over the routed experts (vLLM-style names in ``ignore``)."""
    args = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": FP4_BLOCK,
        "strategy": "tensor_group",
        "dynamic": False,
        "observer": "minmax",
        "scale_dtype": "torch.float8_e4m3fn",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["re:.*experts\\.\\d+\\.w[123]$"],
                "weights": args,
                "input_activations": {**args, "dynamic": "local"},
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }
        },
        "ignore": [
            "model.embed_tokens",
            "lm_head",
            "re:.*attention\\..*",
            "re:.*shared_experts\\..*",
            "re:.*gate$",
            "re:vision_encoder.*",
            "re:vision_language_adapter.*",
            "re:patch_merger.*",
        ],
        "kv_cache_scheme": None,
    }
