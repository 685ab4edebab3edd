"""`small4 bench offline` end to end on the default tiny model: the JSON it writes, not the timings in it."""

from __future__ import annotations

import json

from small4.cli import main
from small4.weights.tiny import make_tiny

ARGS = ["bench", "offline", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"]


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "r.json"
    assert main([*ARGS, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _assert_positive_throughput(run: dict) -> None:
    for key in ("seconds", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert run[key] > 0, key
    assert run["total_tokens_per_s"] > run["output_tokens_per_s"]


def test_offline_bench_with_reference(tmp_path):
    r = _run(tmp_path)
    assert r["benchmark"] == "offline"
    assert r["device"] and r["torch_version"] and r["timestamp"]
    assert "git_commit" in r
    assert r["config"]["model"] == "tiny:tiny"
    assert (r["config"]["num_prompts"], r["config"]["input_len"], r["config"]["output_len"]) == (2, 8, 4)
    _assert_positive_throughput(r["small4"])
    _assert_positive_throughput(r["reference"])
    assert r["ratio"]["requests_per_s"] > 0 and r["ratio"]["output_tokens_per_s"] > 0
    assert r["outputs_agree"] == 2 and r["outputs_compared"] == 2
    assert r["reference_note"] is None


def test_offline_bench_no_reference(tmp_path):
    r = _run(tmp_path, "--no-reference", "--repeats", "2")
    _assert_positive_throughput(r["small4"])
    assert len(r["small4"]["seconds_per_repeat"]) == 2
    assert r["small4"]["seconds"] == min(r["small4"]["seconds_per_repeat"])
    assert r["reference"] is None and r["ratio"] is None and r["outputs_agree"] is None
    assert "--no-reference" in r["reference_note"]


def test_offline_bench_skips_reference_for_mistral_native_checkpoint(tmp_path):
    model_dir = make_tiny(tmp_path / "native", layout="mistral", seed=1)
    r = _run(tmp_path, str(model_dir))
    assert r["config"]["model"] == str(model_dir)
    _assert_positive_throughput(r["small4"])
    assert r["reference"] is None and "params.json" in r["reference_note"]


def test_offline_bench_rejects_model_and_tiny_together(tmp_path, capsys):
    model_dir = make_tiny(tmp_path / "m", seed=1)
    assert main([*ARGS, str(model_dir), "--tiny", "small", "--out", str(tmp_path / "r.json")]) == 1
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_reference_is_skipped_for_fp8_and_runs_for_hf_bf16(tmp_path):
    from small4.bench.offline import reference_skip_reason

    assert reference_skip_reason(make_tiny(tmp_path / "bf16", seed=1)) is None
    assert "FP8" in reference_skip_reason(make_tiny(tmp_path / "fp8", fp8=True, seed=1))
