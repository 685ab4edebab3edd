"""bench/device_check.sh rehearsed on the CPU (DRYRUN=1: tiny shapes, the Triton interpreter): a subset of its
stages end to end (the Python kernel/graph check, the bench CLI), the summary JSON with device and commit
rewritten as stages end, and the time budget: stages that no longer fit are recorded as skipped, not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.sh"


def _run(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRYRUN": "1", "OUT": str(out), "PY": sys.executable, "SMALL4_COMMIT": "c0ffee", **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_dry_run_stages_write_results(tmp_path):
    done = _run(tmp_path, 400, ONLY="env,graphs,host_overhead", DEADLINE="380")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dryrun"] and summary["commit"] == "c0ffee" and summary["device"]
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status["env"] == status["graphs"] == status["host_overhead"] == "ok", (status, done.stdout)
    assert status["full_l36"] == status["tune_moe"] == status["kernels"] == "skipped: not in ONLY"
    graphs = json.loads((tmp_path / "graphs.json").read_text())
    assert graphs["summary"] == {"ok": 3, "FAIL": 0, "ERROR": 0}  # capture + replay vs eager at batch 1 and 3
    assert summary["graphs_summary"] == graphs["summary"]
    host = json.loads((tmp_path / "host_overhead.json").read_text())
    # the synchronous loop and async scheduling side by side at each batch size
    assert [(r["batch_size"], r["scheduling"]) for r in host["results"]] == [
        (1, "sync"),
        (1, "overlap"),
        (4, "sync"),
        (4, "overlap"),
    ]


def test_stages_past_the_deadline_are_skipped(tmp_path):
    done = _run(tmp_path, 120, DEADLINE="5", ONLY="kernels,graphs,full_l36")
    assert done.returncode == 0, done.stderr[-2000:]
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    status = {s["stage"]: s["status"] for s in stages}
    assert status["kernels"] == status["graphs"] == status["full_l36"] == "skipped: no time"
    assert not (tmp_path / "kernels.json").exists()
