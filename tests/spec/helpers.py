"""Engines with and without an in-process EAGLE draft over a tiny checkpoint, for the speculative tests."""

from __future__ import annotations

import torch

from small4.config import EngineConfig
from small4.engine.engine import LLM, Engine
from small4.engine.model_runner import ModelRunner
from small4.spec.eagle import EagleConfig, EagleDraft
from small4.tokenizer import Tokenizer
from small4.weights.loader import load_model


def random_draft(target, seed: int = 0, layers: int = 1, scale: float = 0.3) -> EagleDraft:
    """A draft of the target's shapes with random weights (it rarely agrees with the target)."""
    cfg = EagleConfig.from_target(target.config.text, num_layers=layers, intermediate_size=64)
    draft = EagleDraft(cfg).to(target.embed_tokens.weight.dtype)
    g = torch.Generator().manual_seed(seed)
    for p in draft.parameters():
        fan_in = p.shape[-1] if p.dim() == 2 else 1
        val = torch.randn(p.shape, generator=g) * (scale / fan_in**0.5 if p.dim() == 2 else 0.1) + (p.dim() == 1)
        p.copy_(val)
    return draft


def load_target(model_dir):
    return load_model(model_dir, dtype=torch.float32, device="cpu", progress=False)


def make_llm(model_dir, target=None, draft=None, num_blocks: int | None = None, **cfg) -> LLM:
    """An ``LLM`` over ``target`` (loaded from ``model_dir`` if None) with ``draft`` attached (None: plain)."""
    target = target if target is not None else load_target(model_dir)
    cfg.setdefault("block_size", 4)
    cfg.setdefault("device", "cpu")
    cfg.setdefault("dtype", "float32")
    if draft is not None:
        cfg.setdefault("num_speculative_tokens", 3)
    engine_cfg = EngineConfig(**cfg)
    runner = ModelRunner.from_model(target, engine_cfg, num_blocks=num_blocks, draft=draft)
    return LLM.from_engine(Engine.from_runner(runner, Tokenizer.from_file(model_dir)))
