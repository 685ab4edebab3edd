"""The engine end to end on a tiny checkpoint: greedy outputs do not depend on how requests are batched,
chunked, cached or preempted, and equal transformers' greedy generate; sampling, stops and logprobs are right."""

from __future__ import annotations

import math

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.engine import LLM
from small4.engine.sampling_params import SamplingParams
from small4.model.context import AttentionMetadata
from small4.weights.tiny import make_tiny

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=11)


def _prompts(n: int = 17) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(1000, 3000, (24,), generator=g).tolist()
    prompts = []
    for i in range(n):
        own = torch.randint(1000, 3000, (3 + 7 * i % 45,), generator=g).tolist()
        prompts.append(shared + own if i % 3 == 0 else own)  # every third prompt shares a 24-token prefix
    return prompts


def _run(model_dir, prompts, params=GREEDY, **cfg) -> list[list[int]]:
    llm = LLM(model_dir, EngineConfig(block_size=4, **cfg))
    results = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module")
def alone(model_dir):
    return [_run(model_dir, [p])[0] for p in _prompts()]


def test_batch_of_17_equals_each_alone(model_dir, alone):
    assert _run(model_dir, _prompts()) == alone


@pytest.mark.parametrize("budget", [16, 37, 4096])
def test_chunked_prefill_sizes_do_not_change_outputs(model_dir, alone, budget):
    assert _run(model_dir, _prompts(), max_num_batched_tokens=budget, max_num_seqs=16) == alone


def test_prefix_caching_off_equals_on(model_dir, alone):
    assert _run(model_dir, _prompts(), enable_prefix_caching=False) == alone


def test_prefix_cache_is_reused(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4))
    prompt = _prompts()[0]
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 4 * ((len(prompt) - 1) // 4)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_under_a_tiny_cache_keeps_outputs(model_dir, alone):
    prompts = _prompts()
    llm = LLM(model_dir, EngineConfig(block_size=4, max_num_seqs=16))
    per_block = llm.engine.runner.bytes_per_block
    llm = LLM(model_dir, EngineConfig(block_size=4, max_num_seqs=16, kv_cache_memory=40 * per_block))
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)]
    assert llm.engine.num_preemptions > 0
    assert got == alone
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_equals_transformers_greedy_generate(model_dir, alone):
    from transformers import Mistral3ForConditionalGeneration

    ref = Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    # config.json only: small4 uses the plain softmax scale where transformers multiplies by YaRN's mscale^2 (README)
    for layer in ref.model.language_model.layers:
        layer.self_attn.scaling = layer.self_attn.qk_head_dim**-0.5
    for prompt, ours in list(zip(_prompts(), alone, strict=True))[:6]:
        ids = torch.tensor([prompt])
        expected = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(prompt) :]
        assert ours == expected.tolist()


def test_seeded_sampling_reproducible_across_batches(model_dir):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10)
    prompts = _prompts(6)
    alone = _run(model_dir, [prompts[2]], params)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=7), GREEDY, SamplingParams(temperature=0.5, seed=9)]
    mixed = [others[0], others[1], params, others[2], others[0], GREEDY]
    llm = LLM(model_dir, EngineConfig(block_size=4))
    batched = llm.generate(prompts, mixed)[2].outputs[0].token_ids
    assert batched == alone
    assert (
        _run(model_dir, [prompts[2]], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=10))[0]
        != alone
    )


def test_n_sequences(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4))
    prompt = _prompts()[1]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, n=3, max_tokens=8))[0].outputs
    assert [o.index for o in greedy] == [0, 1, 2]
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids
    sampled = llm.generate([prompt], SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=8))[0].outputs
    assert sampled[0].token_ids != sampled[1].token_ids


def test_stop_string_is_never_emitted(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4))
    prompt = _prompts()[4]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4))
    prompt = _prompts()[7]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids
    stop_id = full[1]
    first_at = full.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full[: first_at + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id], min_tokens=6)
    out = llm.generate([prompt], params)[0].outputs[0]
    # while fewer than min_tokens are out the stop id is banned (so the text may differ from the free run)
    assert len(out.token_ids) >= 6 and stop_id not in out.token_ids[:6]
    assert out.token_ids[:first_at] == full[:first_at]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop_id and stop_id not in out.token_ids[:-1]
    else:
        assert len(out.token_ids) == 12 and stop_id not in out.token_ids


def test_logprobs_match_a_rescoring_prefill(model_dir):
    """Decode-time logprobs equal those of one prefill over prompt + output (cache path vs no-cache path)."""
    llm = LLM(model_dir, EngineConfig(block_size=4))
    prompt = _prompts()[3]
    out = llm.generate([prompt], SamplingParams(temperature=0.8, seed=2, max_tokens=10, logprobs=5))[0].outputs[0]
    model = llm.engine.runner.model
    ids = torch.tensor(prompt + out.token_ids)
    with torch.no_grad():
        hidden = model(ids, torch.arange(len(ids)), AttentionMetadata.for_prefill([len(ids)]))
        ref = torch.log_softmax(model.compute_logits(hidden), dim=-1)[len(prompt) - 1 : -1]
    assert len(out.logprobs) == 10
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step]
        assert math.isclose(lp.logprob, ref[step, lp.token_id].item(), abs_tol=1e-4)
        top_ids = torch.topk(ref[step], 5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert lp.rank == int((ref[step] > ref[step, lp.token_id]).sum()) + 1


def test_abort_frees_blocks(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4))
    engine = llm.engine
    engine.add_request("a", _prompts()[5], SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("b", _prompts()[6], SamplingParams(temperature=0, max_tokens=50, n=2))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    outs = engine.abort_request("b") + engine.abort_request("a")
    assert {(o.request_id, o.index, o.finish_reason) for o in outs} == {
        ("a", 0, "abort"),
        ("b", 0, "abort"),
        ("b", 1, "abort"),
    }
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bad_requests_are_rejected(model_dir):
    llm = LLM(model_dir, EngineConfig(block_size=4, max_model_len=64))
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.add_request("x", [1, 10**6], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("y", [1000] * 65, GREEDY)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("z", [1000], SamplingParams(logit_bias={10**6: 1.0}))
    assert not engine.has_unfinished()


def _sampled(model_dir, seeds: list[int | None], **cfg) -> list[list[int]]:
    """One short sampled output per seed (None: unseeded), all in one batch of one engine."""
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in seeds]
    llm = LLM(model_dir, EngineConfig(block_size=4, **cfg))
    return [r.outputs[0].token_ids for r in llm.generate([[1000, 1001, 1002]] * len(seeds), params)]


def test_engine_seed_reproduces_unseeded_sampling_and_request_seeds_use_64_bits(model_dir):
    """Requests without a seed draw from the engine's generator: a restarted engine with the same seed samples the
    same tokens, another seed samples others. A request seed counts whole: torch's CPU generator alone keeps only
    the low 32 bits, so s and s + 2**32 would sample alike."""
    seeds = [None, None, 5, 5 + 2**32, 2**63 - 1, -(2**63)]
    first = _sampled(model_dir, seeds, seed=7)
    again = _sampled(model_dir, seeds, seed=7)
    other = _sampled(model_dir, [None, None, 5], seed=8)
    assert again == first
    assert other[:2] != first[:2] and other[2] == first[2]  # the engine seed is for unseeded requests only
    assert len({tuple(t) for t in first[2:]}) == 4


def test_constructors_take_built_parts_and_name_the_directory_path():
    """``Engine(runner, tokenizer)`` and ``ModelRunner(model, cfg)`` are the one construction path; a checkpoint
    directory is loaded by ``from_model_dir``, and passing one to the plain constructor says so."""
    from small4.engine import Engine
    from small4.engine.model_runner import ModelRunner

    with pytest.raises(TypeError, match="Engine.from_model_dir"):
        Engine("/some/checkpoint", None)
    with pytest.raises(TypeError, match="ModelRunner.from_model_dir"):
        ModelRunner("/some/checkpoint", EngineConfig())
