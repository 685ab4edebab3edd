"""The Mistral Small 4 decoder: embeddings, 36 (MLA + MoE) layers, final norm, untied lm_head; plus the
vision tower (``self.vision``) when the config has one, and ``embed`` to merge image embeddings into the tokens.

``forward`` works on one flat batch of tokens (many sequences, mixed prefill chunks and decodes) described by an
``AttentionMetadata``; the runner owns the latent caches and passes one tensor per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from small4.config import ModelConfig, TextConfig
from small4.kernels.backend import Backend
from small4.kernels.registry import apply_backend
from small4.model.attention import AttnImpl, MLAttention
from small4.model.context import AttentionMetadata
from small4.model.layers import RMSNorm, RotaryEmbedding
from small4.model.moe import MoE
from small4.model.vision import VisionTower


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, x, positions, meta, kv_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Mistral4Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = config.text
        self.config = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # the projector norm takes the text model's eps, as in transformers' Mistral3MultiModalProjector
        self.vision = VisionTower(config.vision, cfg.hidden_size, cfg.rms_norm_eps) if config.vision else None
        self.requires_grad_(False)

    def set_attn_impl(self, impl: AttnImpl) -> None:
        for layer in self.layers:
            layer.self_attn.impl = impl

    def set_backend(self, backend: Backend) -> None:
        """Chooses the kernels once, for the device the model now lives on (``kernels.backend.kernel_backend``):
        every module that calls a kernel keeps the same ``KernelOps``, so no forward decides it again."""
        apply_backend(self, backend)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [T] -> embeddings [T, hidden], with rows ``image_positions`` [N] (indices into the flat
        batch, the ``[IMG]`` slots) replaced by ``image_embeds`` [N, hidden] (from ``self.vision``)."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        if image_embeds is None and image_positions is None:
            return x
        if image_embeds is None or image_positions is None or image_embeds.shape[0] != image_positions.shape[0]:
            raise ValueError("image_embeds and image_positions must be given together, one row per position")
        return x.index_copy(0, image_positions.to(device=x.device, dtype=torch.long), image_embeds.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids / positions [T] -> final-normed hidden states [T, hidden]."""
        return self.norm(self.forward_prenorm(input_ids, positions, meta, kv_caches, inputs_embeds))

    def forward_prenorm(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's output before the final norm [T, hidden] (what an EAGLE draft trained on pre-norm
        states takes; ``forward`` is ``norm`` of this)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta, None if kv_caches is None else kv_caches[i])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
