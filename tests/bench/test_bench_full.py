"""`small4 bench full` on CPU at tiny scale: the JSON it writes (fields, sanity of values), not the timings."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from small4.bench import fullscale, reference
from small4.cli import build_parser, main
from small4.model.context import AttentionMetadata

ARGS = ["bench", "full", "--tiny", "--layers", "1", "--batch-sizes", "1,2", "--contexts", "16"]
ARGS += ["--prefill-len", "32", "--decode-steps", "2"]
ARGS += ["--serving-concurrency", "1,2", "--serving-input-len", "8", "--serving-output-len", "5"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SMALL4_KERNELS", "reference")


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "full.json"
    assert main([*ARGS, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_full_tiny_json(tmp_path):
    # 8 KiB of latent cache holds batch 1 (2 blocks of 16 x 48 float32) but not batch 2: one combo is skipped
    r = _run(tmp_path, "--max-cache-memory", "8KiB")
    assert r["benchmark"] == "full"
    assert r["device"] and r["torch_version"] and "git_commit" in r
    cfg = r["config"]
    assert (cfg["layers"], cfg["full_layers"], cfg["weights"], cfg["kernels"]) == (1, 2, "fp8", "reference")
    assert cfg["batch_sizes"] == [1, 2] and cfg["contexts"] == [16] and cfg["decode_steps"] == 2

    ok, skipped = r["decode"]
    assert (ok["batch_size"], ok["context"], ok["status"]) == (1, 16, "ok")
    assert len(ok["step_ms_all"]) == 2
    for key in ("step_ms_median", "tokens_per_s", "forward_ms_median", "forward_tokens_per_s", "fill_seconds"):
        assert ok[key] > 0, key
    est = ok["full_model_estimate"]
    assert est["ms"] >= est["head_ms"] and est["per_layer_ms"] >= 0 and est["tokens_per_s"] > 0
    assert (skipped["batch_size"], skipped["status"]) == (2, "skipped")
    assert "--max-cache-memory" in skipped["reason"]

    p = r["prefill"]
    assert p["status"] == "ok" and p["prefill_len"] == 32 and p["tokens_per_s"] > 0

    one, two = r["serving"]
    assert (one["concurrency"], two["concurrency"]) == (1, 2) and one["status"] == two["status"] == "ok"
    for run in (one, two):
        assert run["num_requests"] == max(4, 2 * run["concurrency"])
        assert run["output_tokens"] == run["num_requests"] * 5  # EOS ignored: every request runs to its length
        for metric in ("ttft", "tpot", "itl"):
            stats = run[metric]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"], metric
    assert p["full_model_estimate"]["tokens_per_s"] > 0

    (roof,) = r["roofline"]
    assert roof["context"] == 16 and roof["hbm_bandwidth_bytes_per_s"] == "unknown"
    assert roof["datasheet"] is None and roof["measured_copy_bandwidth_bytes_per_s"] is None
    b = roof["bytes_per_step"]
    layer = b["per_layer"]
    assert all(layer[k] > 0 for k in ("attention", "router", "shared_expert", "routed_experts", "latent_cache"))
    assert layer["latent_cache"] == 16 * (32 + 16) * 4  # context x (kv_lora_rank + rope dim) x float32
    assert b["total"] == b["lm_head_norm_embedding_row"] + layer["total"]
    assert b["full_model_total"] == b["lm_head_norm_embedding_row"] + 2 * layer["total"]

    assert r["memory"]["weights_bytes"] == cfg["weights_bytes"] > 0
    assert r["memory"]["peak_allocated_bytes"] is None  # CPU
    assert r["reference"] is None and "--reference" in r["reference_note"]


def test_bandwidth_table():
    assert fullscale.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert fullscale.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert fullscale.hbm_bandwidth("AMD EPYC") is None


def test_offline_still_registered():
    args = build_parser().parse_args(["bench", "offline", "--num-prompts", "2"])
    assert args.num_prompts == 2 and args.func is not fullscale.main


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_reference_gets_the_same_weights(weights):
    """transformers' Mistral4ForCausalLM with the copied (dequantised) weights computes small4's logits."""
    args = argparse.Namespace(device="cpu", tiny=True, layers=2, dtype=weights, seed=3, block_size=16)
    args.max_cache_memory, args.cuda_graph = None, False
    bench = fullscale.build_bench(args)
    hf = reference.build_reference(bench)
    ids = torch.tensor(bench.random_tokens(12, seed=5))
    with torch.inference_mode():
        hidden = bench.model(ids, torch.arange(12), AttentionMetadata.for_prefill([12]), None)
        ours = bench.model.compute_logits(hidden)
        ref = hf(ids[None]).logits[0].float()
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
