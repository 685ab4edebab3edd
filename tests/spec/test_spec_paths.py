"""Speculative decoding beyond greedy text: sampled tokens distributed as plain sampling's (chi-square over seeded
draws), a grammar-constrained request, image prompts, and the embedded demo model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest, ResponseFormat

from small4.chat.grammar import GrammarCompiler
from small4.engine.multimodal import ImageInput
from small4.engine.sampling_params import SamplingParams
from small4.engine.token_mask import token_mask_provider
from small4.weights.tiny import make_tiny

from .helpers import OracleDecoder, generate, load_target, make_llm, prompts, random_draft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=11)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z = 3.09), Wilson-Hilferty: within a few percent for df >= 3."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_tokens_follow_plain_sampling(model_dir):
    """With temperature and top-k, the first three tokens' distributions with speculation (random draft: mostly
    rejections and residual draws) match plain sampling's, over 768 seeded sequences each (two-sample chi-square)."""
    target = load_target(model_dir)
    draft = random_draft(target, seed=5, scale=1.0)
    prompt = prompts(1)[0]

    def draws(llm) -> list[list[int]]:
        ps = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=16, seed=1000 * i) for i in range(48)]
        return [o.token_ids for r in llm.generate([prompt] * len(ps), ps) for o in r.outputs]

    plain = draws(make_llm(model_dir, target, max_num_seqs=256, num_blocks=2000))
    llm = make_llm(model_dir, target, draft, max_num_seqs=256, num_blocks=2000, num_speculative_tokens=2)
    spec = draws(llm)
    assert llm.engine.spec.stats.num_verifies > 0
    for pos in range(3):
        a, b = Counter(t[pos] for t in plain), Counter(t[pos] for t in spec)
        keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
        rare = sum(a[k] + b[k] for k in set(a) | set(b) if k not in keys)
        stat = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in keys)
        df = len(keys) - 1 + (rare > 0)
        assert len(keys) >= 3, pos
        assert stat < chi_square_critical(max(df, 3)), (pos, stat, df)
    # seeded: the same requests again give the same tokens
    again = make_llm(model_dir, target, draft, max_num_seqs=256, num_blocks=2000, num_speculative_tokens=2)
    assert draws(again) == spec


def test_grammar_constrained_greedy_output_is_plain(model_dir):
    """A JSON-object grammar with speculation forced on: drafts are checked under the matcher's masks (the
    matcher rolled back over rejected ones) and the output equals plain constrained decoding."""
    target = load_target(model_dir)
    base = make_llm(model_dir, target)
    compiler = GrammarCompiler(base.tokenizer.mistral)
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "json please"}],
        response_format=ResponseFormat(type="json_object"),
    )
    prompt = base.tokenizer.mistral.encode_chat_completion(request).tokens
    vocab = target.config.text.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=24)

    def run(llm) -> list[int]:
        factory = lambda: token_mask_provider(compiler.matcher_for(request), vocab)  # noqa: E731
        llm.engine.add_request("g", prompt, params, token_mask_factory=factory)
        out: list[int] = []
        while llm.engine.has_unfinished():
            for o in llm.engine.step():
                out += o.new_token_ids
        return out

    plain = run(base)
    llm = make_llm(model_dir, target, random_draft(target, seed=3))
    llm.engine.spec = OracleDecoder(llm.engine.spec, {tuple(prompt): plain}, 3)
    assert run(llm) == plain
    assert llm.engine.spec.stats.num_accepted > 0
    assert llm.engine.spec.stats.num_drafts > llm.engine.spec.stats.num_accepted


@pytest.mark.parametrize("which", ["shipped", "random"])
def test_demo_model_greedy_outputs_are_plain(which):
    """The embedded demo model with its shipped draft (high acceptance) and with a random one (none), batched."""
    from small4.demo_model.train_draft import DEFAULT_OUT, curriculum_prompts, held_out_seed
    from small4.spec.loading import load_draft
    from small4.weights.embedded import embedded_model_dir

    demo = embedded_model_dir()
    target = load_target(demo)
    ps = curriculum_prompts(demo, held_out_seed(0), 4)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = generate(make_llm(demo, target), ps, params)
    draft = load_draft(DEFAULT_OUT, target) if which == "shipped" else random_draft(target, seed=1)
    llm = make_llm(demo, target, draft)
    assert generate(llm, ps, params) == plain
    stats = llm.engine.spec.stats
    assert stats.num_verifies > 0
    if which == "shipped":
        assert stats.acceptance_rate > 0.5 and stats.mean_accepted_length > 2.5


@pytest.mark.parametrize("budget", [7, 4096])
def test_image_prompt_greedy_output_is_plain(model_dir, budget):
    """Images in the prompt (the draft embeds [IMG] rows with the image embeddings too), chunk boundaries inside
    the image with a small budget, and a second request hitting the image's prefix blocks."""
    target = load_target(model_dir)
    vision = target.config.vision
    pixels = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(0))
    prompt = [1, 3, 1200] + [vision.image_token_id] * vision.tokens_per_image(56, 56) + [13, 1300, 4]
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def run(llm) -> list[list[int]]:
        outs = []
        for rid in ("a", "b"):
            llm.engine.add_request(rid, prompt, params, images=[ImageInput(pixels, b"img")])
            tokens = []
            while llm.engine.has_unfinished():
                for o in llm.engine.step():
                    tokens += o.new_token_ids
            outs.append(tokens)
        return outs

    plain = run(make_llm(model_dir, target, max_num_batched_tokens=budget, max_num_seqs=4))
    llm = make_llm(model_dir, target, random_draft(target, seed=3), max_num_batched_tokens=budget, max_num_seqs=4)
    llm.engine.spec = OracleDecoder(llm.engine.spec, {tuple(prompt): plain[0]}, 3)
    assert run(llm) == plain and plain[0] == plain[1]
    assert llm.engine.spec.stats.num_accepted > 0
    assert llm.engine.block_manager.prefix_cache_hits > 0
