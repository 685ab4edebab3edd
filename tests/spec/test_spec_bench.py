"""``bench offline`` and ``bench full`` report speculation on vs off side by side in one run (tiny, CPU)."""

from __future__ import annotations

import json

import pytest

from small4.cli import main
from small4.weights.tiny import make_tiny
from small4.weights.tiny_draft import make_tiny_draft


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SMALL4_KERNELS", "reference")


def test_offline_reports_speculation_beside_plain(tmp_path):
    model = make_tiny(tmp_path / "m", seed=1)
    draft = make_tiny_draft(tmp_path / "d", seed=2)
    out = tmp_path / "r.json"
    argv = ["bench", "offline", str(model), "--no-reference", "--num-prompts", "2", "--input-len", "8"]
    argv += ["--output-len", "5", "--speculative-model", str(draft), "--num-speculative-tokens", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    spec, plain = r["small4_speculative"], r["small4"]
    assert spec["output_tokens_per_s"] > 0 and plain["output_tokens_per_s"] > 0
    assert spec["num_speculative_tokens"] == 2 and spec["draft_tokens"] > 0
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["mean_accepted_length"] >= 1
    assert spec["outputs_equal_plain"] == 2  # greedy: speculation never changes the tokens


def test_full_reports_speculative_serving_beside_plain(tmp_path):
    out = tmp_path / "full.json"
    argv = ["bench", "full", "--tiny", "--layers", "1", "--batch-sizes", "1", "--contexts", "16"]
    argv += ["--prefill-len", "16", "--decode-steps", "1", "--serving-concurrency", "1,2"]
    argv += ["--serving-input-len", "8", "--serving-output-len", "5", "--speculative-concurrency", "2"]
    argv += ["--num-speculative-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    (spec,) = r["speculative"]
    assert spec["status"] == "ok" and spec["concurrency"] == 2 and spec["num_speculative_tokens"] == 2
    assert spec["output_tokens_per_s"] > 0 and spec["plain_output_tokens_per_s"] > 0
    assert spec["output_tokens"] == spec["num_requests"] * 5
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["mean_accepted_length"] >= 1
