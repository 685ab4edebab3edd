"""`small4 plan` on the released model's shapes (a real-shaped config.json, FP8, with the Pixtral tower)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from small4.bench.synthetic import FULL_SPEC
from small4.cli import main
from small4.config import load_model_config
from small4.parallel.config import ParallelConfig
from small4.parallel.memory import plan_rank
from small4.weights.tiny import hf_config

GiB = 1 << 30


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    spec = replace(FULL_SPEC, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096)
    d = tmp_path_factory.mktemp("real")
    (d / "config.json").write_text(json.dumps(hf_config(spec, fp8=True)))
    return d


def test_one_gpu_cannot_hold_it_and_the_cache_is_replicated(real_dir):
    one = plan_rank(load_model_config(real_dir), ParallelConfig(1, 1), 80 * GiB)
    assert 118.5e9 < one.total_parameters == one.parameters < 120e9  # "119B"
    assert 119e9 < one.weight_bytes < 122e9  # FP8 experts and attention, BF16 embeddings, head and vision
    assert not one.fits and one.max_context == 0
    assert one.cache_bytes_per_token == 36 * 320 * 2 == 23040  # 262,144 tokens: 6.04 GB on every rank


def test_four_h100s_hold_it_at_256k(real_dir, capsys):
    assert main(["plan", str(real_dir), "-tp", "4", "--enable-expert-parallel", "--gpu-memory", "80GiB", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert four["world_size"] == 4 and four["expert_parallel_size"] == 4
    # a quarter of the split weights plus the replicated parts (vision tower, q_a / kv_a, router, norms: ~1.2 GB)
    assert 120.9e9 / 4 < four["weight_bytes"] < 120.9e9 / 4 + 1.5e9
    usable = int(80 * GiB * 0.9)
    assert four["cache_tokens"] == (usable - four["weight_bytes"] - four["activation_reserve_bytes"]) // 23040
    assert four["max_context"] >= 262144
