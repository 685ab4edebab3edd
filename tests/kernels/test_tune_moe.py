"""`small4 bench tune-moe` at tiny shapes on CPU (kernels under the interpreter): the plumbing from timings to a
block-size table that ``fused_moe`` then uses, not the timings themselves."""

from __future__ import annotations

import json

import torch

from small4.bench.results import device_name
from small4.bench.tune_moe import TINY_GRID, candidates, to_table
from small4.cli import main
from small4.kernels.fused_moe import MOE_CONFIGS, choose_config, load_table, table_path


def test_tune_writes_a_table_that_choose_config_reads(tmp_path):
    out, tables = tmp_path / "tune.json", tmp_path / "tables"
    args = ["bench", "tune-moe", "--tiny", "--tokens", "3,1", "--repeats", "1", "--out", str(out)]
    assert main([*args, "--write-table", "--table-dir", str(tables)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "tune-moe" and record["config"]["tokens"] == [1, 3]
    best = record["best"]
    assert [b["tokens"] for b in best] == [1, 3]
    assert all(b["config"] in candidates(TINY_GRID) and b["us"] > 0 for b in best)
    path = table_path(device_name(torch.device("cpu")), tables)
    assert path.is_file()
    table = load_table(path)
    assert sorted(table) == [(0, 1), (2, 1 << 62)]
    for tokens, point in ((1, best[0]), (2, best[1]), (10**6, best[1])):
        chosen = choose_config(tokens, table=table)
        assert {k: chosen[k] for k in point["config"]} == point["config"]


def test_ranges_cover_every_count_and_default_stays_on_cpu():
    best = [{"tokens": t, "config": {"BLOCK_M": t}, "us": 1.0} for t in (1, 8, 64)]
    rows = to_table(best)
    assert [(r["lo"], r["hi"]) for r in rows] == [(0, 1), (2, 8), (9, 1 << 62)]
    assert choose_config(5, torch.device("cpu")) == dict(MOE_CONFIGS[(0, 32)])  # no tuned tables off CUDA
    assert table_path("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"


def test_tune_nvfp4_tiny(tmp_path):
    """NVFP4 experts through the same plumbing (the kernel dequantises 4-bit tiles)."""
    out = tmp_path / "tune.json"
    args = ["bench", "tune-moe", "--tiny", "--dtype", "nvfp4", "--tokens", "2", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["config"]["dtype"] == "nvfp4" and record["best"][0]["config"] in candidates(TINY_GRID)
