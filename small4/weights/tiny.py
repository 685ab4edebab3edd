"""Tiny random checkpoints in the exact real layout (config, sharded safetensors with index, v15 tekken.json).

Real weights cannot be downloaded here, so every loader test and the embedded default model run on these. They
keep the real structure (MLA ranks, q_lora, many experts with top-k, a shared expert, YaRN plus llama-4 scaling,
a Pixtral tower) at small widths, and put the YaRN base length at 32 tokens so short prompts already exercise
long-position scaling. Weights are scaled so that logits are well spread: greedy decoding then has no near-ties
and parity tests are meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from small4.kernels.fp8 import FP8_DTYPE, quantize_fp8_per_tensor
from small4.weights.names import NATIVE_ATTN
from small4.weights.tekken_tiny import write_tiny_tekken


@dataclass(frozen=True)
class TinySpec:
    """Shapes of a tiny model. ``yarn_mscale`` picks the reference's softmax mscale on or off."""

    num_bpe_ranks: int = 2000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    q_lora_rank: int | None = 48
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 24
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    num_shared_experts: int = 1
    yarn_factor: float = 128.0
    yarn_original_max: int = 32
    llama4_beta: float = 0.1
    yarn_mscale: bool = True
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int = 64
    spaceless_tokenizer: bool = False  # tekken_tiny's pieces without a space (the demo model's copying)

    @property
    def max_position_embeddings(self) -> int:
        return int(self.yarn_factor * self.yarn_original_max)

    @property
    def vocab_size(self) -> int:
        return 1000 + self.num_bpe_ranks


Layout = Literal["hf", "mistral"]
Quant = Literal["none", "fp8", "fp8-block", "nvfp4"]


def hf_config(spec: TinySpec, fp8: bool) -> dict:
    text = {
        "model_type": "mistral4",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": 4 * spec.hidden_size,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "n_shared_experts": spec.num_shared_experts,
        "n_routed_experts": spec.num_experts,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": spec.q_lora_rank,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "first_k_dense_replace": 0,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 11,
        "tie_word_embeddings": False,
        "rope_interleave": True,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": spec.yarn_factor,
            "original_max_position_embeddings": spec.yarn_original_max,
            "max_position_embeddings": spec.max_position_embeddings,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0 if spec.yarn_mscale else 0.0,
            "llama_4_scaling_beta": spec.llama4_beta,
            "partial_rotary_factor": spec.qk_rope_head_dim / (spec.qk_nope_head_dim + spec.qk_rope_head_dim),
        },
    }
    if not spec.yarn_mscale:
        text["rope_parameters"]["attention_factor"] = 1.0
    vision = {
        "model_type": "pixtral",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "head_dim": spec.vision_hidden // spec.vision_heads,
        "num_channels": 3,
        "image_size": 1540,
        "patch_size": 14,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    cfg = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": 10,
        "projector_hidden_act": "gelu",
        "spatial_merge_size": 2,
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    if fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "weight_block_size": None,
            "modules_to_not_convert": [
                "model.vision_tower",
                "model.multi_modal_projector",
                "lm_head",
                "model.language_model.embed_tokens",
                "mlp.gate",
            ],
        }
    return cfg


def mistral_params(spec: TinySpec, fp8: bool) -> dict:
    params = {
        "dim": spec.hidden_size,
        "n_layers": spec.num_layers,
        "head_dim": spec.qk_nope_head_dim + spec.qk_rope_head_dim,
        "hidden_dim": 4 * spec.hidden_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_heads,
        "rope_theta": 10000.0,
        "norm_eps": 1e-6,
        "vocab_size": spec.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": spec.max_position_embeddings,
        "q_lora_rank": spec.q_lora_rank,
        "kv_lora_rank": spec.kv_lora_rank,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "yarn": {
            "original_max_position_embeddings": spec.yarn_original_max,
            "factor": spec.yarn_factor,
            "apply_scale": spec.yarn_mscale,
            "beta": 32.0,
            "alpha": 1.0,
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": spec.yarn_original_max,
            "beta": spec.llama4_beta,
        },
        "moe": {
            "expert_hidden_dim": spec.moe_intermediate_size,
            "route_every_n": 1,
            "first_k_dense_replace": 0,
            "num_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok,
            "num_expert_groups": 1,
            "num_expert_groups_per_tok": 1,
            "routed_scale": 1.0,
            "num_shared_experts": spec.num_shared_experts,
        },
        "vision_encoder": {
            "image_token_id": 10,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
            "intermediate_size": spec.vision_intermediate,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": 2,
            "hidden_size": spec.vision_hidden,
            "num_channels": 3,
            "image_size": 1540,
            "max_image_size": 1540,
            "patch_size": 14,
            "rope_theta": 10000.0,
            "add_pre_mm_projector_layer_norm": True,
            "adapter_bias": False,
        },
    }
    if fp8:
        params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    return params


def random_hf_state_dict(spec: TinySpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under transformers' Mistral3ForConditionalGeneration names (float32)."""
    g = torch.Generator().manual_seed(seed)

    def lin(out: int, inn: int, *lead: int) -> torch.Tensor:
        return torch.randn(*lead, out, inn, generator=g) / inn**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    H, V, nh = spec.hidden_size, spec.vocab_size, spec.num_heads
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    p = "model.language_model."
    sd = {
        f"{p}embed_tokens.weight": torch.randn(V, H, generator=g),
        f"{p}norm.weight": norm(H),
        "lm_head.weight": lin(V, H) * 2.0,
    }
    for i in range(spec.num_layers):
        L = f"{p}layers.{i}."
        sd[L + "input_layernorm.weight"] = norm(H)
        sd[L + "post_attention_layernorm.weight"] = norm(H)
        if spec.q_lora_rank:
            sd[L + "self_attn.q_a_proj.weight"] = lin(spec.q_lora_rank, H)
            sd[L + "self_attn.q_a_layernorm.weight"] = norm(spec.q_lora_rank)
            sd[L + "self_attn.q_b_proj.weight"] = lin(nh * qk, spec.q_lora_rank) * 2.0
        else:
            sd[L + "self_attn.q_proj.weight"] = lin(nh * qk, H) * 2.0
        sd[L + "self_attn.kv_a_proj_with_mqa.weight"] = lin(spec.kv_lora_rank + spec.qk_rope_head_dim, H)
        sd[L + "self_attn.kv_a_layernorm.weight"] = norm(spec.kv_lora_rank)
        sd[L + "self_attn.kv_b_proj.weight"] = (
            lin(nh * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank) * 2.0
        )
        sd[L + "self_attn.o_proj.weight"] = lin(H, nh * spec.v_head_dim)
        sd[L + "mlp.gate.weight"] = lin(spec.num_experts, H) * 4.0
        I = spec.moe_intermediate_size
        sd[L + "mlp.experts.gate_up_proj"] = lin(2 * I, H, spec.num_experts)
        sd[L + "mlp.experts.down_proj"] = lin(H, I, spec.num_experts)
        if spec.num_shared_experts:
            S = I * spec.num_shared_experts
            sd[L + "mlp.shared_experts.gate_proj.weight"] = lin(S, H)
            sd[L + "mlp.shared_experts.up_proj.weight"] = lin(S, H)
            sd[L + "mlp.shared_experts.down_proj.weight"] = lin(H, S)
    sd.update(_random_vision_hf(spec, g))
    return sd


def _random_vision_hf(spec: TinySpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    D, F = spec.vision_hidden, spec.vision_intermediate
    v, m = "model.vision_tower.", "model.multi_modal_projector."
    sd = {
        v + "patch_conv.weight": torch.randn(D, 3, 14, 14, generator=g) / (3 * 14 * 14) ** 0.5,
        v + "ln_pre.weight": 1.0 + 0.1 * torch.randn(D, generator=g),
    }
    for i in range(spec.vision_layers):
        L = f"{v}transformer.layers.{i}."
        for n in ("attention_norm", "ffn_norm"):
            sd[L + f"{n}.weight"] = 1.0 + 0.1 * torch.randn(D, generator=g)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[L + f"attention.{n}.weight"] = torch.randn(D, D, generator=g) / D**0.5
        sd[L + "feed_forward.gate_proj.weight"] = torch.randn(F, D, generator=g) / D**0.5
        sd[L + "feed_forward.up_proj.weight"] = torch.randn(F, D, generator=g) / D**0.5
        sd[L + "feed_forward.down_proj.weight"] = torch.randn(D, F, generator=g) / F**0.5
    sd[m + "norm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=g)
    sd[m + "patch_merger.merging_layer.weight"] = torch.randn(D, 4 * D, generator=g) / (4 * D) ** 0.5
    sd[m + "linear_1.weight"] = torch.randn(spec.hidden_size, D, generator=g) / D**0.5
    sd[m + "linear_2.weight"] = torch.randn(spec.hidden_size, spec.hidden_size, generator=g) / spec.hidden_size**0.5
    return sd


_NATIVE_ATTN = {hf: native for native, hf in NATIVE_ATTN.items()}  # HF -> native


def hf_to_native(sd: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    """The same weights under Mistral-native names: per-expert w1/w2/w3, consolidated attention names."""
    p = "model.language_model."
    out = {
        "tok_embeddings.weight": sd[f"{p}embed_tokens.weight"],
        "norm.weight": sd[f"{p}norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    I = spec.moe_intermediate_size
    for i in range(spec.num_layers):
        L, N = f"{p}layers.{i}.", f"layers.{i}."
        out[N + "attention_norm.weight"] = sd[L + "input_layernorm.weight"]
        out[N + "ffn_norm.weight"] = sd[L + "post_attention_layernorm.weight"]
        for hf, nat in _NATIVE_ATTN.items():
            if L + f"self_attn.{hf}.weight" in sd:
                out[N + f"attention.{nat}.weight"] = sd[L + f"self_attn.{hf}.weight"]
        out[N + "gate.weight"] = sd[L + "mlp.gate.weight"]
        for e in range(spec.num_experts):
            gate_up = sd[L + "mlp.experts.gate_up_proj"][e]
            out[N + f"experts.{e}.w1.weight"] = gate_up[:I].clone()
            out[N + f"experts.{e}.w3.weight"] = gate_up[I:].clone()
            out[N + f"experts.{e}.w2.weight"] = sd[L + "mlp.experts.down_proj"][e].clone()
        if spec.num_shared_experts:
            for hf, nat in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                out[N + f"shared_experts.{nat}.weight"] = sd[L + f"mlp.shared_experts.{hf}.weight"]
    out.update(_vision_hf_to_native(sd, spec))
    return out


def _vision_hf_to_native(sd: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    v, m = "model.vision_tower.", "model.multi_modal_projector."
    out = {
        "vision_encoder.patch_conv.weight": sd[v + "patch_conv.weight"],
        "vision_encoder.ln_pre.weight": sd[v + "ln_pre.weight"],
    }
    names = {
        "attention_norm.weight": "attention_norm.weight",
        "ffn_norm.weight": "ffn_norm.weight",
        "attention.q_proj.weight": "attention.wq.weight",
        "attention.k_proj.weight": "attention.wk.weight",
        "attention.v_proj.weight": "attention.wv.weight",
        "attention.o_proj.weight": "attention.wo.weight",
        "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
        "feed_forward.down_proj.weight": "feed_forward.w2.weight",
        "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    }
    for i in range(spec.vision_layers):
        for hf, nat in names.items():
            tensor = sd[f"{v}transformer.layers.{i}.{hf}"]
            if hf in ("attention.q_proj.weight", "attention.k_proj.weight"):
                tensor = _rotate_half_to_interleaved(tensor, spec.vision_heads)
            out[f"vision_encoder.transformer.layers.{i}.{nat}"] = tensor
    out["pre_mm_projector_norm.weight"] = sd[m + "norm.weight"]
    out["patch_merger.merging_layer.weight"] = sd[m + "patch_merger.merging_layer.weight"]
    out["vision_language_adapter.w_in.weight"] = sd[m + "linear_1.weight"]
    out["vision_language_adapter.w_out.weight"] = sd[m + "linear_2.weight"]
    return out


def _rotate_half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores Pixtral q/k rows permuted for rotate-half rope; native files keep the interleaved order."""
    out_dim, inn = w.shape
    head_dim = out_dim // heads
    return w.view(heads, 2, head_dim // 2, inn).transpose(1, 2).reshape(out_dim, inn)


def _quantize_state_dict(sd: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Per-tensor FP8 for every attention and expert matrix; norms, router, embeddings, head and vision stay."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not _is_fp8_target(name, layout):
            out[name] = w
            continue
        if name.endswith(("gate_up_proj", "down_proj")) and not name.endswith(".weight"):
            out.update(_quantize_fused_experts(name, w))
            continue
        q, scale = quantize_fp8_per_tensor(w)
        base = name[: -len(".weight")]
        out[name] = q
        if layout == "hf":
            out[base + ".weight_scale_inv"] = scale
            out[base + ".activation_scale"] = torch.tensor(1.0)
        else:
            out[base + ".qscale_weight"] = scale
            out[base + ".qscale_act"] = torch.tensor(1.0)
    return out


def _quantize_fused_experts(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF fused experts: one scale per expert and per gate/up half ([E, 2, 1]) or per expert ([E, 1, 1])."""
    halves = 2 if name.endswith("gate_up_proj") else 1
    E, rows = w.shape[0], w.shape[1] // halves
    q = torch.empty(w.shape, dtype=FP8_DTYPE)
    scales = torch.empty(E, halves, 1)
    for e in range(E):
        for h in range(halves):
            q[e, h * rows : (h + 1) * rows], scales[e, h, 0] = quantize_fp8_per_tensor(w[e, h * rows : (h + 1) * rows])
    return {name: q, name + "_scale_inv": scales, name + "_activation_scale": torch.ones(E)}


def _is_fp8_target(name: str, layout: Layout) -> bool:
    if "vision" in name or "multi_modal" in name or "patch_merger" in name or "adapter" in name:
        return False
    experts = ".experts." in name or ".shared_experts." in name
    if layout == "hf":
        return (".self_attn." in name and "layernorm" not in name) or experts
    return (".attention." in name and "norm" not in name) or experts


def write_shards(sd: dict[str, torch.Tensor], out: Path, layout: Layout, num_shards: int = 2) -> None:
    """Splits tensors over ``num_shards`` files in name order and writes the matching index."""
    names = sorted(sd)
    per = -(-len(names) // num_shards)
    stem = "model" if layout == "hf" else "consolidated"
    weight_map, total = {}, 0
    for k in range(num_shards):
        chunk = names[k * per : (k + 1) * per]
        fname = f"{stem}-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in chunk}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
        total += sum(sd[n].numel() * sd[n].element_size() for n in chunk)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def make_tiny(
    out: str | Path,
    layout: Layout | Literal["release"] = "hf",
    fp8: bool = False,
    seed: int = 0,
    spec: TinySpec | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quant: Quant | None = None,
) -> Path:
    """Writes a complete tiny checkpoint directory and returns its path.

    ``quant`` (``fp8=True`` is ``quant="fp8"``): ``fp8`` per-tensor, ``fp8-block`` DeepSeek-style blocks of
    ``tiny_quant.TINY_FP8_BLOCK`` (HF layout), ``nvfp4`` compressed-tensors over the routed experts (native
    layout). ``layout="release"``: the public release's spellings, both file sets in one directory (see
    tiny_release.py; NVFP4: the native set alone), with a generation_config.json; its spec defaults to
    ``RELEASE_SPEC`` (1,048,576 positions)."""
    from small4.weights import tiny_quant, tiny_release

    quant = quant or ("fp8" if fp8 else "none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "release":
        spec = spec or tiny_release.RELEASE_SPEC
        tiny_release.make_release(out, quant, seed, spec, dtype)
        (out / "generation_config.json").write_text(json.dumps(tiny_release.GENERATION_CONFIG, indent=2))
        write_tiny_tekken(out / "tekken.json", spec.num_bpe_ranks, spec.spaceless_tokenizer)
        return out
    if (quant == "fp8-block" and layout != "hf") or (quant == "nvfp4" and layout != "mistral"):
        raise ValueError(
            f"{quant} tiny checkpoints are written in the {'hf' if quant == 'fp8-block' else 'mistral'} layout"
        )
    spec = spec or TinySpec()
    sd = {k: v.to(dtype) for k, v in random_hf_state_dict(spec, seed).items()}
    if layout == "mistral":
        sd = hf_to_native(sd, spec)
    if quant == "fp8":
        sd = _quantize_state_dict(sd, layout)
    elif quant == "fp8-block":
        sd = tiny_quant.quantize_fp8_block_state_dict(sd, tiny_quant.TINY_FP8_BLOCK)
    elif quant == "nvfp4":
        sd = tiny_quant.quantize_nvfp4_state_dict(sd)
    config = hf_config(spec, quant == "fp8") if layout == "hf" else mistral_params(spec, quant == "fp8")
    if quant == "fp8-block":
        config["quantization_config"] = tiny_quant.fp8_block_quantization_config(tiny_quant.TINY_FP8_BLOCK)
    elif quant == "nvfp4":
        config["quantization_config"] = tiny_quant.nvfp4_quantization_config()
    (out / ("config.json" if layout == "hf" else "params.json")).write_text(json.dumps(config, indent=2))
    write_shards(sd, out, layout)
    write_tiny_tekken(out / "tekken.json", spec.num_bpe_ranks, spec.spaceless_tokenizer)
    return out
