"""Two GPUs over NCCL: decode steps replay CUDA graphs captured on every rank with the collectives inside, and
give the greedy tokens of one GPU (also graphed). Marked ``cuda``: skipped on CPU (gloo keeps eager steps; the
graph protocol itself is covered there by test_tp_parity's static-buffer case), and needs two devices.

    SMALL4_TEST_DEVICE=cuda pytest -q tests/parallel/test_parallel_graphs.py
"""

from __future__ import annotations

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.engine import Engine
from small4.engine.model_runner import ModelRunner
from small4.engine.sampling_params import SamplingParams
from small4.parallel.config import ParallelConfig
from small4.parallel.launch import ParallelSession
from small4.tokenizer import Tokenizer
from small4.weights.loader import load_model
from small4.weights.tiny import make_tiny

pytestmark = pytest.mark.cuda

ENGINE = EngineConfig(profile="latency", dtype="float32", device="cuda", kv_cache_memory=64 << 20, max_num_seqs=8)
PROMPTS = ["the quick brown fox", "a b c", "one two three four five six"]


def greedy(runner: ModelRunner, tokenizer: Tokenizer) -> list[list[int]]:
    engine = Engine(runner, tokenizer)  # captures the decode graphs (on every rank when split)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), tokenizer.encode(prompt, bos=True), SamplingParams(temperature=0, max_tokens=12))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("split", [ParallelConfig(2, 1), ParallelConfig(2, 2)], ids=["tp2", "tp2+ep"])
def test_captured_graphs_per_rank_match_one_gpu(tmp_path, device, split):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (one NCCL rank each)")
    model_dir = make_tiny(tmp_path / "tiny")
    tokenizer = Tokenizer.from_file(model_dir)
    single = ModelRunner(load_model(model_dir, torch.float32, device="cuda", progress=False), ENGINE)
    want = greedy(single, tokenizer)
    assert single.decode_graphs is not None and single.decode_graphs.graphs  # the one-GPU side is graphed too
    failures: list[str] = []
    session = ParallelSession(2, device="cuda", on_failure=failures.append, timeout_s=120)
    try:
        runner = session.load(model_dir, ENGINE, split)
        assert greedy(runner, tokenizer) == want
        graphs = runner.decode_graphs
        assert graphs is not None and graphs.graphs, "rank 0 captured no decode graph"
        assert graphs.steps >= 10  # decode steps replayed the graphs on both ranks
    finally:
        session.close()
    assert not failures, failures
    assert [w.returncode for w in session.workers] == [0]
