"""ModelConfig: the one source of truth for every shape and constant of the model.

It is read from either checkpoint layout (HF ``config.json`` of ``Mistral3ForConditionalGeneration`` with a
``mistral4`` text config, or Mistral-native ``params.json``) and validated once, at load: anything we do not
support, or that contradicts itself, fails here with the name of the field rather than deep inside a forward.
Derived values (softmax scale, rope attention factor, latent width) are computed here, so the model never
re-derives them and never branches on a literal shape.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

AttentionScaleMode = Literal["auto", "on", "off"]


class ConfigError(ValueError):
    """A checkpoint config we cannot serve; the message names the offending field."""


def _require(ok: bool, field_name: str, why: str) -> None:
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
    applies it is ``TextConfig.yarn_softmax_mscale``, decided per checkpoint (see ``ModelConfig.from_dir``).
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
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be positive or null")
        _require(
            1 <= self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
        )
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        _require(self.num_shared_experts >= 0, "n_shared_experts", "must be >= 0")

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

    @classmethod
    def from_dir(cls, model_dir: str | Path, attention_scale_mscale: AttentionScaleMode = "auto") -> ModelConfig:
        """Reads ``config.json`` (HF) if present, else ``params.json`` (Mistral-native), then decides the softmax
        scale once for the directory (``decide_attention_scale``) and logs it."""
        model_dir = Path(model_dir)
        params_path = model_dir / "params.json"
        params = _read_json(params_path) if params_path.is_file() else None
        if (model_dir / "config.json").is_file():
            config = cls.from_hf_dict(_read_json(model_dir / "config.json"))
        elif params is not None:
            config = cls.from_mistral_dict(params)
        else:
            raise ConfigError(f"{model_dir}: neither config.json nor params.json found")
        return decide_attention_scale(config, params, attention_scale_mscale)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        from small4.config_hf import parse_hf_config

        return parse_hf_config(cfg)

    @classmethod
    def from_mistral_dict(cls, params: dict[str, Any]) -> ModelConfig:
        from small4.config_mistral import parse_mistral_params

        return parse_mistral_params(params)


def decide_attention_scale(
    config: ModelConfig, params: dict[str, Any] | None, mode: AttentionScaleMode = "auto"
) -> ModelConfig:
    """One softmax scale whichever file describes the checkpoint.

    ``auto``: the plain 1/sqrt(qk_head_dim) unless ``params.json`` (when the directory has one, even beside a
    ``config.json``) says ``yarn.apply_scale: true``. ``config.json`` alone never turns the mscale^2 on, though
    transformers (>= 5.23) reads ``mscale_all_dim: 1`` that way: Mistral's own flag for this model is
    ``apply_scale: false`` and vLLM's native path and SGLang use the plain scale. ``on`` / ``off`` force it.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"attention scale mode must be auto, on or off, got {mode!r}")
    text = config.text
    if mode != "auto":
        on, why = mode == "on", f"forced by --attention-scale-mscale {mode}"
    elif params is not None and params.get("yarn"):
        on = bool(params["yarn"].get("apply_scale", True))
        why = f"params.json yarn.apply_scale: {str(on).lower()}"
    elif params is not None:
        on, why = False, "params.json has no yarn section"
    else:
        on, why = False, "config.json only: mistral4 follows Mistral's apply_scale false (transformers would not)"
    text = replace(text, yarn_softmax_mscale=on)
    log.info(
        "attention softmax scale %.6f (%s YaRN mscale^2 = %.4f): %s",
        text.softmax_scale,
        "with" if on else "without",
        text.rope.softmax_mscale,
        why,
    )
    return replace(config, text=text)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


PROFILES: dict[str, dict[str, int]] = {
    # small batches and small chunks: each step is short, so time to first token and per-token latency stay low
    # with a draft model, 3 speculative tokens per step
    "latency": {
        "max_num_seqs": 16,
        "max_num_batched_tokens": 512,
        "long_prefill_token_threshold": 256,
        "num_speculative_tokens": 3,
    },
    # big steps: many sequences and a large token budget, for aggregate tokens/s (no speculation unless asked)
    "throughput": {
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "long_prefill_token_threshold": 0,
        "num_speculative_tokens": 0,
    },
}


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. A profile fills in the batch limits the caller left as None; every knob can be set by hand.

    ``kv_cache_memory`` is the latent-cache budget in bytes; None means: on a GPU, ``gpu_memory_utilization`` of
    total memory minus what the model and activations take; on the CPU, 1 GiB.
    """

    profile: Literal["latency", "throughput"] = "throughput"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: Literal["auto", "bfloat16", "float32", "fp8"] = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    device: str = "auto"
    attn_impl: Literal["auto", "absorb", "naive"] = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode steps (they are captured only on a GPU anyway)
    seed: int = 0
    attention_scale_mscale: AttentionScaleMode = "auto"  # see decide_attention_scale
    # speculative decoding: the EAGLE draft's directory, and drafts per step (0: off; None: the profile's)
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(self.profile in PROFILES, "profile", f"must be one of {sorted(PROFILES)}")
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _require(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size", "must be a power of two"
        )
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        _require(0 <= self.num_speculative_tokens <= 16, "num_speculative_tokens", "must be in [0, 16]")
        _require(
            self.attention_scale_mscale in ("auto", "on", "off"), "attention_scale_mscale", "must be auto, on or off"
        )


# generation_config.json keys that become default sampling parameters (vLLM's --generation-config auto), with the
# range each must be in
GENERATION_DEFAULTS = {
    "temperature": (0.0, 2.0),
    "top_p": (1e-9, 1.0),
    "top_k": (-1, 1 << 31),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1e-9, 10.0),
}


def read_generation_config(model_dir: str | Path) -> dict[str, float]:
    """The sampling defaults a checkpoint's ``generation_config.json`` carries (empty without one); a request's
    own value always wins over them. Other keys (token ids, ``do_sample``, ``max_new_tokens``) are not used."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    data = _read_json(path)
    out: dict[str, float] = {}
    for key, (lo, hi) in GENERATION_DEFAULTS.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
        _require(ok, f"generation_config.{key}", f"must be a number in [{lo}, {hi}], got {value!r}")
        out[key] = int(value) if key == "top_k" else float(value)
    return out


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes (for --kv-cache-memory)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))
