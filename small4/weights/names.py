"""Checkpoint tensor names -> where they land in small4's model, for both layouts.

A checkpoint tensor is a ``(base, role)`` pair: ``base`` names one weight (``layers.3.attention.wq_a``), ``role``
says whether the tensor is that weight, its FP8 scale or its static activation scale, or one of the NVFP4
triple (``weight_packed``, ``weight_scale``, ``weight_global_scale``) with its ``input_global_scale``. Each base
maps to a ``Destination``: a parameter of the model and the slice of it the tensor fills (fused gate/up halves,
one expert of a stacked expert tensor) plus where its scale goes when the weight stays FP8.

Vision tensors (``is_vision``) map into ``vision.*`` (model/vision.py) when the config has a vision tower. The
vision q/k rows are kept in rotate-half rope order (transformers'); native files store them interleaved, so their
Destination carries ``interleaved_heads`` and the loader reorders the rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from small4.config import ModelConfig

Index = tuple[int | slice, ...]

# Tensors that belong to the vision tower and projector: loaded by the vision model, not the decoder.
VISION_PREFIXES = (
    "model.vision_tower.",
    "vision_tower.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
)

_ROLE_SUFFIXES = (
    # (suffix, role); longest first so "weight_scale_inv" wins over "weight_scale" and "weight"
    (".weight_packed", "packed"),  # NVFP4 (compressed-tensors): two E2M1 values per byte
    (".weight_global_scale", "global_scale"),  # NVFP4: the per-tensor divisor
    (".input_global_scale", "input_global_scale"),  # NVFP4: the activations' divisor (W4A4 kernels only)
    (".weight_scale_inv", "scale"),
    (".weight_scale", "block_scale"),  # NVFP4: one E4M3 scale per 16 values
    (".qscale_weight", "scale"),
    (".activation_scale", "input_scale"),
    (".input_scale", "input_scale"),
    (".qscale_act", "input_scale"),
    (".weight", "weight"),
    ("_scale_inv", "scale"),
    ("_activation_scale", "input_scale"),
)


@dataclass(frozen=True)
class Destination:
    module: str  # dotted module path in Mistral4Model, e.g. "layers.0.self_attn.q_a_proj"
    param: str  # "weight", "w13" or "w2"
    index: Index = ()  # slice of the parameter this tensor fills
    scale_shape: tuple[int, ...] = ()  # full scale tensor of the parameter when kept in FP8
    scale_index: Index = ()  # where this tensor's scale goes inside it
    quantizable: bool = True  # False: always dequantised (norms, router, embeddings, lm_head, vision)
    interleaved_heads: int = 0  # > 0: q/k rows of this many heads in interleaved rope order, to reorder at load


def split_role(name: str) -> tuple[str, str]:
    """'layers.0.attention.wq_a.qscale_weight' -> ('layers.0.attention.wq_a', 'scale')."""
    for suffix, role in _ROLE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    if re.search(r"experts\.(gate_up_proj|down_proj)$", name):
        return name, "weight"
    return name, "unknown"


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


_HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HF_ATTN = (
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
)
# native (params.json) attention names -> HF names: one table for the loaders and the tiny writers
NATIVE_ATTN = {
    "wq_a": "q_a_proj",
    "q_a_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wq": "q_proj",
    "wkv_a_with_mqa": "kv_a_proj_with_mqa",
    "kv_a_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}
_HF_VISION_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
_HF_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_HF_VISION_BLOCK = (
    r"transformer\.layers\.(\d+)\."
    r"(attention_norm|ffn_norm|attention\.[qkvo]_proj|feed_forward\.(?:gate|up|down)_proj)"
)
_HF_PROJECTOR = ("norm", "patch_merger.merging_layer", "linear_1", "linear_2")
_NATIVE_VISION_BLOCK = {
    "attention_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attention.wq": "attention.q_proj",
    "attention.wk": "attention.k_proj",
    "attention.wv": "attention.v_proj",
    "attention.wo": "attention.o_proj",
    "feed_forward.w1": "feed_forward.gate_proj",
    "feed_forward.w2": "feed_forward.down_proj",
    "feed_forward.w3": "feed_forward.up_proj",
}
_NATIVE_PROJECTOR = {
    "pre_mm_projector_norm": "norm",
    "patch_merger.merging_layer": "patch_merger.merging_layer",
    "vision_language_adapter.w_in": "linear_1",
    "vision_language_adapter.w_out": "linear_2",
}
_NATIVE_EXPERT = {"w1": ("gate", 0), "w3": ("up", 1), "w2": ("down", None)}
_HF_EXPERT = {"gate_proj": ("gate", 0), "up_proj": ("up", 1), "down_proj": ("down", None)}


class NameMapper:
    """Maps a checkpoint base name of either layout to its Destination (None: not a decoder tensor)."""

    def __init__(self, config: ModelConfig) -> None:
        t = config.text
        self.E, self.I, self.layout = t.num_experts, t.moe_intermediate_size, config.layout
        self.shared_I = t.moe_intermediate_size * t.num_shared_experts
        self.vision = config.vision

    def map(self, base: str) -> Destination | None:
        if is_vision(base + "."):
            if self.vision is None:
                return None
            return self._map_vision_native(base) if self.layout == "mistral" else self._map_vision_hf(base)
        if self.layout == "mistral":
            return self._map_native(base)
        return self._map_hf(base)

    def _map_hf(self, base: str) -> Destination | None:
        if base in ("lm_head", "language_model.lm_head"):
            return Destination("lm_head", "weight", quantizable=False)
        for prefix in _HF_TEXT_PREFIXES:
            if base.startswith(prefix):
                base = base[len(prefix) :]
                break
        else:
            return None
        if base in ("embed_tokens", "norm"):
            return Destination(base, "weight", quantizable=False)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", base)
        if not m:
            return None
        layer, rest = f"layers.{m.group(1)}", m.group(2)
        if rest in ("input_layernorm", "post_attention_layernorm"):
            return Destination(f"{layer}.{rest}", "weight", quantizable=False)
        if rest.startswith("self_attn.") and rest[len("self_attn.") :] in _HF_ATTN:
            return self._attn(f"{layer}.{rest}")
        if rest == "mlp.gate":
            return Destination(f"{layer}.mlp.gate", "weight", quantizable=False)
        if rest == "mlp.experts.gate_up_proj":
            return Destination(f"{layer}.mlp.experts", "w13", scale_shape=(self.E, 2, 1))
        if rest == "mlp.experts.down_proj":
            return Destination(f"{layer}.mlp.experts", "w2", scale_shape=(self.E, 1, 1))
        m = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)", rest)
        if m:
            return self._expert(layer, int(m.group(1)), *_HF_EXPERT[m.group(2)])
        m = re.fullmatch(r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)", rest)
        if m:
            return self._shared(layer, *_HF_EXPERT[m.group(1)])
        return None

    def _map_native(self, base: str) -> Destination | None:
        if base in ("tok_embeddings", "norm", "output"):
            name = {"tok_embeddings": "embed_tokens", "norm": "norm", "output": "lm_head"}[base]
            return Destination(name, "weight", quantizable=False)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", base)
        if not m:
            return None
        layer, rest = f"layers.{m.group(1)}", m.group(2)
        if rest in ("attention_norm", "ffn_norm"):
            norm = "input_layernorm" if rest == "attention_norm" else "post_attention_layernorm"
            return Destination(f"{layer}.{norm}", "weight", quantizable=False)
        m2 = re.fullmatch(r"attention\.(\w+)", rest)
        if m2 and m2.group(1) in NATIVE_ATTN:
            return self._attn(f"{layer}.self_attn.{NATIVE_ATTN[m2.group(1)]}")
        if rest == "gate":
            return Destination(f"{layer}.mlp.gate", "weight", quantizable=False)
        m2 = re.fullmatch(r"experts\.(\d+)\.(w1|w2|w3)", rest)
        if m2:
            return self._expert(layer, int(m2.group(1)), *_NATIVE_EXPERT[m2.group(2)])
        m2 = re.fullmatch(r"shared_experts\.(w1|w2|w3)", rest)
        if m2:
            return self._shared(layer, *_NATIVE_EXPERT[m2.group(1)])
        return None

    def _map_vision_hf(self, base: str) -> Destination | None:
        for prefix in _HF_VISION_TOWER_PREFIXES:
            if base.startswith(prefix):
                rest = base[len(prefix) :]
                if rest in ("patch_conv", "ln_pre"):
                    return self._vision(f"encoder.{rest}")
                m = re.fullmatch(_HF_VISION_BLOCK, rest)
                if m and int(m.group(1)) < self.vision.num_layers:
                    return self._vision(f"encoder.{rest}", interleaved=False)
                return None
        for prefix in _HF_PROJECTOR_PREFIXES:
            if base.startswith(prefix) and base[len(prefix) :] in _HF_PROJECTOR:
                return self._vision(f"projector.{base[len(prefix) :]}")
        return None

    def _map_vision_native(self, base: str) -> Destination | None:
        if base in _NATIVE_PROJECTOR:
            return self._vision(f"projector.{_NATIVE_PROJECTOR[base]}")
        if base in ("vision_encoder.patch_conv", "vision_encoder.ln_pre"):
            return self._vision(f"encoder.{base[len('vision_encoder.') :]}")
        m = re.fullmatch(r"vision_encoder\.transformer\.layers\.(\d+)\.(.+)", base)
        if m and int(m.group(1)) < self.vision.num_layers and m.group(2) in _NATIVE_VISION_BLOCK:
            inner = _NATIVE_VISION_BLOCK[m.group(2)]
            return self._vision(f"encoder.transformer.layers.{m.group(1)}.{inner}", interleaved=True)
        return None

    def _vision(self, module: str, interleaved: bool = False) -> Destination:
        qk = module.endswith(("attention.q_proj", "attention.k_proj"))
        heads = self.vision.num_heads if interleaved and qk else 0
        return Destination(f"vision.{module}", "weight", quantizable=False, interleaved_heads=heads)

    @staticmethod
    def _attn(module: str) -> Destination:
        is_norm = module.endswith("layernorm")
        return Destination(module, "weight", quantizable=not is_norm)

    def _expert(self, layer: str, e: int, kind: str, half: int | None) -> Destination | None:
        if e >= self.E:
            return None
        module = f"{layer}.mlp.experts"
        if kind == "down":
            return Destination(module, "w2", (e,), (self.E, 1, 1), (e, 0, 0))
        rows = slice(half * self.I, (half + 1) * self.I)
        return Destination(module, "w13", (e, rows), (self.E, 2, 1), (e, half, 0))

    def _shared(self, layer: str, kind: str, half: int | None) -> Destination | None:
        if not self.shared_I:
            return None
        module = f"{layer}.mlp.shared_experts"
        if kind == "down":
            return Destination(f"{module}.down", "weight")
        rows = slice(half * self.shared_I, (half + 1) * self.shared_I)
        return Destination(f"{module}.gate_up", "weight", (rows,), (2, 1), (half, 0))
