"""Speculative decoding (EAGLE draft) under TP=2, EP=2 and TP=2+EP against one process: the same greedy tokens as
the one-process speculative run and as plain greedy decoding, with drafts accepted. The shipped demo model and its
trained draft give real acceptance; a tiny random target with a tiny random draft (``make_tiny_draft``) covers the
draft's files and layouts. A batch of chat prompts of different lengths and budgets, one of them stopped by a stop
token. Verify steps run eagerly and (on gloo, the static-buffer path) through the decode-graph protocol. Ranks
started for a different draft, or for another number of drafts per step, are refused by name.

This test process is rank 0; one worker subprocess is rank 1 (gloo on CPU, NCCL with SMALL4_TEST_DEVICE=cuda on
two GPUs). One session serves the loads of the module.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from small4.chat.render import ChatRenderer
from small4.config import EngineConfig
from small4.engine.engine import Engine
from small4.engine.model_runner import ModelRunner
from small4.engine.sampling_params import SamplingParams
from small4.parallel.config import ParallelConfig
from small4.parallel.launch import ParallelSession
from small4.tokenizer import Tokenizer
from small4.weights.embedded import SHIPPED_DEMO_DIR, SHIPPED_DEMO_DRAFT_DIR
from small4.weights.tiny import make_tiny
from small4.weights.tiny_draft import make_tiny_draft

SPLITS = {"tp2": ParallelConfig(2, 1), "ep2": ParallelConfig(1, 2), "tp2+ep": ParallelConfig(2, 2)}
# (question, reasoning effort): answers of 25, 14, 40+ and 12 tokens from the demo model
QUESTIONS = [("hi", None), ("What is the capital of France?", None), ("Add 345 and 789.", "high")]
QUESTIONS += [("Count from one to ten.", None)]
BUDGETS = [24, 16, 30, 9]


def engine_config(device: torch.device, draft=None, **fields) -> EngineConfig:
    """The latency profile in float32 (one-process and split logits then agree to ~1e-6), small blocks so runs
    cross block boundaries, with ``draft`` (a directory) speculating 3 tokens per step."""
    fields = {"kv_cache_memory": 4 << 20, "block_size": 4, **fields}
    cfg = EngineConfig(profile="latency", dtype="float32", device=device.type, **fields)
    return cfg if draft is None else replace(cfg, speculative_model=str(draft), num_speculative_tokens=3)


@pytest.fixture(scope="module")
def session(device):
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (one NCCL rank each)")
    failures: list[str] = []
    s = ParallelSession(2, device=device.type, on_failure=failures.append, timeout_s=120)
    yield s
    s.close()
    assert not failures, failures
    assert [w.returncode for w in s.workers] == [0]  # told to stop, the worker left cleanly


@pytest.fixture(scope="module")
def chats() -> list[list[int]]:
    """Chat prompts rendered as the server renders them (what the demo model and its draft were trained on)."""
    renderer = ChatRenderer(MistralTokenizer.from_file(str(SHIPPED_DEMO_DIR / "tekken.json")))
    return [
        list(renderer.render([{"role": "user", "content": q}], reasoning_effort=effort).token_ids)
        for q, effort in QUESTIONS
    ]


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str]]:
    """Each request's tokens and finish reason."""
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return [(out[str(i)], reasons[str(i)]) for i in range(len(prompts))]


def greedy(budgets: list[int], stop_token: int | None = None) -> list[SamplingParams]:
    """Greedy params; the first request also stops at ``stop_token``."""
    params = [SamplingParams(temperature=0, max_tokens=n) for n in budgets]
    if stop_token is not None:
        params[0] = replace(params[0], stop_token_ids=(stop_token,))
    return params


@pytest.fixture(scope="module")
def demo_reference(device, chats):
    """Plain greedy and one-process speculative outputs of the demo model, a stop token inside request 0's run."""
    plain = Engine(ModelRunner.from_model_dir(SHIPPED_DEMO_DIR, engine_config(device)), demo_tokenizer())
    first = run(plain, chats, greedy(BUDGETS))
    stop = first[0][0][6]  # request 0 stops at its 7th token (or earlier, where that token came before)
    params = greedy(BUDGETS, stop)
    want = run(
        Engine(ModelRunner.from_model_dir(SHIPPED_DEMO_DIR, engine_config(device)), demo_tokenizer()), chats, params
    )
    spec_cfg = engine_config(device, SHIPPED_DEMO_DRAFT_DIR)
    single = Engine(ModelRunner.from_model_dir(SHIPPED_DEMO_DIR, spec_cfg), demo_tokenizer())
    assert run(single, chats, params) == want  # greedy speculation is lossless on one process
    assert single.spec.stats.num_accepted > 0
    return params, want, single.spec.stats


def demo_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(SHIPPED_DEMO_DIR)


def test_reference_batch_has_different_lengths_and_a_stop(demo_reference):
    _, want, _ = demo_reference
    lengths = [len(tokens) for tokens, _ in want]
    assert len(set(lengths)) > 2, lengths
    assert want[0][1] == "stop" and len(want[0][0]) <= 7, want[0]
    assert all(len(tokens) > 1 for tokens, _ in want), want


@pytest.mark.parametrize("split", list(SPLITS))
def test_split_speculation_gives_one_process_and_plain_greedy_tokens(session, device, chats, demo_reference, split):
    params, want, single_stats = demo_reference
    runner = session.load(SHIPPED_DEMO_DIR, engine_config(device, SHIPPED_DEMO_DRAFT_DIR), SPLITS[split])
    assert runner.draft is not None and runner.vocab_parallel == (SPLITS[split].tensor_parallel_size > 1)
    engine = Engine(runner, demo_tokenizer())
    assert run(engine, chats, params) == want
    stats = engine.spec.stats
    assert stats.num_verifies > 0 and stats.num_accepted > 0, stats
    if device.type == "cpu":  # the same drafts as on one process (measured here; CUDA's rounding may differ)
        assert (stats.num_drafts, stats.num_accepted) == (single_stats.num_drafts, single_stats.num_accepted), stats


def test_seeded_sampling_under_tp_follows_one_process(session, device, chats):
    """Sampled speculation (rejection sampling with each request's own generator) draws on rank 0 only: a seeded
    batch gives the one-process speculative tokens."""
    params = [SamplingParams(temperature=0.8, max_tokens=n, seed=7 + i) for i, n in enumerate(BUDGETS)]
    cfg = engine_config(device, SHIPPED_DEMO_DRAFT_DIR)
    single = Engine(ModelRunner.from_model_dir(SHIPPED_DEMO_DIR, cfg), demo_tokenizer())
    want = run(single, chats, params)
    engine = Engine(session.load(SHIPPED_DEMO_DIR, cfg, SPLITS["tp2"]), demo_tokenizer())
    assert run(engine, chats, params) == want
    assert engine.spec.stats.num_accepted > 0


def test_split_verify_steps_through_the_decode_graph_protocol(session, device, chats, demo_reference):
    """Plain decode steps of an engine with a draft replay the graphs (then the draft catches up), and verify steps
    go through "graph_step" as decode rows (on gloo: every rank replays its static buffers), every row scored on
    both ranks."""
    params, want, _ = demo_reference
    runner = session.load(SHIPPED_DEMO_DIR, engine_config(device, SHIPPED_DEMO_DRAFT_DIR), SPLITS["tp2"])
    engine = Engine(runner, demo_tokenizer())
    if device.type != "cuda":  # on CUDA the engine captured them already
        runner.prepare_decode_graphs(engine.max_model_len, 16 * 4, capture=False)
    plain = [replace(p, speculative=False) for p in params]  # plain decode steps first: no drafts at all
    assert run(engine, chats, plain) == want
    assert runner.decode_graphs.steps > 0 and runner.num_graph_verify_steps == 0
    assert engine.spec.stats.num_verifies == 0
    assert run(engine, chats, params) == want
    assert runner.num_graph_verify_steps > 0
    assert engine.spec.stats.num_accepted > 0


@pytest.mark.parametrize("layout,quant", [("release", "none"), ("hf", "fp8")])
def test_tiny_target_with_a_tiny_draft_chunked_and_preempted(session, device, tmp_path_factory, layout, quant):
    """A random tiny target and a random tiny draft (both layouts; FP8 dequantised as the target is) in a cache of
    8 blocks with 16-token steps: prompts are chunked and requests preempted while they speculate. Acceptance is
    luck here (near 0), the tokens are not."""
    root = tmp_path_factory.mktemp("tiny-spec")
    model_dir = make_tiny(root / "target", layout="hf", seed=5)
    draft_dir = make_tiny_draft(root / "draft", layout=layout, quant=quant, seed=2)
    tokenizer = Tokenizer.from_file(model_dir)
    prompts = [tokenizer.encode(t, bos=True) for t in ("the quick brown fox", "a b c d e f g h", "x")]
    params = greedy([12, 12, 12])
    small = {"kv_cache_memory": 8 * 2304, "max_num_batched_tokens": 16}  # 2304 B: one block, target + draft
    want = run(
        Engine(ModelRunner.from_model_dir(model_dir, engine_config(device, **small)), tokenizer), prompts, params
    )
    cfg = engine_config(device, draft_dir, **small)
    single = Engine(ModelRunner.from_model_dir(model_dir, cfg), tokenizer)
    assert run(single, prompts, params) == want
    runner = session.load(model_dir, cfg, SPLITS["tp2"])
    assert runner.num_blocks == single.runner.num_blocks == 8  # the smallest rank's: rank 0 holds the draft's
    engine = Engine(runner, tokenizer)
    assert run(engine, prompts, params) == want
    assert engine.num_preemptions > 0
    assert engine.spec.stats.num_drafts == single.spec.stats.num_drafts > 0
