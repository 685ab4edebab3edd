"""The speculative verify step through the decode CUDA graphs: k + 1 decode rows per sequence, the static-buffer
path on any device, captured and replayed on CUDA (the device check runs this file with SMALL4_TEST_DEVICE=cuda)."""

from __future__ import annotations

import pytest

from small4.engine.cuda_graphs import DecodeGraphs
from small4.weights.tiny import make_tiny

from .helpers import OracleDecoder, generate, load_target, make_llm, prompts, random_draft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=11)


def _graph_llm(model_dir, target, draft, device, capture: bool):
    llm = make_llm(model_dir, target, draft, device=str(device), enforce_eager=True, max_num_seqs=4)
    runner = llm.engine.runner
    runner.decode_graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.pad_block, 16, 16, capture=capture)
    return llm


def _verify_through_graphs(model_dir, device, capture: bool) -> None:
    target = load_target(model_dir).to(device)
    draft = random_draft(target, seed=3).to(device)
    ps = prompts(4)
    plain = generate(make_llm(model_dir, target, device=str(device), enforce_eager=True), ps)
    llm = _graph_llm(model_dir, target, draft, device, capture)
    truth = {tuple(p): out for p, out in zip(ps, plain, strict=True)}
    llm.engine.spec = OracleDecoder(llm.engine.spec, truth, 4)
    assert generate(llm, ps) == plain
    assert llm.engine.runner.num_graph_verify_steps > 0
    assert llm.engine.spec.stats.num_accepted > 0
    assert bool(llm.engine.runner.decode_graphs.graphs) == capture


def test_verify_steps_run_as_decode_rows_through_the_graph_path(model_dir, device):
    """Without capture (any device): the static-buffer path, which is what the captured graphs replay."""
    _verify_through_graphs(model_dir, device, capture=False)


@pytest.mark.cuda
def test_verify_steps_replay_captured_decode_graphs(model_dir, device):
    _verify_through_graphs(model_dir, device, capture=True)
