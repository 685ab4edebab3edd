"""TP=2, EP=2 and TP=2+EP (the expert dispatch's gather, and its all-to-all) against one process, on the tiny
checkpoints (both layouts; FP8 kept and dequantised; NVFP4 experts).

This test process is rank 0 (it drives, as the API process does); one worker subprocess is rank 1, over gloo on
loopback. One session serves every case: each case is a "load" message, so the worker starts once. Greedy outputs
through the engine must be identical and the fp32 logits of a prefill within 1e-5 + 1e-5 relative (the all-reduce
sums the ranks' partial products in another order than one matmul: ~1e-5 apart on logits of a few units).
"""

from __future__ import annotations

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.engine import Engine
from small4.engine.model_runner import ModelRunner
from small4.engine.sampling_params import SamplingParams
from small4.model.context import AttentionMetadata
from small4.parallel.config import ParallelConfig
from small4.parallel.launch import ParallelSession
from small4.tokenizer import Tokenizer
from small4.weights.loader import load_model
from small4.weights.tiny import make_tiny

ENGINE = EngineConfig(profile="latency", dtype="float32", device="cpu", kv_cache_memory=4 << 20)
SPLITS = {"tp2": ParallelConfig(2, 1), "ep2": ParallelConfig(1, 2), "tp2+ep": ParallelConfig(2, 2)}
# the expert dispatch's all-to-all: from 8 tokens (prefills go all-to-all, decodes through the gather), and always
# (decodes of one token: one rank owns no token and sends nothing)
SPLITS |= {"ep2-a2a": ParallelConfig(1, 2, all_to_all_min_tokens=8), "tp2+ep-a2a": ParallelConfig(2, 2, 1)}
CHECKPOINTS = [("hf", False, False), ("mistral", False, False), ("hf", True, False), ("hf", True, True)]
CHECKPOINTS += [("mistral", True, True), ("mistral", "nvfp4", False)]  # NVFP4 experts (dequantised on the CPU)
PROMPTS = ["the quick brown fox", "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def session():
    failures: list[str] = []
    s = ParallelSession(2, device="cpu", on_failure=failures.append, timeout_s=60)
    yield s
    s.close()
    assert not failures, failures
    assert [w.returncode for w in s.workers] == [0]  # told to stop, the worker left cleanly


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    made = {
        (layout, fp8): make_tiny(root / f"{layout}-{fp8}", layout=layout, fp8=fp8)
        for layout in ("hf", "mistral")
        for fp8 in (False, True)
    }
    return made | {("mistral", "nvfp4"): make_tiny(root / "nvfp4", layout="mistral", quant="nvfp4")}


def greedy(runner: ModelRunner, tokenizer: Tokenizer, static_graphs: bool = False) -> list[list[int]]:
    engine = Engine(runner, tokenizer)
    if static_graphs:  # the decode-graph protocol without capture (gloo): every rank replays the static buffers
        runner.prepare_decode_graphs(engine.max_model_len, 4, capture=False)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), tokenizer.encode(prompt, bos=True), SamplingParams(temperature=0, max_tokens=8))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(PROMPTS))]


@torch.inference_mode()
def prefill_logits(runner: ModelRunner, tokenizer: Tokenizer, prompts: list[str] = PROMPTS) -> torch.Tensor:
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    meta = AttentionMetadata.for_prefill([len(x) for x in ids])
    flat = torch.tensor([t for x in ids for t in x])
    positions = torch.cat([torch.arange(len(x)) for x in ids])
    return runner.forward_step(flat, positions, meta, torch.arange(flat.numel()))  # every row's logits


@pytest.mark.parametrize("layout,fp8,keep", CHECKPOINTS)
def test_parallel_matches_one_process(session, checkpoints, layout, fp8, keep):
    model_dir = checkpoints[(layout, fp8)]
    tokenizer = Tokenizer.from_file(model_dir)
    single = ModelRunner(load_model(model_dir, torch.float32, keep_fp8=keep, progress=False), ENGINE)
    want_tokens, want_logits = greedy(single, tokenizer), prefill_logits(single, tokenizer)
    assert all(len(t) == 8 for t in want_tokens)
    for name, split in SPLITS.items():
        runner = session.load(model_dir, ENGINE, split, keep_fp8=keep)
        got_logits = prefill_logits(runner, tokenizer)
        torch.testing.assert_close(
            got_logits, want_logits, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        assert greedy(runner, tokenizer) == want_tokens, name
        if split.all_to_all_min_tokens == 1:  # one token: rank 0 owns none of it, sends and receives nothing
            one = prefill_logits(runner, tokenizer, [""])
            torch.testing.assert_close(one, prefill_logits(single, tokenizer, [""]), rtol=1e-5, atol=1e-5)
        if split.expert_parallel:  # each strategy ran where its batch sizes came up
            calls = runner.model.layers[0].mlp.experts.dispatch.calls
            threshold = split.all_to_all_min_tokens
            assert calls["all_to_all"] > 0 if threshold else calls["all_to_all"] == 0, (name, calls)
            assert calls["gather"] > 0 if threshold != 1 else calls["gather"] == 0, (name, calls)


@pytest.mark.parametrize("split", ["tp2", "tp2+ep"])
def test_decode_graph_steps_match_one_process(session, checkpoints, split):
    """Decode steps through the graph path ("graph_step": every rank replays its own static buffers, padded to
    the ladder, the collectives inside) give the one-process greedy tokens."""
    model_dir = checkpoints[("hf", False)]
    tokenizer = Tokenizer.from_file(model_dir)
    single = ModelRunner(load_model(model_dir, torch.float32, progress=False), ENGINE)
    want = greedy(single, tokenizer)
    runner = session.load(model_dir, ENGINE, SPLITS[split])
    assert greedy(runner, tokenizer, static_graphs=True) == want
    assert runner.decode_graphs.steps >= 7  # every decode step after the prefill went through the graphs
