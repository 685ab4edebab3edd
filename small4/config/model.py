"""ModelConfig: the one source of truth for every shape and constant of the model (the dataclasses only).

It is read (``config.load``, through the parsers of each layout, which depend on these classes and never the other
way round) from either checkpoint layout (HF ``config.json`` of ``Mistral3ForConditionalGeneration`` with a
``mistral4`` text config, or Mistral-native ``params.json``) and validated once, at load: anything we do not
support, or that contradicts itself, fails here with the name of the field rather than deep inside a forward.
Derived values (softmax scale, rope attention factor, latent width) are computed here, so the model never
re-derives them and never branches on a literal shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

AttentionScaleMode = Literal["auto", "on", "off"]


class ConfigError(ValueError):
    """A checkpoint config we cannot serve; the message names the offending field."""


def require(ok: bool, field_name: str, why: str) -> None:
    """Validation for the config dataclasses and the parsers: a failure names the field."""
    if not ok:
        raise ConfigError(f"config field '{field_name}': {why}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction (the paper's 0.1 ln(s) + 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """YaRN rotary settings (``rope_type == "default"`` means plain RoPE; factor etc. unused then).

    ``attention_factor`` multiplies cos/sin, as transformers' Mistral4 reads it. ``softmax_mscale`` is what
    transformers multiplies the softmax scale by (``yarn_mscale(factor, mscale_all_dim) ** 2``); whether small4
    applies it is ``TextConfig.yarn_softmax_mscale``, decided per checkpoint
    (see ``config.load.decide_attention_scale``).
    """

    rope_type: Literal["yarn", "default"] = "yarn"
    theta: float = 10000.0
    factor: float = 128.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True
    llama4_beta: float = 0.0
    llama4_original_max_position_embeddings: int = 8192

    @property
    def cos_sin_factor(self) -> float:
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(frozen=True)
class QuantConfig:
    """How linear weights are stored in the files.

    ``fp8``: e4m3 with per-tensor scales, or DeepSeek-style blocks of ``weight_block_size`` (rows, cols) when the
    config gives one (the last block of a dimension that is not a multiple is partial). ``nvfp4``:
    compressed-tensors ``nvfp4-pack-quantized`` (kernels/nvfp4.py); which tensors are NVFP4 is whatever the files
    hold under ``weight_packed`` names, ``targets`` / ``modules_to_not_convert`` (its ``ignore``) are kept as
    read. Input (activation) scales are read and checked but the activations stay BF16 (weight-only kernels).
    """

    method: Literal["none", "fp8", "nvfp4"] = "none"
    activation_scheme: Literal["static", "dynamic"] = "static"
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisionConfig:
    """Pixtral encoder + projector shapes (consumed by model/vision.py)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    head_dim: int = 64
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 1540
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    spatial_merge_size: int = 2
    image_token_id: int = 10
    projector_hidden_act: str = "gelu"
    projector_bias: bool = False
    rms_norm_eps: float = 1e-5

    def tokens_per_image(self, height: int, width: int) -> int:
        """``[IMG]`` slots of a preprocessed image: one per merged patch (patch x merge pixels on a side)."""
        side = self.patch_size * self.spatial_merge_size
        return (height // side) * (width // side)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    num_layers: int = 36
    num_heads: int = 32
    q_lora_rank: int | None = 1024
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 2048
    num_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    # True: the softmax scale carries YaRN's mscale^2 (transformers' reading of mscale_all_dim); False: the plain
    # 1/sqrt(qk_head_dim) that Mistral's params.json (yarn.apply_scale false), vLLM and SGLang use.
    yarn_softmax_mscale: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 11

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "num_experts",
            "moe_intermediate_size",
        ):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be positive or null")
        require(
            1 <= self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
        )
        require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        require(self.num_shared_experts >= 0, "n_shared_experts", "must be >= 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the normalised latent plus the roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * (self.rope.softmax_mscale if self.yarn_softmax_mscale else 1.0)


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    layout: Literal["hf", "mistral"] = "hf"
