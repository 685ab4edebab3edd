"""The engine with speculative decoding: greedy outputs are those of plain decoding (random draft: low acceptance;
forced drafts: high acceptance), batched, chunked, with prefix hits, preemption, n > 1, stops, logprobs and a
grammar; the cache after rejections holds what plain decoding holds; block-manager books balance every step."""

from __future__ import annotations

import pytest
import torch

from small4.engine.sampling_params import SamplingParams
from small4.weights.tiny import make_tiny

from .helpers import OracleDecoder, generate, load_target, make_llm, prompts, random_draft

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=11)


@pytest.fixture(scope="module")
def target(model_dir):
    return load_target(model_dir)


@pytest.fixture(scope="module")
def draft(target):
    return random_draft(target, seed=3)


@pytest.fixture(scope="module")
def plain(model_dir, target):
    return generate(make_llm(model_dir, target), prompts())


def test_random_draft_gives_plain_greedy_outputs_batched_and_alone(model_dir, target, draft, plain):
    llm = make_llm(model_dir, target, draft)
    assert generate(llm, prompts()) == plain
    stats = llm.engine.spec.stats
    assert stats.num_verifies > 0 and stats.num_drafts > 0
    alone = [generate(make_llm(model_dir, target, draft), [p])[0] for p in prompts()[:1]]
    assert alone == plain[:1]


@pytest.mark.parametrize("wrong", [4, 1000])
def test_forced_drafts_accept_long_runs_and_keep_outputs(model_dir, target, draft, plain, wrong):
    truth = {tuple(p): out for p, out in zip(prompts(), plain, strict=True)}
    llm = make_llm(model_dir, target, draft, num_speculative_tokens=4)
    llm.engine.spec = OracleDecoder(llm.engine.spec, truth, wrong)
    assert generate(llm, prompts()) == plain
    stats = llm.engine.spec.stats
    assert stats.acceptance_rate > (0.5 if wrong == 4 else 0.95)
    assert stats.mean_accepted_length > 2.5


def test_chunked_prefill_prefix_hits_and_preemption(model_dir, target, draft, plain):
    """A tiny token budget (chunked prompts, drafts trimmed to the budget), and a cache so small that
    requests are preempted and recomputed while they speculate."""
    truth = {tuple(p): out for p, out in zip(prompts(), plain, strict=True)}
    llm = make_llm(model_dir, target, draft, num_blocks=10, max_num_batched_tokens=16, max_num_seqs=4)
    llm.engine.spec = OracleDecoder(llm.engine.spec, truth, 3)
    assert generate(llm, prompts()) == plain
    assert llm.engine.num_preemptions > 0
    assert llm.engine.block_manager.prefix_cache_hits > 0


def test_n_stop_strings_max_tokens_and_logprobs(model_dir, target, draft, plain):
    truth = {tuple(p): out for p, out in zip(prompts(), plain, strict=True)}
    base = make_llm(model_dir, target)
    stop_text = base.tokenizer.decode(plain[0][5:7])
    params = SamplingParams(
        temperature=0.0, max_tokens=11, n=2, stop=(stop_text,), stop_token_ids=(plain[1][6],), logprobs=2
    )
    ref = base.generate(prompts(), params)
    llm = make_llm(model_dir, target, draft)
    llm.engine.spec = OracleDecoder(llm.engine.spec, truth, 5)
    got = llm.generate(prompts(), params)
    assert llm.engine.spec.stats.num_accepted > 0
    for a, b in zip(ref, got, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (
                y.token_ids,
                y.text,
                y.finish_reason,
                y.stop_reason,
            )
            assert [lp.token_id for lp in x.logprobs] == [lp.token_id for lp in y.logprobs]
            for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
                assert lx.logprob == pytest.approx(ly.logprob, abs=1e-4)
                assert [t for t, _ in lx.top] == [t for t, _ in ly.top]
    assert any(o.finish_reason == "stop" for r in got for o in r.outputs)


def test_rejected_slots_leave_the_cache_as_plain_decoding_does(model_dir, target, draft):
    """After a verify that rejected drafts, every accepted position's latent rows equal plain decoding's, for the
    target's layers, and the next step's logits do too."""
    p = prompts()[1]
    spec = make_llm(model_dir, target, draft).engine
    ref = make_llm(model_dir, target).engine
    spec.add_request("a", p, GREEDY)
    ref.add_request("a", p, GREEDY)
    while spec.spec.stats.num_verifies < 3:
        spec.step()
    req = spec.sequences["a"].request
    assert spec.spec.stats.num_drafts > spec.spec.stats.num_accepted  # some drafts were rejected
    while ref.sequences["a"].request.num_computed_tokens < req.num_computed_tokens:
        ref.step()
    rref = ref.sequences["a"].request
    n = req.num_computed_tokens
    assert rref.output_token_ids[: req.num_output_tokens] == req.output_token_ids
    for layer in range(len(spec.runner.kv_caches)):
        rows = [
            spec.runner.kv_caches[layer].view(-1, spec.runner.kv_caches[layer].shape[-1])[spec.runner.slot(req, i)]
            for i in range(n)
        ]
        rows_ref = [
            ref.runner.kv_caches[layer].view(-1, ref.runner.kv_caches[layer].shape[-1])[ref.runner.slot(rref, i)]
            for i in range(n)
        ]
        torch.testing.assert_close(torch.stack(rows), torch.stack(rows_ref), atol=1e-5, rtol=1e-4)


def test_per_request_switch_rows_with_and_without_speculation_share_a_step(model_dir, target, draft, plain):
    llm = make_llm(model_dir, target, draft)
    ps = prompts()
    engine = llm.engine
    for i, p in enumerate(ps):
        engine.add_request(
            f"r{i}", p, GREEDY if i % 2 else SamplingParams(temperature=0.0, max_tokens=10, speculative=False)
        )
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.request_id in ("r0", "r2"):
                assert len(o.new_token_ids) <= 1
    assert [out[f"r{i}"] for i in range(len(ps))] == plain
    assert engine.spec.stats.num_verifies > 0


def test_async_scheduling_falls_back_to_the_synchronous_step_with_a_draft(model_dir, target, draft, plain):
    """Drafts are proposed from the verified tokens on the host, so an engine with a draft never overlaps its steps
    (engine/overlap.py); the outputs stay plain greedy's."""
    llm = make_llm(model_dir, target, draft, async_scheduling=True)
    assert generate(llm, prompts()) == plain
    assert llm.engine.num_overlapped_steps == 0 and llm.engine.spec.stats.num_verifies > 0
