"""Mistral-native layout: ``params.json`` (the format of the ``consolidated-*.safetensors`` release)."""

from __future__ import annotations

from typing import Any

from small4.config.model import ConfigError, ModelConfig, QuantConfig, RopeConfig, TextConfig, VisionConfig, require
from small4.config.quant import parse_native_quantization, parse_quantization_config
from small4.config.vision import parse_vision


def parse_mistral_params(p: dict[str, Any]) -> ModelConfig:
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "kv_lora_rank", "moe"):
        require(key in p, key, "missing from params.json")
    moe = p["moe"]
    for name, want in (
        ("first_k_dense_replace", 0),
        ("route_every_n", 1),
        ("num_expert_groups", 1),
        ("num_expert_groups_per_tok", 1),
    ):
        require(moe.get(name, want) == want, f"moe.{name}", f"only {want} is supported, got {moe.get(name)}")
    require(p.get("n_kv_heads", p["n_heads"]) == p["n_heads"], "n_kv_heads", "MLA needs n_kv_heads == n_heads")
    nope, rope_dim = p.get("qk_nope_head_dim", 64), p.get("qk_rope_head_dim", 64)
    if p.get("head_dim") is not None:
        require(p["head_dim"] == nope + rope_dim, "head_dim", f"must equal {nope + rope_dim}")
    text = TextConfig(
        vocab_size=p["vocab_size"],
        hidden_size=p["dim"],
        num_layers=p["n_layers"],
        num_heads=p["n_heads"],
        q_lora_rank=p.get("q_lora_rank"),
        kv_lora_rank=p["kv_lora_rank"],
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=p.get("v_head_dim", 128),
        num_experts=moe.get("num_experts", 128),
        num_experts_per_tok=moe.get("num_experts_per_tok", 4),
        moe_intermediate_size=moe.get("expert_hidden_dim", 2048),
        num_shared_experts=moe.get("num_shared_experts", 0),
        routed_scaling_factor=float(moe.get("routed_scale", 1.0)),
        norm_topk_prob=True,
        rms_norm_eps=float(p.get("norm_eps", 1e-6)),
        max_position_embeddings=p.get("max_position_embeddings", p.get("max_seq_len", 1048576)),
        rope=_parse_rope(p),
        tie_word_embeddings=bool(p.get("tied_embeddings", False)),
        yarn_softmax_mscale=bool((p.get("yarn") or {}).get("apply_scale", True)) if p.get("yarn") else False,
    )
    vision = _parse_vision(p["vision_encoder"]) if p.get("vision_encoder") else None
    return ModelConfig(text=text, vision=vision, quant=_parse_quant(p), layout="mistral")


def _parse_quant(p: dict[str, Any]) -> QuantConfig:
    """``quantization`` (Mistral's FP8) or ``quantization_config`` (compressed-tensors, the NVFP4 release)."""
    if p.get("quantization") and p.get("quantization_config"):
        raise ConfigError("params.json: both 'quantization' and 'quantization_config' are set")
    if p.get("quantization_config"):
        return parse_quantization_config(p["quantization_config"])
    return parse_native_quantization(p.get("quantization"))


def _parse_rope(p: dict[str, Any]) -> RopeConfig:
    theta = float(p.get("rope_theta", 10000.0))
    l4 = p.get("llama_4_scaling") or {}
    yarn = p.get("yarn")
    if not yarn:
        return RopeConfig(
            rope_type="default",
            theta=theta,
            factor=1.0,
            mscale=0.0,
            mscale_all_dim=0.0,
            llama4_beta=float(l4.get("beta", 0.0)),
            llama4_original_max_position_embeddings=int(l4.get("original_max_position_embeddings", 8192)),
        )
    orig = int(yarn.get("original_max_position_embeddings", 8192))
    return RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=float(yarn["factor"]),
        original_max_position_embeddings=orig,
        beta_fast=float(yarn.get("beta", 32.0)),
        beta_slow=float(yarn.get("alpha", 1.0)),
        # mscale = mscale_all_dim = 1 (vLLM's mapping): cos/sin unscaled; yarn.apply_scale only decides whether
        # the softmax scale carries mscale^2 (TextConfig.yarn_softmax_mscale).
        mscale=1.0,
        mscale_all_dim=1.0,
        interleave=True,
        llama4_beta=float(l4.get("beta", 0.0)),
        llama4_original_max_position_embeddings=int(l4.get("original_max_position_embeddings", orig)),
    )


def _parse_vision(v: dict[str, Any]) -> VisionConfig:
    """params.json keeps everything in ``vision_encoder``; the projector's bias is ``adapter_bias``."""
    return parse_vision(
        v,
        rope_theta=v.get("rope_theta", 10000.0),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        image_token_id=v.get("image_token_id", 10),
        projector_bias=bool(v.get("adapter_bias", False)),
    )
