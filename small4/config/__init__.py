"""Configs: ``ModelConfig`` (every shape of the model, read from either checkpoint layout) and ``EngineConfig``.

A package whose modules import one way: ``model`` (the frozen dataclasses and ``require``) at the bottom; ``vision``
and ``quant`` (blocks both layouts share) on it; ``hf`` and ``mistral`` (one parser per layout) on those; ``load``
(a directory -> ``ModelConfig``, the softmax-scale decision, ``generation_config.json``) on top. ``engine`` holds
``EngineConfig``. Callers import the names below from ``small4.config``.
"""

from small4.config.engine import PROFILES, EngineConfig, parse_bytes
from small4.config.hf import parse_hf_config
from small4.config.load import GENERATION_DEFAULTS, decide_attention_scale, load_model_config, read_generation_config
from small4.config.mistral import parse_mistral_params
from small4.config.model import (
    AttentionScaleMode,
    ConfigError,
    ModelConfig,
    QuantConfig,
    RopeConfig,
    TextConfig,
    VisionConfig,
    require,
    yarn_mscale,
)

__all__ = [
    "GENERATION_DEFAULTS",
    "PROFILES",
    "AttentionScaleMode",
    "ConfigError",
    "EngineConfig",
    "ModelConfig",
    "QuantConfig",
    "RopeConfig",
    "TextConfig",
    "VisionConfig",
    "decide_attention_scale",
    "load_model_config",
    "parse_bytes",
    "parse_hf_config",
    "parse_mistral_params",
    "read_generation_config",
    "require",
    "yarn_mscale",
]
