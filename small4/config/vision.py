"""The Pixtral encoder's block of either layout -> ``VisionConfig``, written once.

Both layouts spell the encoder's own shapes alike (``hidden_size``, ``num_hidden_layers``, ``patch_size``, ...);
they differ only in where the rope theta, the merge size, the image token and the projector live, which each
layout's parser reads and passes in.
"""

from __future__ import annotations

from typing import Any

from small4.config.model import VisionConfig


def parse_vision(
    v: dict[str, Any],
    *,
    rope_theta: float,
    spatial_merge_size: int,
    image_token_id: int,
    projector_bias: bool,
    projector_hidden_act: str = "gelu",
) -> VisionConfig:
    hidden, heads = v.get("hidden_size", 1024), v.get("num_attention_heads", 16)
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=v.get("intermediate_size", 4096),
        num_layers=v.get("num_hidden_layers", 24),
        num_heads=heads,
        head_dim=v.get("head_dim", hidden // heads),
        num_channels=v.get("num_channels", 3),
        patch_size=v.get("patch_size", 14),
        image_size=v.get("image_size", 1540),
        rope_theta=float(rope_theta),
        hidden_act=v.get("hidden_act", "silu"),
        spatial_merge_size=spatial_merge_size,
        image_token_id=image_token_id,
        projector_hidden_act=projector_hidden_act,
        projector_bias=projector_bias,
    )
