"""Every Triton kernel compiles for sm_90 with no GPU present, at the real model shapes and the block sizes the
code picks (the fused MoE's default table for BF16 / FP8 / NVFP4 experts, MLA decode's tiles and merge widths for
both caches, the latent write), within Hopper's 232,448 bytes of shared memory and without register spills; the
check itself sees an over-sized tune-grid corner; and one config per kernel compiles for sm_100. Runs
``python -m small4.kernels.aot --subset ci`` (and ``--subset smoke --arch 100``) in its own process (it swaps
Triton's driver, and needs the compiler, not the interpreter). The full sweep, every tune-grid config, is
``python -m small4.kernels.aot --subset all`` (tens of minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from small4.kernels.aot import SMEM_LIMIT, Compiled, Report, grid_fit, load_grid_fit, report_from_json, write_fit

pytest.importorskip("triton.backends.nvidia.compiler", reason="the triton wheel ships the CUDA backend and ptxas")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {
    "_gate_up_silu_kernel",
    "_down_kernel",
    "_gate_up_silu_nvfp4_kernel",
    "_down_nvfp4_kernel",
    "_mla_decode_split_kernel",
    "_mla_decode_merge_kernel",
    "_latent_write_kernel",
}


def run_check(out: Path, subset: str, arch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "small4.kernels.aot", "--subset", subset, "--arch", str(arch), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    print(done.stdout[-4000:])  # the per-kernel table, shown with -s or on failure
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_check(tmp_path_factory.mktemp("aot") / "report.json", "ci", 90)


def test_every_default_config_compiles_fits_and_does_not_spill(report):
    assert report["errors"] == [] and report["smem_limit"] == SMEM_LIMIT[90] == 232_448
    defaults = [c for c in report["compiled"] if not c["case"].startswith("grid ")]
    assert {c["kernel"] for c in defaults} == KERNELS
    for c in defaults:
        assert 0 <= c["shared"] <= SMEM_LIMIT[90], c
        assert c["registers"] is not None and c["registers"] <= 255, c
        assert c["spill_stores"] == 0 and c["spill_loads"] == 0, c
    moe = [c for c in defaults if "moe" in c["case"]]
    assert len(moe) == 3 * 4 * 2  # bf16 / fp8 / nvfp4 x the default table's 4 rows x gate_up + down
    assert all(c["mma"] == "wgmma" for c in moe if c["case"].endswith("T=2049"))  # Hopper tensor cores


def test_the_check_sees_a_grid_config_over_shared_memory(report):
    """The tune grid's largest BF16 gate_up tiles (128 x 128 x 128, 4 stages) need more than Hopper has."""
    corner = [c for c in report["compiled"] if c["case"].startswith("grid bf16") and '"BLOCK_K": 128' in c["case"]]
    gate_up = [c for c in corner if c["kernel"] == "_gate_up_silu_kernel" and '"BLOCK_M": 128' in c["case"]]
    assert gate_up and not gate_up[0]["shared_ok"] and gate_up[0]["shared"] > SMEM_LIMIT[90]


def test_recorded_grid_fit_agrees_with_a_fresh_compile(report):
    """The committed record tune-moe filters with says of the compiled grid corner what the compiler says now."""
    recorded = load_grid_fit(arch=90)
    assert recorded is not None
    fresh = grid_fit(report_from_json(report))["formats"]
    pairs = [
        (recorded[f][c]["fits"], e["fits"]) for f, got in fresh.items() for c, e in got.items() if c in recorded[f]
    ]
    assert len(pairs) >= 2 and all(was == now for was, now in pairs)  # bf16 and fp8 at least (nvfp4 if recorded)


def test_sm100_one_config_per_kernel(tmp_path):
    """Blackwell (sm_100, ptxas-blackwell from the wheel): the largest default tiles of every kernel and format."""
    report = run_check(tmp_path / "report.json", "smoke", 100)
    assert report["errors"] == [] and report["smem_limit"] == SMEM_LIMIT[100]
    assert {c["kernel"] for c in report["compiled"]} == KERNELS
    for c in report["compiled"]:
        assert c["shared_ok"] and c["spill_stores"] == 0 and c["spill_loads"] == 0, c


def test_grid_fit_drops_what_does_not_fit(tmp_path):
    from small4.bench.tune_moe import fitting

    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}
    small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    key = json.dumps(big, sort_keys=True)
    report = Report(arch=90, triton="x")
    report.compiled = [
        Compiled(f"grid bf16 {key}", "_gate_up_silu_kernel", {}, 8, 4, 300_000, False, 200, 0, 0),
        Compiled(f"grid bf16 {key}", "_down_kernel", {}, 8, 4, 100_000, True, 255, 64, 64),
        Compiled(f"grid bf16 {json.dumps(small, sort_keys=True)}", "_down_kernel", {}, 4, 3, 9_000, True, 80, 0, 0),
    ]
    write_fit(report_from_json(report.to_json()), tmp_path / "fit.json")  # the file tune-moe reads, round trip
    fit = load_grid_fit(tmp_path / "fit.json", arch=90)
    assert fit == grid_fit(report)["formats"] and load_grid_fit(tmp_path / "fit.json", arch=100) is None
    assert not fit["bf16"][key]["fits"] and len(fit["bf16"][key]["why"]) == 2  # shared memory and the spill
    kept, dropped = fitting([big, small], "bf16", fit)
    assert kept == [small] and dropped[0]["config"] == big
    assert fitting([big, small], "fp8", fit) == ([big, small], [])  # no record for fp8: nothing dropped
    odd = {**small, "BLOCK_K": 16}
    assert fitting([odd], "nvfp4", None)[0] == []  # NVFP4's BLOCK_K must be a multiple of 32
