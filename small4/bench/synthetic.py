"""A random-weight Mistral4Model built directly on the device, and a ModelRunner around it, for benchmarks.

A real checkpoint is 119B parameters; to measure the engine at the real shapes without one, the model is built
on the meta device, allocated on the target device (``to_empty``) and filled in place with random values drawn
there: BF16 everywhere, or (``fp8``) FP8 e4m3 attention and expert matrices with per-tensor / per-expert scales,
exactly the layout ``WeightLoader(keep_fp8=True)`` produces; lm_head, embeddings, router and norms stay BF16.
``num_layers`` keeps only the first L decoder layers (everything per layer is identical, so times scale).

The shapes come as a ``TinySpec`` (the tiny checkpoints' shape record), so the same spec also yields the
transformers config for a side-by-side run on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch

from small4.config import ModelConfig, QuantConfig, TextConfig, parse_hf_config
from small4.kernels.backend import kernel_backend
from small4.kernels.fp8 import FP8_DTYPE, FP8_MAX
from small4.model.layers import Linear
from small4.model.mistral4 import Mistral4Model
from small4.model.moe import RoutedExperts
from small4.weights.tiny import TinySpec, hf_config

WeightDtype = Literal["bf16", "fp8"]
# random normal values reach about 5 sigma; mapping 6 sigma to the e4m3 maximum keeps them all representable
_FP8_SIGMAS = 6.0


def spec_from_text(text: TextConfig) -> TinySpec:
    """The TinySpec with the shapes of ``text`` (by default the real Mistral Small 4 decoder)."""
    return TinySpec(
        num_bpe_ranks=text.vocab_size - 1000,
        hidden_size=text.hidden_size,
        num_layers=text.num_layers,
        num_heads=text.num_heads,
        q_lora_rank=text.q_lora_rank,
        kv_lora_rank=text.kv_lora_rank,
        qk_nope_head_dim=text.qk_nope_head_dim,
        qk_rope_head_dim=text.qk_rope_head_dim,
        v_head_dim=text.v_head_dim,
        num_experts=text.num_experts,
        num_experts_per_tok=text.num_experts_per_tok,
        moe_intermediate_size=text.moe_intermediate_size,
        num_shared_experts=text.num_shared_experts,
        yarn_factor=text.rope.factor,
        yarn_original_max=text.rope.original_max_position_embeddings,
        llama4_beta=text.rope.llama4_beta,
    )


FULL_SPEC = spec_from_text(TextConfig())
# a bench-sized tiny model: one vocabulary row per tekken id of the tiny tokenizer, shapes as TinySpec's default
TINY_BENCH_SPEC = TinySpec()


def model_config(spec: TinySpec, num_layers: int | None = None, weights: WeightDtype = "bf16") -> ModelConfig:
    """Text-only ModelConfig for ``spec`` (optionally only ``num_layers`` layers), parsed as a checkpoint would be."""
    if num_layers is not None:
        spec = replace(spec, num_layers=num_layers)
    config = parse_hf_config(hf_config(spec, fp8=weights == "fp8"))
    quant = QuantConfig(method="fp8") if weights == "fp8" else QuantConfig()
    return replace(config, vision=None, quant=quant)


@torch.no_grad()
def _fill_fp8(param: torch.Tensor, g: torch.Generator) -> None:
    """Random e4m3 values ~ N(0, (FP8_MAX / 6)^2) written in place, drawn on the device a slice at a time."""
    rows = param.view(-1, param.shape[-1])
    step = max(1, (1 << 26) // rows.shape[-1])  # 64M elements of float32 scratch at most
    for i in range(0, rows.shape[0], step):
        chunk = torch.randn(min(step, rows.shape[0] - i), rows.shape[-1], device=param.device, generator=g)
        rows[i : i + step] = (chunk * (FP8_MAX / _FP8_SIGMAS)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _fp8_scale(fan_in: int) -> float:
    """Multiplier that maps the stored values back to N(0, 1/fan_in)."""
    return _FP8_SIGMAS / FP8_MAX / fan_in**0.5


@torch.no_grad()
def _fill_dense(param: torch.Tensor, fan_in: int | None, g: torch.Generator) -> None:
    flat = param.view(-1, param.shape[-1]) if param.dim() > 1 else param.view(1, -1)
    step = max(1, (1 << 26) // flat.shape[-1])
    for i in range(0, flat.shape[0], step):
        chunk = torch.randn(min(step, flat.shape[0] - i), flat.shape[-1], device=param.device, generator=g)
        flat[i : i + step] = chunk / fan_in**0.5 if fan_in else chunk


@torch.no_grad()
def build_random_model(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    weights: WeightDtype = "bf16",
    seed: int = 0,
    transform: Callable[[Mistral4Model], object] | None = None,
) -> Mistral4Model:
    """A Mistral4Model with random weights generated on ``device``: every parameter is allocated once, in its
    final dtype (FP8 ones never exist in BF16 or float32 first, so the full FP8 model fits where it will run).
    ``transform`` reshapes the meta model first (``parallel.tp.parallelize``: one rank's shard)."""
    device = torch.device(device)
    fp8 = weights == "fp8"
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the meta parameters (and hence to_empty) take the model dtype directly
    try:
        with torch.device("meta"):
            model = Mistral4Model(config)
            if transform is not None:
                transform(model)
    finally:
        torch.set_default_dtype(old_default)
    quantized = []  # (module, attribute, fan_in, scale shape)
    if fp8:
        for name, module in model.named_modules():
            if isinstance(module, Linear) and not name.startswith("vision"):
                quantized.append((module, "weight", module.in_features, ()))
            elif isinstance(module, RoutedExperts):
                E, _, hidden = module.w13.shape
                quantized.append((module, "w13", hidden, (E, 2, 1)))
                quantized.append((module, "w2", module.w2.shape[-1], (E, 1, 1)))
        for module, attr, _, _ in quantized:
            meta = getattr(module, attr)
            setattr(module, attr, torch.nn.Parameter(torch.empty_like(meta, dtype=FP8_DTYPE), requires_grad=False))
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for module, attr, fan_in, scale_shape in quantized:
        param = getattr(module, attr)
        _fill_fp8(param, g)
        scale_name = "weight_scale" if attr == "weight" else f"{attr}_scale"
        setattr(module, scale_name, torch.full(scale_shape, _fp8_scale(fan_in), dtype=torch.float32, device=device))
    for name, param in model.named_parameters():
        if param.dtype == FP8_DTYPE:
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, device=device, generator=g))
        elif name == "embed_tokens.weight":
            _fill_dense(param, None, g)
        else:
            _fill_dense(param, param.shape[-1], g)
    # RotaryEmbedding.inv_freq is a plain CPU tensor (not a buffer), so meta construction left it intact
    model.set_backend(kernel_backend(device))
    return model.eval()
