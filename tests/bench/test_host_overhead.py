"""`small4 bench host-overhead`: the real engine step around a no-op model, timed per piece, written as JSON."""

import json

import torch

from small4.bench.host_overhead import NoOpModel
from small4.bench.synthetic import TINY_BENCH_SPEC, model_config
from small4.cli import main


def test_host_overhead_json(tmp_path):
    out = tmp_path / "ho.json"
    argv = ["bench", "host-overhead", "--batch-sizes", "1,3", "--modes", "greedy,penalties", "--prompt-len", "20"]
    assert main([*argv, "--steps", "2", "--warmup-steps", "1", "--label", "t", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "host-overhead" and record["config"]["label"] == "t"
    rows = record["results"]
    assert [(r["batch_size"], r["mode"], r["scheduling"]) for r in rows] == [
        (b, m, s) for m in ("greedy", "penalties") for b in (1, 3) for s in ("sync", "overlap")
    ]
    for r in rows:
        ms = r["ms_median"]
        # every piece of the step ran during the timed (decode-only) steps, through the graph buffers
        assert {"step", "schedule", "execute", "graph_run", "sample", "update", "emit"} <= set(ms)
        assert len(r["step_ms_all"]) == 2
        assert ms["step"] >= ms["execute"] >= ms["graph_run"] > 0
        assert set(r["cpu_ms_median"]) == set(ms) and r["cpu_ms_median"]["step"] > 0
        # the modelled device (auto: 1.4 ms at batch 1): its idle share and the critical path are reported
        assert r["device_ms"] > 1.3 and 0 <= r["device_idle_fraction"] < 1 and r["critical_ms_median"] >= 0
    # greedy overlaps (every step after the first launched behind one in flight); penalties fall back
    assert all(r["overlapped_steps"] > 0 for r in rows if r["scheduling"] == "overlap" and r["mode"] == "greedy")
    assert all(r["overlapped_steps"] == 0 for r in rows if r["mode"] == "penalties")


def test_host_overhead_rejects_unknown_mode(tmp_path, capsys):
    assert main(["bench", "host-overhead", "--modes", "fancy", "--out", str(tmp_path / "x.json")]) == 1
    assert "unknown mode" in capsys.readouterr().err


def test_noop_model_has_the_model_interface():
    config = model_config(TINY_BENCH_SPEC)
    model = NoOpModel(config, torch.device("cpu"), max_tokens=16, max_rows=4, dtype=torch.float32)
    hidden = model(torch.zeros(5, dtype=torch.long), torch.arange(5), None, None)
    assert hidden.shape == (5, config.text.hidden_size)
    logits = model.compute_logits(hidden[:3])
    assert logits.shape == (3, config.text.vocab_size) and logits.dtype == torch.float32
    assert not torch.equal(logits[0], logits[1])  # rows differ: sampled tokens vary
