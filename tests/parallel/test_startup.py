"""Startup and fault checks: splits that do not divide are refused by name; ranks that disagree fail fast, on every
rank; FP8 block scales are cut at the same boundaries as their weights; a hung worker fails the step within the
collective timeout (and the failure handler, which ends a server, is called); ranks started for another EAGLE
draft, or for another number of drafts per step, are refused by name (a copy of the same files is not)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

from small4.config import ConfigError, EngineConfig, TextConfig
from small4.model.context import AttentionMetadata
from small4.parallel.config import ParallelConfig, Range
from small4.parallel.launch import ParallelSession
from small4.parallel.plan import Cut, scale_cut
from small4.parallel.runner import RankMismatchError
from small4.weights.tiny import make_tiny
from small4.weights.tiny_draft import make_tiny_draft


def test_splits_must_divide_the_real_shapes():
    real = TextConfig()  # 32 heads, 128 experts, vocab 131072
    for tp in (2, 4, 8):
        ParallelConfig(tp, tp).validate(real)
        ParallelConfig(tp, 1).validate(real)
    with pytest.raises(ConfigError, match="num_heads = 32 does not split over 3 ranks"):
        ParallelConfig(3, 1).validate(real)
    with pytest.raises(ConfigError, match="expert parallel size 4 must equal"):
        ParallelConfig(2, 4)
    with pytest.raises(ConfigError, match="num_experts = 128 does not split over 256"):
        ParallelConfig(1, 256).validate(real)


def test_scale_cuts_follow_their_weight():
    # DeepSeek-style 128 x 128 blocks: rows 1536:3072 of a [6144, 1024] weight are scale rows 12:24
    assert scale_cut(Cut(0, (Range(1536, 3072),)), (48, 8), (6144, 1024)) == Cut(0, (Range(12, 24),))
    # per-tensor and per-column-block scales along a cut of rows: read whole
    assert scale_cut(Cut(0, (Range(0, 64),)), (), (128, 64)) is None
    assert scale_cut(Cut(0, (Range(0, 64),)), (1, 4), (128, 64)) is None
    # fused experts [E, 2I, H] with [E, 2, 1] scales: each half's piece stays inside its own scale block
    cut = Cut(1, (Range(0, 16), Range(32, 48)))
    assert scale_cut(cut, (8, 2, 1), (8, 64, 64)) == Cut(1, (Range(0, 1), Range(1, 2)))
    with pytest.raises(ValueError, match="across FP8 scale blocks"):
        scale_cut(Cut(0, (Range(64, 192),)), (3, 1), (384, 64))


def test_ranks_that_disagree_fail_fast_on_every_rank(tmp_path):
    model_dir = make_tiny(tmp_path / "tiny")
    failures: list[str] = []
    # the worker was started for TP=2 + EP (as a second node's command line would say), rank 0 asks for TP=2
    session = ParallelSession(
        2,
        device="cpu",
        worker_args=[["--tensor-parallel-size", "2", "--expert-parallel-size", "2"]],
        on_failure=failures.append,
        timeout_s=30,
    )
    try:
        start = time.monotonic()
        with pytest.raises(RankMismatchError, match="rank 1 disagrees with rank 0 on parallel"):
            session.load(model_dir, EngineConfig(device="cpu", dtype="float32"), ParallelConfig(2, 1))
        assert session.workers[0].wait(timeout=30) == 1
        assert time.monotonic() - start < 30
    finally:
        session.close(timeout=10)


def test_a_hung_worker_fails_the_step_within_the_timeout(tmp_path):
    model_dir = make_tiny(tmp_path / "tiny")
    failures: list[str] = []
    session = ParallelSession(2, device="cpu", on_failure=failures.append, timeout_s=10)  # loading fits in it
    try:
        runner = session.load(model_dir, EngineConfig(device="cpu", dtype="float32"), ParallelConfig(2, 1))
        worker = session.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)  # alive but not answering: the watchdog sees nothing
        ids = torch.tensor([1, 5, 9])
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            runner.forward_step(ids, torch.arange(3), AttentionMetadata.for_prefill([3]), torch.tensor([2]))
        assert time.monotonic() - start < 30
        assert failures and "the ranks are out of step" in failures[0] and "Timed out" in failures[0]
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        session.close(timeout=10)
    assert not torch.distributed.is_initialized()  # closed after a worker died: the next session can start


@pytest.mark.parametrize("worker_draft", ["other files", "other count", "a copy"])
def test_ranks_started_for_another_draft_are_refused_by_name(tmp_path, worker_draft):
    """Rank 1 started (as a second node's command line would say) for another draft, for another number of
    drafts per step, or for a copy of rank 0's draft elsewhere (the same files: accepted)."""
    model_dir = make_tiny(tmp_path / "target")
    draft_dir = make_tiny_draft(tmp_path / "draft", seed=1)
    other = {
        "other files": (make_tiny_draft(tmp_path / "other", seed=2), "3"),
        "other count": (draft_dir, "2"),
        "a copy": (shutil.copytree(draft_dir, tmp_path / "copy"), "3"),
    }[worker_draft]
    failures: list[str] = []
    args = [["--speculative-model", str(other[0]), "--num-speculative-tokens", other[1]]]
    session = ParallelSession(2, device="cpu", worker_args=args, on_failure=failures.append, timeout_s=60)
    try:
        cfg = EngineConfig(device="cpu", dtype="float32", speculative_model=str(draft_dir), num_speculative_tokens=3)
        if worker_draft == "a copy":
            assert session.load(model_dir, cfg, ParallelConfig(2, 1)).draft is not None
            return
        field = "draft" if worker_draft == "other files" else "num_speculative_tokens"
        with pytest.raises(RankMismatchError, match=f"rank 1 disagrees with rank 0 on {field}$"):
            session.load(model_dir, cfg, ParallelConfig(2, 1))
        assert session.workers[0].wait(timeout=30) == 1
    finally:
        session.close(timeout=10)
