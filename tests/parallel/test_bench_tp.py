"""`small4 bench full --tensor-parallel-size 2 --enable-expert-parallel` at tiny scale on CPU (gloo): this process
is rank 0 and starts rank 1 with the same command line; the JSON records the split and per-rank weights."""

from __future__ import annotations

import json

import torch.distributed as dist

from small4.cli import main

ARGS = ["bench", "full", "--tiny", "--layers", "1", "--batch-sizes", "1", "--contexts", "16", "--device", "cpu"]
ARGS += ["--prefill-len", "16", "--decode-steps", "1", "--warmup-steps", "1", "--repeats", "1"]
ARGS += ["--serving-concurrency", "1", "--serving-input-len", "4", "--serving-output-len", "2"]


def test_bench_full_split_over_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALL4_KERNELS", "reference")
    monkeypatch.setenv("SMALL4_DIST_TIMEOUT", "60")
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*ARGS, "--out", str(out1)]) == 0
    split = ["--tensor-parallel-size", "2", "--enable-expert-parallel", "--ep-all-to-all-min-tokens", "8"]
    assert main([*ARGS, *split, "--out", str(out2)]) == 0  # prefill (16 tokens) all-to-all, decode the gather
    assert not dist.is_initialized()  # the group was left again
    one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
    cfg = two["config"]
    assert (cfg["world_size"], cfg["tensor_parallel_size"], cfg["expert_parallel_size"]) == (2, 2, 2)
    assert cfg["ep_all_to_all_min_tokens"] == 8
    # each rank holds about half the weights (norms, router, q_a and kv_a are replicated)
    assert one["config"]["weights_bytes"] / 2 < cfg["weights_bytes"] < 0.6 * one["config"]["weights_bytes"]
    (decode,) = two["decode"]
    assert decode["status"] == "ok" and decode["tokens_per_s"] > 0
    assert two["prefill"]["status"] == "ok" and two["serving"][0]["status"] == "ok"
    assert two["serving"][0]["output_tokens"] == 2 * two["serving"][0]["num_requests"]
