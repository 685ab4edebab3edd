"""small4's decoder against transformers' Mistral3ForConditionalGeneration on the same random weights.

Covers both layouts and the release's (both file sets in one directory), BF16, FP8, block-scaled FP8 and NVFP4
files, q_lora_rank set and null, YaRN mscale on and off, prompts that cross the YaRN/llama-4 base length (32 tokens
in the tiny configs), expanded vs absorbed attention, and 32-step greedy continuations through the paged cache.

The softmax scale: small4 multiplies it by YaRN's mscale^2 only when params.json says yarn.apply_scale true (or
--attention-scale-mscale on); transformers 5.23 does whenever mscale_all_dim is set. Where small4 uses the plain
scale and the reference config has mscale_all_dim, the reference's attention is set to the plain scale
(``plain_softmax_scale``); the cases where small4 applies mscale^2 ("apply-scale", "forced-on", the NVFP4 case
whose params.json says apply_scale true) run against the reference as transformers builds it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import (
    PagedGreedy,
    dequantize_for_reference,
    dequantize_nvfp4_for_reference,
    hf_config_of,
    native_text_to_hf,
    plain_softmax_scale,
    read_checkpoint,
    reference_model,
    release_hf_to_current,
)
from small4.model.context import AttentionMetadata
from small4.weights.loader import load_model
from small4.weights.tiny import TinySpec, hf_config, make_tiny
from small4.weights.tiny_quant import TINY_FP8_BLOCK
from small4.weights.tiny_release import RELEASE_SPEC

# name: (layout, quant, spec, small4's --attention-scale-mscale, whether small4 then applies YaRN's mscale^2)
CASES = {
    "hf-bf16-mscale": ("hf", "none", TinySpec(), "auto", False),
    "hf-bf16-mscale-forced-on": ("hf", "none", TinySpec(), "on", True),
    "hf-bf16-no-qlora-no-mscale": ("hf", "none", TinySpec(q_lora_rank=None, yarn_mscale=False), "auto", False),
    "hf-fp8": ("hf", "fp8", TinySpec(), "auto", False),
    "hf-fp8-block": ("hf", "fp8-block", TinySpec(), "auto", False),
    "mistral-bf16-apply-scale": ("mistral", "none", TinySpec(), "auto", True),
    "mistral-bf16-no-apply-scale": ("mistral", "none", TinySpec(yarn_mscale=False), "auto", False),
    "mistral-fp8-no-qlora": ("mistral", "fp8", TinySpec(q_lora_rank=None, yarn_mscale=False), "auto", False),
    "mistral-nvfp4-apply-scale": ("mistral", "nvfp4", TinySpec(), "auto", True),
    "release-fp8-both-files": ("release", "fp8", RELEASE_SPEC, "auto", False),
}
PROMPT_LEN = 80  # crosses the 32-token YaRN / llama-4 base length twice


def _reference_state_dict(model_dir, layout: str, quant: str, spec: TinySpec) -> dict[str, torch.Tensor]:
    if layout == "release":  # the HF file set alone, read independently of small4's name mapping
        sd = dequantize_for_reference(read_checkpoint(model_dir, "model-*.safetensors"))
        return release_hf_to_current(sd)
    if quant == "nvfp4":
        sd = dequantize_nvfp4_for_reference(read_checkpoint(model_dir))
    else:
        sd = dequantize_for_reference(read_checkpoint(model_dir), TINY_FP8_BLOCK if quant == "fp8-block" else None)
    return native_text_to_hf(sd, spec.num_layers, spec.num_experts) if layout == "mistral" else sd


def _reference_for(model_dir, layout: str, quant: str, spec: TinySpec):
    if layout == "hf" and quant == "none":
        from transformers import Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd = _reference_state_dict(model_dir, layout, quant, spec)
    cfg = hf_config(spec, fp8=False) if layout == "mistral" else hf_config_of(model_dir)
    return reference_model(
        cfg,
        {k: v for k, v in sd.items() if not k.startswith("model.vision") and not k.startswith("model.multi_modal")},
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    layout, quant, spec, mode, mscale = CASES[request.param]
    model_dir = make_tiny(tmp_path_factory.mktemp(request.param), layout=layout, quant=quant, seed=7, spec=spec)
    ours = load_model(model_dir, dtype=torch.float32, progress=False, attention_scale_mscale=mode)
    assert ours.config.text.yarn_softmax_mscale is mscale
    ref = _reference_for(model_dir, layout, quant, spec)
    if not mscale:
        plain_softmax_scale(ref)
    return ours, ref, spec


def _prompt(spec: TinySpec, n: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(1000, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), AttentionMetadata.for_prefill([len(ids)]))
    return model.compute_logits(hidden)


@torch.no_grad()
def test_prefill_logits_match_reference(case):
    ours, ref, spec = case
    ids = _prompt(spec)
    expected = ref(input_ids=ids[None]).logits[0].float()
    for impl in ("auto", "absorb", "naive"):
        ours.set_attn_impl(impl)
        got = _our_logits(ours, ids)
        assert (got - expected).abs().max().item() <= 1e-4, impl
    ours.set_attn_impl("auto")


@torch.no_grad()
def test_greedy_continuation_matches_reference(case, paged_greedy):
    ours, ref, spec = case
    ids = _prompt(spec, 40, seed=2)
    expected = ref.generate(ids[None], max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 40:].tolist()
    for impl in ("auto", "absorb", "naive"):  # auto: 7-token chunks expanded, decodes absorbed
        ours.set_attn_impl(impl)
        assert paged_greedy(ours).generate(ids.tolist(), 32) == expected, impl
    ours.set_attn_impl("auto")


@torch.no_grad()
def test_batched_flat_prefill_equals_single_sequences(case):
    """Several sequences in one flat batch give the same logits as each alone (no cross-sequence leakage)."""
    ours, _, spec = case
    prompts = [_prompt(spec, n, seed=n) for n in (5, 33, 70)]
    flat = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    batched = ours.compute_logits(ours(flat, positions, AttentionMetadata.for_prefill([len(p) for p in prompts])))
    alone = torch.cat([_our_logits(ours, p) for p in prompts])
    assert (batched - alone).abs().max().item() <= 1e-5


def test_hf_mscale_all_dim_zero_scales_cos_sin(tmp_path):
    """HF reading with mscale_all_dim 0 and no attention_factor: cos/sin carry yarn_mscale(factor)."""
    model_dir = make_tiny(tmp_path, layout="hf", seed=3, spec=replace(TinySpec(), yarn_mscale=False))
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["text_config"]["rope_parameters"]["attention_factor"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ours = load_model(model_dir, dtype=torch.float32, progress=False)
    assert ours.rotary.factor == pytest.approx(0.1 * torch.log(torch.tensor(128.0)).item() + 1)
    from transformers import Mistral3ForConditionalGeneration

    ref = Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _prompt(TinySpec())
    with torch.no_grad():
        diff = (_our_logits(ours, ids) - ref(input_ids=ids[None]).logits[0]).abs().max().item()
    assert diff <= 1e-4


@torch.no_grad()
def test_shipped_demo_checkpoint_matches_reference():
    """The trained embedded model (real HF layout, bf16 files) gives transformers' logits and greedy tokens on a
    rendered chat prompt with tools: training did not leave the architecture the reference implements."""
    from transformers import Mistral3ForConditionalGeneration

    from small4.demo_model.curriculum import TOOLS
    from small4.demo_model.train import load_renderer
    from small4.weights.embedded import SHIPPED_DEMO_DIR

    ours = load_model(SHIPPED_DEMO_DIR, dtype=torch.float32, progress=False)
    ref = Mistral3ForConditionalGeneration.from_pretrained(SHIPPED_DEMO_DIR, dtype=torch.float32).eval()
    if not ours.config.text.yarn_softmax_mscale:  # the v2 model's config has mscale_all_dim (see the module doc)
        plain_softmax_scale(ref)
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    ids = torch.tensor(load_renderer(SHIPPED_DEMO_DIR).render(messages, tools=TOOLS).token_ids)
    expected = ref(input_ids=ids[None]).logits[0].float()
    assert (_our_logits(ours, ids) - expected).abs().max().item() <= 1e-4
    want = ref.generate(ids[None], max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    got = PagedGreedy(ours).generate(ids.tolist(), len(want))
    assert got == want and len(want) > 3  # the tool call, e.g. [TOOL_CALLS]get_weather[ARGS]{"city": ...
