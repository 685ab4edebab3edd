"""HF layout: ``config.json`` of ``Mistral3ForConditionalGeneration`` (or a bare ``mistral4`` text config).

The softmax scale read from here is the plain one (``yarn_softmax_mscale`` False) whatever ``mscale_all_dim``
says; ``config.load.load_model_config`` lets a ``params.json`` beside it, or the serve flag, decide otherwise.
"""

from __future__ import annotations

from typing import Any

from small4.config.model import ConfigError, ModelConfig, RopeConfig, TextConfig, VisionConfig, require
from small4.config.quant import parse_quantization_config
from small4.config.vision import parse_vision


def parse_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type == "mistral3":
        require("text_config" in cfg, "text_config", "missing for model_type 'mistral3'")
        text_cfg = cfg["text_config"]
        vision = _parse_vision(cfg["vision_config"], cfg) if cfg.get("vision_config") else None
        tie = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    elif model_type == "mistral4":
        text_cfg, vision, tie = cfg, None, bool(cfg.get("tie_word_embeddings", False))
    else:
        raise ConfigError(f"config field 'model_type': expected 'mistral3' or 'mistral4', got {model_type!r}")
    text = _parse_text(text_cfg, tie)
    quant = parse_quantization_config(cfg.get("quantization_config") or text_cfg.get("quantization_config"))
    return ModelConfig(text=text, vision=vision, quant=quant, layout="hf")


def _parse_text(c: dict[str, Any], tie: bool) -> TextConfig:
    mt = c.get("model_type", "mistral4")
    require(mt == "mistral4", "text_config.model_type", f"expected 'mistral4', got {mt!r}")
    heads = c.get("num_attention_heads", 32)
    require(
        c.get("num_key_value_heads") in (None, heads),
        "text_config.num_key_value_heads",
        "MLA needs num_key_value_heads == num_attention_heads",
    )
    for name, want in (("n_group", 1), ("topk_group", 1), ("first_k_dense_replace", 0)):
        require(c.get(name) in (None, want), f"text_config.{name}", f"only {want} is supported, got {c.get(name)}")
    require(c.get("hidden_act", "silu") == "silu", "text_config.hidden_act", "only 'silu' is supported")
    require(not c.get("attention_bias", False), "text_config.attention_bias", "biases are not supported")
    nope, rope_dim = c.get("qk_nope_head_dim", 64), c.get("qk_rope_head_dim", 64)
    if c.get("head_dim") is not None:
        require(
            c["head_dim"] == nope + rope_dim,
            "text_config.head_dim",
            f"must equal qk_nope_head_dim + qk_rope_head_dim = {nope + rope_dim}",
        )
    return TextConfig(
        vocab_size=c.get("vocab_size", 131072),
        hidden_size=c.get("hidden_size", 4096),
        num_layers=c.get("num_hidden_layers", 36),
        num_heads=heads,
        q_lora_rank=c.get("q_lora_rank", 1024),
        kv_lora_rank=c.get("kv_lora_rank", 256),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=c.get("v_head_dim", 128),
        num_experts=c.get("n_routed_experts", c.get("num_local_experts", 128)),
        num_experts_per_tok=c.get("num_experts_per_tok", 4),
        moe_intermediate_size=c.get("moe_intermediate_size", 2048),
        num_shared_experts=c.get("n_shared_experts", 1),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=c.get("max_position_embeddings", 1048576),
        rope=_parse_rope(c),
        tie_word_embeddings=tie,
        bos_token_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
        eos_token_id=_first(c.get("eos_token_id", 2)),
        pad_token_id=c.get("pad_token_id", 11) if c.get("pad_token_id") is not None else 11,
    )


def _first(v: int | list[int]) -> int:
    return v[0] if isinstance(v, list) else v


# What transformers' Mistral4Config fills in when a config carries no rope parameters at all.
_MISTRAL4_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 128.0,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}


def _parse_rope(c: dict[str, Any]) -> RopeConfig:
    rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or _MISTRAL4_DEFAULT_ROPE)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    require(
        rope_type in ("yarn", "default"),
        "text_config.rope_parameters.rope_type",
        f"only 'yarn' and 'default' are supported, got {rope_type!r}",
    )
    theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
    orig = rp.get("original_max_position_embeddings", 8192)
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(rp.get("factor") or c.get("max_position_embeddings", 1048576) / int(orig)),
        original_max_position_embeddings=int(orig),
        beta_fast=float(rp.get("beta_fast") or 32.0),
        beta_slow=float(rp.get("beta_slow") or 1.0),
        mscale=float(rp.get("mscale") or 0.0),
        mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
        attention_factor=rp.get("attention_factor"),
        truncate=bool(rp.get("truncate", True)),
        interleave=bool(c.get("rope_interleave", True)),
        llama4_beta=float(rp.get("llama_4_scaling_beta") or 0.0),
        llama4_original_max_position_embeddings=int(orig),
    )


def _parse_vision(v: dict[str, Any], top: dict[str, Any]) -> VisionConfig:
    """HF keeps the merge size, the image token and the projector at the top level, the rope theta in
    ``rope_parameters``."""
    require(v.get("model_type", "pixtral") == "pixtral", "vision_config.model_type", "expected 'pixtral'")
    rp = v.get("rope_parameters") or {}
    return parse_vision(
        v,
        rope_theta=rp.get("rope_theta", v.get("rope_theta", 10000.0)),
        spatial_merge_size=top.get("spatial_merge_size", 2),
        image_token_id=top.get("image_token_index", top.get("image_token_id", 10)),
        projector_hidden_act=top.get("projector_hidden_act", "gelu"),
        projector_bias=bool(top.get("multimodal_projector_bias", False)),
    )
