"""A checkpoint directory -> ``ModelConfig``: the layout's file parsed, then one softmax-scale decision.

Above the dataclasses and both layouts' parsers (``hf``, ``mistral``); nothing below imports it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from small4.config.hf import parse_hf_config
from small4.config.mistral import parse_mistral_params
from small4.config.model import AttentionScaleMode, ConfigError, ModelConfig, require

log = logging.getLogger(__name__)


def load_model_config(model_dir: str | Path, attention_scale_mscale: AttentionScaleMode = "auto") -> ModelConfig:
    """Reads ``config.json`` (HF) if present, else ``params.json`` (Mistral-native), then decides the softmax
    scale once for the directory (``decide_attention_scale``) and logs it."""
    model_dir = Path(model_dir)
    params_path = model_dir / "params.json"
    params = read_json(params_path) if params_path.is_file() else None
    if (model_dir / "config.json").is_file():
        config = parse_hf_config(read_json(model_dir / "config.json"))
    elif params is not None:
        config = parse_mistral_params(params)
    else:
        raise ConfigError(f"{model_dir}: neither config.json nor params.json found")
    return decide_attention_scale(config, params, attention_scale_mscale)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


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
    data = read_json(path)
    out: dict[str, float] = {}
    for key, (lo, hi) in GENERATION_DEFAULTS.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
        require(ok, f"generation_config.{key}", f"must be a number in [{lo}, {hi}], got {value!r}")
        out[key] = int(value) if key == "top_k" else float(value)
    return out
