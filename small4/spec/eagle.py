"""The EAGLE draft head Mistral released for Small 4 (vLLM's ``EagleMistralLarge3``), as a plain nn.Module.

What it computes, per draft position t (one flat batch, like the target):

    h = fc(cat([embed(token_{t+1}), target_hidden_t], -1))        # [T, 2H] -> [T, H], bias-free
    h = N x (h + attn(input_layernorm(h)); h + mlp(post_attention_layernorm(h)))   # MLA + *dense* SwiGLU
    out = norm(h)                                                  # the draft's hidden; logits = target.lm_head(out)

Where each choice comes from (vLLM ``model_executor/models/mistral_large_3_eagle.py``, ``deepseek_v2.py``):
- ``fc`` is the released ``eagle_linear`` (``eagle_linear.weight`` -> ``model.fc.weight``, FP8 scales
  ``qscale_weight`` / ``qscale_act``), built ``bias=False``; the concatenation is ``(inputs_embeds,
  hidden_states)``: the token embedding first, the target's hidden second. Unlike ``deepseek_eagle.py`` (DeepSeek's
  MTP-style draft) there is no ``enorm`` / ``hnorm`` before the concatenation.
- The layers are ``DeepseekV2DecoderLayer``s, so the first layer *does* have its input norm
  (``attention_norm`` in the release); ``first_k_dense_replace += start_layer_id`` makes every draft layer's MLP
  dense (``feed_forward.w1/w2/w3`` = gate/down/up); the width is the draft's ``intermediate_size``. 392 MB in FP8
  at Small 4's shapes fits 2 layers with an intermediate of 12288 (fc 33.5M + 2 x (MLA 28M + MLP 151M) params).
- The draft's embedding and lm_head are the target's (vLLM reports ``model.embed_tokens`` / ``lm_head`` as loaded
  and copies the target's in): this module owns neither; callers pass ``inputs_embeds`` (from
  ``Mistral4Model.embed``, so image rows are merged as in the target) and score with the target's ``lm_head``.
- The hidden state it takes: vLLM passes the target model's *output* hidden states, and ``DeepseekV2Model``
  returns them after its final norm; the draft's own output (after its final norm) is what the next chained
  draft step takes. So the default ``target_hidden="normed"``; EAGLE's original papers feed the pre-norm last
  layer, which ``Mistral4Model.forward_prenorm`` gives, for a draft trained that way (``target_hidden="prenorm"``).

The draft's attention reads and writes its own paged latent caches (one per draft layer), laid out exactly like the
target's and addressed with the same block tables and slot mapping, so the block manager allocates one set of
blocks for both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from small4.config import ConfigError, TextConfig
from small4.model.attention import AttnImpl, MLAttention
from small4.model.context import AttentionMetadata
from small4.model.layers import Linear, RMSNorm, RotaryEmbedding, SwiGLU

TargetHidden = Literal["normed", "prenorm"]


@dataclass(frozen=True)
class EagleConfig:
    """The draft's shapes: its own depth and dense MLP width, and the MLA/rope/hidden/vocab dims it shares with the
    target (``text``: the target's ``TextConfig``, or the draft's params where they restate it)."""

    text: TextConfig
    num_layers: int = 2
    intermediate_size: int = 12288
    target_hidden: TargetHidden = "normed"

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ConfigError(f"config field 'num_layers' (draft): must be positive, got {self.num_layers}")
        if self.intermediate_size <= 0:
            raise ConfigError(
                f"config field 'intermediate_size' (draft): must be positive, got {self.intermediate_size}"
            )
        if self.target_hidden not in ("normed", "prenorm"):
            raise ConfigError(f"config field 'target_hidden' (draft): 'normed' or 'prenorm', got {self.target_hidden}")

    @classmethod
    def from_target(
        cls, target: TextConfig, num_layers: int = 2, intermediate_size: int = 12288, **fields
    ) -> EagleConfig:
        """The draft config for ``target``: the draft's own fields, every shared dim from the target.
        ``fields`` may also carry ``target_hidden`` or TextConfig fields the draft restates differently
        (e.g. ``rms_norm_eps``)."""
        own = {k: fields.pop(k) for k in ("target_hidden",) if k in fields}
        text = replace(target, **fields) if fields else target
        return cls(text=text, num_layers=num_layers, intermediate_size=intermediate_size, **own)

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def latent_dim(self) -> int:
        """Values cached per token per draft layer (the same as one target layer)."""
        return self.text.latent_dim


class EagleLayer(nn.Module):
    """One draft decoder layer: the target's MLA attention block with a dense SwiGLU MLP instead of the MoE."""

    def __init__(self, cfg: EagleConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        t = cfg.text
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = MLAttention(t, rotary)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = SwiGLU(t.hidden_size, cfg.intermediate_size)  # mlp.gate_up (w1 then w3 stacked), mlp.down (w2)

    def forward(self, x, positions, meta, kv_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleDraft(nn.Module):
    """The draft head. Parameter names (final; loaders and ``train-draft`` write against them):
    ``fc.weight`` [H, 2H]; ``layers.{i}.input_layernorm.weight``, ``layers.{i}.self_attn.{q_a_proj, q_a_layernorm,
    q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight`` (as in the target),
    ``layers.{i}.post_attention_layernorm.weight``, ``layers.{i}.mlp.gate_up.weight`` [2I, H] (gate rows first),
    ``layers.{i}.mlp.down.weight`` [H, I]; ``norm.weight``. Linear layers may carry FP8 ``weight_scale`` /
    ``input_scale`` like the target's."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.rotary = RotaryEmbedding(t.rope, t.qk_rope_head_dim)  # the target's rope: same positions, same tables
        self.fc = Linear(2 * t.hidden_size, t.hidden_size)
        self.layers = nn.ModuleList(EagleLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.requires_grad_(False)

    def set_attn_impl(self, impl: AttnImpl) -> None:
        for layer in self.layers:
            layer.self_attn.impl = impl

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        target_hidden: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [T, H] (the target's embedding of token t+1), target_hidden [T, H] (the target's, or the
        previous draft step's, hidden at t), positions [T] (t's position: vLLM's proposer keeps the target's
        positions and shifts only the tokens, so the draft's cache row at position t pairs token t+1 with hidden t)
        -> the draft's hidden [T, H], from which the target's lm_head predicts token t+2."""
        x = self.fc(torch.cat([inputs_embeds, target_hidden.to(inputs_embeds.dtype)], dim=-1))  # [T, 2H] -> [T, H]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta, None if kv_caches is None else kv_caches[i])
        return self.norm(x)
