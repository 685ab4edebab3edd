"""Shared helpers for parity tests: the transformers oracle and a minimal paged-cache greedy loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from small4.model.context import AttentionMetadata
from small4.model.mistral4 import Mistral4Model


def read_checkpoint(model_dir: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob(pattern)):
        sd.update(load_file(str(shard)))
    return sd


def _block_expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Each scale entry covers a block[0] x block[1] tile; the last tile of a dim may be partial."""
    s = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequantize_for_reference(
    sd: dict[str, torch.Tensor], block: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Independent FP8 reading for the oracle: stored value times its scale, scales broadcast per half/expert, or
    per ``block`` tile (the config's weight_block_size) for block-scaled checkpoints."""
    out = {}
    for name, t in sd.items():
        if name.endswith(("_scale_inv", ".activation_scale", "_activation_scale", ".qscale_weight", ".qscale_act")):
            continue
        if t.dtype != torch.float8_e4m3fn:
            out[name] = t.float()
            continue
        if name.endswith(".weight"):
            base = name[: -len(".weight")]
            scale = sd.get(base + ".weight_scale_inv", sd.get(base + ".qscale_weight"))
            out[name] = t.float() * (_block_expand(scale, t.shape, block) if block else scale.float())
        elif block:  # fused experts [E, R, H] with block scales [E, R/b0, H/b1]
            out[name] = t.float() * _block_expand(sd[name + "_scale_inv"], t.shape, block)
        else:  # fused experts [E, R, H] with scales [E, halves, 1]
            scale = sd[name + "_scale_inv"].float()
            rows = t.shape[1] // scale.shape[1]
            out[name] = t.float() * scale.repeat_interleave(rows, dim=1)
    return out


_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def dequantize_nvfp4_for_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent NVFP4 reading (compressed-tensors' definition, written apart from small4/kernels/nvfp4.py):
    byte j holds values 2j (low nibble) and 2j+1 (high nibble); value = e2m1 * group scale / global scale."""
    out = {}
    table = torch.tensor(_E2M1)
    for name, t in sd.items():
        if name.endswith((".weight_scale", ".weight_global_scale", ".input_global_scale")):
            continue
        if not name.endswith(".weight_packed"):
            out[name] = t.float()
            continue
        base = name[: -len(".weight_packed")]
        rows, half = t.shape
        codes = torch.empty(rows, 2 * half, dtype=torch.long)
        codes[:, 0::2], codes[:, 1::2] = (t & 0xF).long(), (t >> 4).long()
        scale = sd[base + ".weight_scale"].float().repeat_interleave(16, dim=1)
        out[base + ".weight"] = table[codes] * scale / sd[base + ".weight_global_scale"].float()
    return out


def plain_softmax_scale(reference) -> None:
    """Sets transformers' attention to the plain 1/sqrt(qk_head_dim) softmax scale. transformers >= 5.23 multiplies
    it by YaRN's mscale^2 whenever mscale_all_dim is set; small4 does that only when params.json says
    yarn.apply_scale true (or --attention-scale-mscale on), following Mistral, vLLM's native path and SGLang."""
    for layer in reference.model.language_model.layers:
        layer.self_attn.scaling = layer.self_attn.qk_head_dim**-0.5


def release_hf_to_current(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's older transformers names -> today's (what Mistral3ForConditionalGeneration declares)."""
    renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )
    out = {}
    for name, t in sd.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = t
    return out


_NATIVE_TO_HF_ATTN = {
    "wq_a": "q_a_proj",
    "q_a_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wq": "q_proj",
    "wkv_a_with_mqa": "kv_a_proj_with_mqa",
    "kv_a_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}


def native_text_to_hf(sd: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Written independently of small4's loader: consolidated names -> transformers Mistral3 names (text only)."""
    p = "model.language_model."
    out = {
        f"{p}embed_tokens.weight": sd["tok_embeddings.weight"],
        f"{p}norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(num_layers):
        n, h = f"layers.{i}.", f"{p}layers.{i}."
        out[h + "input_layernorm.weight"] = sd[n + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[n + "ffn_norm.weight"]
        for nat, hf in _NATIVE_TO_HF_ATTN.items():
            if n + f"attention.{nat}.weight" in sd:
                out[h + f"self_attn.{hf}.weight"] = sd[n + f"attention.{nat}.weight"]
        out[h + "mlp.gate.weight"] = sd[n + "gate.weight"]
        out[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([sd[n + f"experts.{e}.w1.weight"], sd[n + f"experts.{e}.w3.weight"]])
                for e in range(num_experts)
            ]
        )
        out[h + "mlp.experts.down_proj"] = torch.stack([sd[n + f"experts.{e}.w2.weight"] for e in range(num_experts)])
        for nat, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            if n + f"shared_experts.{nat}.weight" in sd:
                out[h + f"mlp.shared_experts.{hf}.weight"] = sd[n + f"shared_experts.{nat}.weight"]
    return out


_NATIVE_TO_HF_VISION_BLOCK = {
    "attention_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attention.wq": "attention.q_proj",
    "attention.wk": "attention.k_proj",
    "attention.wv": "attention.v_proj",
    "attention.wo": "attention.o_proj",
    "feed_forward.w1": "feed_forward.gate_proj",
    "feed_forward.w3": "feed_forward.up_proj",
    "feed_forward.w2": "feed_forward.down_proj",
}


def native_vision_to_hf(sd: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """Written independently of small4's loader: native Pixtral + adapter names -> transformers Mistral3 names.

    Native q/k rows pair lanes (2i, 2i+1) of each head for rope; transformers pairs (i, i + head_dim/2), so each
    head's rows are gathered even-indexed first, then odd-indexed."""
    v, m = "model.vision_tower.", "model.multi_modal_projector."
    out = {
        v + "patch_conv.weight": sd["vision_encoder.patch_conv.weight"],
        v + "ln_pre.weight": sd["vision_encoder.ln_pre.weight"],
        m + "norm.weight": sd["pre_mm_projector_norm.weight"],
        m + "patch_merger.merging_layer.weight": sd["patch_merger.merging_layer.weight"],
        m + "linear_1.weight": sd["vision_language_adapter.w_in.weight"],
        m + "linear_2.weight": sd["vision_language_adapter.w_out.weight"],
    }
    for i in range(num_layers):
        for nat, hf in _NATIVE_TO_HF_VISION_BLOCK.items():
            w = sd[f"vision_encoder.transformer.layers.{i}.{nat}.weight"]
            if nat in ("attention.wq", "attention.wk"):
                head_dim = w.shape[0] // num_heads
                order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
                rows = torch.cat([h * head_dim + order for h in range(num_heads)])
                w = w[rows]
            out[f"{v}transformer.layers.{i}.{hf}.weight"] = w
    return out


def reference_model(hf_config: dict, state_dict: dict[str, torch.Tensor], with_vision: bool = False):
    """transformers' Mistral3ForConditionalGeneration in fp32 with the given weights: text only (vision left
    random) or, with ``with_vision``, every weight (strict)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = dict(hf_config)
    cfg.pop("quantization_config", None)
    model = Mistral3ForConditionalGeneration(Mistral3Config(**cfg)).float().eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    if with_vision:
        assert not missing, missing
    else:
        assert all("vision_tower" in k or "multi_modal_projector" in k for k in missing), missing
    return model


def hf_config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


class PagedGreedy:
    """Prefill then token-by-token greedy decode through small4's paged latent cache (no engine needed)."""

    def __init__(self, model: Mistral4Model, block_size: int = 4, num_blocks: int = 64) -> None:
        cfg = model.config.text
        self.model, self.block_size = model, block_size
        dtype = model.embed_tokens.weight.dtype
        self.caches = [torch.zeros(num_blocks, block_size, cfg.latent_dim, dtype=dtype) for _ in range(cfg.num_layers)]
        # a scrambled block order, so that paging bugs cannot hide behind contiguous blocks
        self.block_table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).to(torch.int32)

    def _step(self, tokens: list[int], start: int, embeds: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(start, start + len(tokens))
        blocks = self.block_table[positions // self.block_size].long()
        slots = blocks * self.block_size + positions % self.block_size
        meta = AttentionMetadata(
            query_start_loc=[0, len(tokens)],
            seq_lens=[start + len(tokens)],
            slot_mapping=slots,
            block_tables=self.block_table[None],
            block_size=self.block_size,
        )
        hidden = self.model(torch.tensor(tokens), positions, meta, self.caches, inputs_embeds=embeds)
        return self.model.compute_logits(hidden)

    @torch.no_grad()
    def generate(
        self, prompt: list[int], max_new_tokens: int, chunk: int = 7, inputs_embeds: torch.Tensor | None = None
    ) -> list[int]:
        """``inputs_embeds`` [len(prompt), hidden] (e.g. with image rows merged in) replaces the prompt's token
        embeddings during the chunked prefill."""
        for start in range(0, len(prompt), chunk):
            embeds = None if inputs_embeds is None else inputs_embeds[start : start + chunk]
            logits = self._step(prompt[start : start + chunk], start, embeds)
        out = [int(logits[-1].argmax())]
        while len(out) < max_new_tokens:
            logits = self._step([out[-1]], len(prompt) + len(out) - 1)
            out.append(int(logits[-1].argmax()))
        return out


@pytest.fixture
def paged_greedy():
    return PagedGreedy
