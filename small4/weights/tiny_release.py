"""Tiny checkpoints in the public release's exact spellings, both file sets in one directory.

The FP8 repository of Mistral Small 4 ships ``config.json`` + ``model-*.safetensors`` and ``params.json`` +
``consolidated-*.safetensors`` with the same weights. Its HF file set uses the older transformers names
(``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``),
FP8 ``weight_scale_inv`` as BF16 0-d multipliers, one ``[E, 1, 1]`` scale per fused expert tensor and ``[E]``
activation scales; its config.json has rope ``type`` and ``rope_type``, ``mscale`` / ``mscale_all_dim`` 1 and
1,048,576 positions; its params.json says ``yarn.apply_scale: false``. Here both sets hold exactly the same
values (the native tensors are slices of the HF ones, scales repeated), so the two readings must agree to the bit.
The NVFP4 repository is the native set alone, with a compressed-tensors ``quantization_config``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from small4.kernels.fp8 import FP8_DTYPE, quantize_fp8_per_tensor
from small4.weights.tiny import TinySpec, hf_config, hf_to_native, mistral_params, random_hf_state_dict, write_shards
from small4.weights.tiny_quant import nvfp4_quantization_config, quantize_nvfp4_state_dict

# The release's base length (8192) and YaRN factor (128): 1,048,576 positions, as the real config says.
RELEASE_SPEC = TinySpec(yarn_original_max=8192)
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11, "temperature": 0.7, "top_p": 0.95}

_HF_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def release_hf_config(spec: TinySpec, fp8: bool) -> dict:
    cfg = hf_config(replace(spec, yarn_mscale=True), fp8)
    text = cfg["text_config"]
    rp = text.pop("rope_parameters")
    text["rope_parameters"] = {  # no partial_rotary_factor: transformers derives it from the head dims
        "type": "yarn",
        "rope_type": "yarn",
        "rope_theta": rp["rope_theta"],
        "factor": rp["factor"],
        "original_max_position_embeddings": rp["original_max_position_embeddings"],
        "max_position_embeddings": rp["max_position_embeddings"],
        "beta_fast": rp["beta_fast"],
        "beta_slow": rp["beta_slow"],
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": rp["llama_4_scaling_beta"],
    }
    return cfg


def release_params(spec: TinySpec, quant: str) -> dict:
    params = mistral_params(replace(spec, yarn_mscale=False), fp8=quant == "fp8")
    if quant == "nvfp4":
        params["quantization_config"] = nvfp4_quantization_config()
    return params


def _rename_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        for old, new in _HF_RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = t
    return out


def _fp8_target(name: str) -> bool:
    if "vision" in name or "multi_modal" in name:
        return False
    return (".self_attn." in name and "layernorm" not in name) or ".experts." in name or ".shared_experts." in name


def quantize_release_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names (``model.language_model.*``): per-tensor FP8, scales as BF16 0-d multipliers (the weight quantised
    with the rounded scale, so both layouts dequantise to the same values); fused experts one scale per expert."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not _fp8_target(name):
            out[name] = w
        elif name.endswith(".weight"):
            _, scale = quantize_fp8_per_tensor(w)
            scale = scale.to(torch.bfloat16)
            base = name[: -len(".weight")]
            out[name] = (w.float() / scale.float()).clamp(-448, 448).to(FP8_DTYPE)
            out[base + ".weight_scale_inv"] = scale
            out[base + ".activation_scale"] = torch.tensor(1.0, dtype=torch.bfloat16)
        else:  # fused experts [E, R, H]
            E = w.shape[0]
            scale = (w.float().abs().amax(dim=(1, 2)) / 448.0).clamp(min=1e-12).to(torch.bfloat16)  # [E]
            out[name] = (w.float() / scale.float()[:, None, None]).clamp(-448, 448).to(FP8_DTYPE)
            out[name + "_scale_inv"] = scale.reshape(E, 1, 1)
            out[name + "_activation_scale"] = torch.ones(E, dtype=torch.bfloat16)
    return out


_NATIVE_ATTN = {
    "q_a_proj": "wq_a",
    "q_b_proj": "wq_b",
    "q_proj": "wq",
    "kv_a_proj_with_mqa": "wkv_a_with_mqa",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}


def _native_fp8_scales(q: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    """The HF FP8 scales under native names: ``qscale_weight`` / ``qscale_act`` per matrix, per expert."""
    out = {}
    p = "model.language_model."
    for i in range(spec.num_layers):
        L, N = f"{p}layers.{i}.", f"layers.{i}."
        for hf, nat in _NATIVE_ATTN.items():
            if L + f"self_attn.{hf}.weight_scale_inv" in q:
                out[N + f"attention.{nat}.qscale_weight"] = q[L + f"self_attn.{hf}.weight_scale_inv"]
                out[N + f"attention.{nat}.qscale_act"] = q[L + f"self_attn.{hf}.activation_scale"]
        for e in range(spec.num_experts):
            for fused, names in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
                for w in names:
                    out[N + f"experts.{e}.{w}.qscale_weight"] = (
                        q[L + f"mlp.experts.{fused}_scale_inv"][e].reshape(()).clone()
                    )
                    out[N + f"experts.{e}.{w}.qscale_act"] = q[L + f"mlp.experts.{fused}_activation_scale"][e].clone()
        if spec.num_shared_experts:
            for hf, nat in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                out[N + f"shared_experts.{nat}.qscale_weight"] = q[L + f"mlp.shared_experts.{hf}.weight_scale_inv"]
                out[N + f"shared_experts.{nat}.qscale_act"] = q[L + f"mlp.shared_experts.{hf}.activation_scale"]
    return out


def make_release(out: Path, quant: str, seed: int, spec: TinySpec, dtype: torch.dtype) -> None:
    """Writes the release's file sets into ``out`` (tokenizer and generation_config are the caller's)."""
    sd = {k: v.to(dtype) for k, v in random_hf_state_dict(spec, seed).items()}
    if quant == "nvfp4":  # the NVFP4 repository: params.json + consolidated shards only
        (out / "params.json").write_text(json.dumps(release_params(spec, quant), indent=2))
        write_shards(quantize_nvfp4_state_dict(hf_to_native(sd, spec)), out, "mistral")
        return
    if quant not in ("none", "fp8"):
        raise ValueError(f"the release layout is BF16, FP8 or NVFP4, not {quant!r}")
    if quant == "fp8":
        sd = quantize_release_fp8(sd)
        weights = {k: v for k, v in sd.items() if not k.endswith(("_scale_inv", "activation_scale"))}
        native = {**hf_to_native(weights, spec), **_native_fp8_scales(sd, spec)}
    else:
        native = hf_to_native(sd, spec)
    (out / "config.json").write_text(json.dumps(release_hf_config(spec, quant == "fp8"), indent=2))
    write_shards(_rename_hf(sd), out, "hf")
    (out / "params.json").write_text(json.dumps(release_params(spec, quant), indent=2))
    write_shards(native, out, "mistral")
