"""Tiny random EAGLE drafts for a tiny target, in the released layout and the HF layout, BF16 or per-tensor FP8.

The released layout (``params.json`` + ``consolidated.safetensors``) uses Mistral's native names, as vLLM's and
SGLang's ``MistralLarge3`` remapping tables read them: ``eagle_linear`` (the fc over cat(embedding, hidden)),
``layers.N.attention_norm`` / ``attention.wq_a ... wo`` / ``ffn_norm`` / ``feed_forward.w1 w2 w3``, ``norm``, FP8
scales ``qscale_weight`` / ``qscale_act``; its params.json has no ``moe`` section (every layer is dense, as SGLang
reads a Small 4 draft) and ``hidden_dim`` is the MLP width. The HF layout (``config.json`` + ``model.safetensors``)
uses the names vLLM's ``EagleMistralLarge3`` module has after that remapping (``model.fc``, ``model.layers.N.
self_attn.*`` / ``mlp.gate_proj up_proj down_proj``, ``model.norm``) with the target's HF FP8 spellings
(``weight_scale_inv`` / ``activation_scale``). Neither holds an embedding or an lm_head: both are the target's.

Both layouts of one seed hold exactly the same values (FP8 is quantised once, then renamed), so loading the two
must give identical parameters; see ``small4/spec/loading.py`` for what is known and what is assumed of the real
files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from small4.kernels.fp8 import quantize_fp8_per_tensor
from small4.weights.names import NATIVE_ATTN
from small4.weights.tiny import TinySpec, hf_config, mistral_params

DraftLayout = Literal["release", "hf"]
DRAFT_ARCHITECTURE = "EagleMistralLarge3ForCausalLM"  # vLLM's class name (SGLang: MistralLarge3ForCausalLMEagle)

NATIVE_TO_HF_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class DraftSpec:
    """The draft's own shapes; everything else is the target's (``TinySpec``)."""

    num_layers: int = 1
    intermediate_size: int = 96


def random_native_draft(target: TinySpec, draft: DraftSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random draft weights (float32) under the released names; scaled like tiny.py's so outputs stay spread."""
    g = torch.Generator().manual_seed(seed)

    def lin(out: int, inn: int) -> torch.Tensor:
        return torch.randn(out, inn, generator=g) / inn**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    H, nh, I = target.hidden_size, target.num_heads, draft.intermediate_size
    qk = target.qk_nope_head_dim + target.qk_rope_head_dim
    sd = {"eagle_linear.weight": lin(H, 2 * H), "norm.weight": norm(H)}
    for i in range(draft.num_layers):
        L = f"layers.{i}."
        sd[L + "attention_norm.weight"] = norm(H)
        if target.q_lora_rank:
            sd[L + "attention.wq_a.weight"] = lin(target.q_lora_rank, H)
            sd[L + "attention.q_a_norm.weight"] = norm(target.q_lora_rank)
            sd[L + "attention.wq_b.weight"] = lin(nh * qk, target.q_lora_rank) * 2.0
        else:
            sd[L + "attention.wq.weight"] = lin(nh * qk, H) * 2.0
        sd[L + "attention.wkv_a_with_mqa.weight"] = lin(target.kv_lora_rank + target.qk_rope_head_dim, H)
        sd[L + "attention.kv_a_norm.weight"] = norm(target.kv_lora_rank)
        sd[L + "attention.wkv_b.weight"] = lin(nh * (target.qk_nope_head_dim + target.v_head_dim), target.kv_lora_rank)
        sd[L + "attention.wo.weight"] = lin(H, nh * target.v_head_dim)
        sd[L + "ffn_norm.weight"] = norm(H)
        sd[L + "feed_forward.w1.weight"] = lin(I, H)
        sd[L + "feed_forward.w3.weight"] = lin(I, H)
        sd[L + "feed_forward.w2.weight"] = lin(H, I)
    return sd


def native_to_hf_name(name: str) -> str:
    """``layers.0.attention.wq_a.qscale_weight`` -> ``model.layers.0.self_attn.q_a_proj.weight_scale_inv``."""
    base, _, role = name.rpartition(".")
    role = {"qscale_weight": "weight_scale_inv", "qscale_act": "activation_scale"}.get(role, role)
    if base == "eagle_linear":
        return f"model.fc.{role}"
    if base == "norm":
        return f"model.norm.{role}"
    layer, _, rest = base.partition(".")[2].partition(".")  # "layers.0.attention.wq_a" -> "0", "attention.wq_a"
    kind, _, leaf = rest.partition(".")
    if rest in ("attention_norm", "ffn_norm"):
        hf = "input_layernorm" if rest == "attention_norm" else "post_attention_layernorm"
    elif kind == "attention":
        hf = f"self_attn.{NATIVE_ATTN[leaf]}"
    elif kind == "feed_forward":
        hf = f"mlp.{NATIVE_TO_HF_MLP[leaf]}"
    else:
        raise ValueError(f"not a draft tensor name: {name}")
    return f"model.layers.{layer}.{hf}.{role}"


def quantize_native_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor FP8 (e4m3) for every matrix (fc, attention, MLP); norms stay; scales as the release's native set
    spells them (``qscale_weight`` multiplier, ``qscale_act`` static activation scale)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if w.dim() != 2:
            out[name] = w
            continue
        q, scale = quantize_fp8_per_tensor(w)
        base = name[: -len(".weight")]
        out[name] = q
        out[base + ".qscale_weight"] = scale
        out[base + ".qscale_act"] = torch.tensor(1.0)
    return out


def draft_params(target: TinySpec, draft: DraftSpec, fp8: bool) -> dict:
    """The released params.json: the target's MLA / rope fields restated, no ``moe``, ``hidden_dim`` the MLP."""
    p = mistral_params(target, fp8=fp8)
    for key in ("moe", "vision_encoder"):
        p.pop(key)
    p["n_layers"] = draft.num_layers
    p["hidden_dim"] = draft.intermediate_size
    return p


def draft_hf_config(target: TinySpec, draft: DraftSpec, fp8: bool) -> dict:
    """config.json of the HF layout: vLLM's architecture name and DeepSeek-style fields, as vLLM and SGLang turn
    the params.json into (all layers dense: ``first_k_dense_replace`` = the layer count)."""
    text = hf_config(target, fp8=False)["text_config"]
    cfg = {
        "architectures": [DRAFT_ARCHITECTURE],
        "model_type": "deepseek_v3",
        **{k: text[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads")},
        **{k: text[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
        "num_hidden_layers": draft.num_layers,
        "intermediate_size": draft.intermediate_size,
        "first_k_dense_replace": draft.num_layers,
        "hidden_act": "silu",
        "rms_norm_eps": text["rms_norm_eps"],
        "max_position_embeddings": text["max_position_embeddings"],
        "rope_interleave": True,
        "rope_parameters": text["rope_parameters"],
        "tie_word_embeddings": False,
    }
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    return cfg


def make_tiny_draft(
    out: str | Path,
    layout: DraftLayout = "release",
    quant: Literal["none", "fp8"] = "none",
    seed: int = 0,
    target: TinySpec | None = None,
    draft: DraftSpec | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Writes a tiny draft for the tiny target ``target`` (default ``TinySpec()``, what ``make-tiny`` writes) in
    one layout: config + one safetensors file, no index (the release ships one ``consolidated.safetensors``)."""
    if layout not in ("release", "hf") or quant not in ("none", "fp8"):
        raise ValueError(f"a tiny draft is layout release or hf, quant none or fp8; got {layout!r}, {quant!r}")
    target, draft = target or TinySpec(), draft or DraftSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in random_native_draft(target, draft, seed).items()}
    if quant == "fp8":
        sd = quantize_native_fp8(sd)
    fp8 = quant == "fp8"
    if layout == "release":
        (out / "params.json").write_text(json.dumps(draft_params(target, draft, fp8), indent=2))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "consolidated.safetensors"))
    else:
        (out / "config.json").write_text(json.dumps(draft_hf_config(target, draft, fp8), indent=2))
        hf = {native_to_hf_name(k): v.contiguous() for k, v in sd.items()}
        save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
