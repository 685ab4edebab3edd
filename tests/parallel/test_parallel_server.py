"""`small4 serve --tensor-parallel-size 2 --enable-expert-parallel` as a real subprocess (rank 0 serves the API,
one worker subprocess): the same answers as a one-process server (chat with an image, two batched completions), then a
killed worker ends the server within a bound, with a log line naming it and a non-zero exit. The embedded demo model
under `--profile latency` speculates with its shipped draft split as on one process."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from small4.cli import build_parser
from small4.parallel.launch import WORKER_EXIT_CODE
from small4.server.health import wait_healthy
from small4.server.serve import build_from_args
from small4.weights.tiny import make_tiny

COMMON = ["--device", "cpu", "--dtype", "float32", "--block-size", "4", "--kv-cache-memory", "8MiB"]
COMMON += ["--served-model-name", "tiny", "--profile", "latency"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout_s: float = 90) -> None:
    wait_healthy(base, alive=lambda: proc is None or proc.poll() is None, timeout_s=timeout_s)


def _png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 42), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _answers(base: str) -> list:
    image = [{"type": "text", "text": "What is in it?"}, {"type": "image_url", "image_url": {"url": _png((255, 0, 0))}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": image}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = [(r.json()["choices"][0]["message"], r.json()["usage"])]
    body = {"model": "tiny", "prompt": ["one two three", "four five six seven"], "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out.append(sorted((c["index"], c["text"]) for c in r.json()["choices"]))
    return out


def _one_process_answers(model_dir: Path | None) -> list:
    """The answers of an in-process server over ``model_dir`` (None: the embedded model)."""
    port = _free_port()
    model = [] if model_dir is None else [str(model_dir)]
    app, _ = build_from_args(build_parser().parse_args(["serve", *model, "--port", str(port), *COMMON]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_healthy(f"http://127.0.0.1:{port}")
        return _answers(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_parallel_server_answers_like_one_process_and_dies_with_its_worker(tmp_path):
    model_dir = make_tiny(tmp_path / "tiny", layout="hf", seed=7)
    want = _one_process_answers(model_dir)
    port = _free_port()
    cmd = [sys.executable, "-m", "small4.cli", "serve", str(model_dir), "--port", str(port), *COMMON]
    cmd += ["--tensor-parallel-size", "2", "--enable-expert-parallel"]
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "SMALL4_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert _answers(f"http://127.0.0.1:{port}") == want
        (worker,) = _children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=15)
        assert time.monotonic() - start < 5
        assert code == WORKER_EXIT_CODE
        log.seek(0)
        assert "worker rank 1" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _children(proc.pid) if proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("model", ["tiny", "embedded"])
def test_two_nodes_on_loopback_answer_like_one_process_and_stop_together(tmp_path, model):
    """`--nnodes 2`: node 1 (one rank) follows node 0 (rank 0, the API); SIGTERM on node 0 stops both, exit 0.
    The embedded model speculates with its draft: node 1's own command line resolves the same draft (checked)."""
    model_dir = make_tiny(tmp_path / "tiny", layout="mistral", seed=3) if model == "tiny" else None
    want = _one_process_answers(model_dir)
    port, master = _free_port(), _free_port()
    model_arg = [] if model_dir is None else [str(model_dir)]
    base = [sys.executable, "-m", "small4.cli", "serve", *model_arg, *COMMON, "--tensor-parallel-size", "2"]
    base += ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master)]
    env = {**os.environ, "SMALL4_DIST_TIMEOUT": "60"}
    log = open(tmp_path / "nodes.log", "w+")
    node1 = subprocess.Popen([*base, "--node-rank", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    node0 = subprocess.Popen([*base, "--node-rank", "0", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", node0)
        assert _answers(f"http://127.0.0.1:{port}") == want
        if model_dir is None:
            assert _spec_counter(f"http://127.0.0.1:{port}", "accepted_tokens") > 0
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(timeout=30) == 0
        assert node1.wait(timeout=30) == 0
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _spec_counter(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(rf"^small4_spec_{name}_total (\S+)$", text, re.M).group(1))


def test_embedded_model_speculates_with_its_draft_split_like_one_process(tmp_path):
    """`small4 serve --tensor-parallel-size 2 --profile latency` with no model: the embedded demo model and its
    shipped draft, rank 0 drafting with rank 1's vocab shard; the answers of one process (speculating too)."""
    want = _one_process_answers(None)
    port = _free_port()
    cmd = [sys.executable, "-m", "small4.cli", "serve", "--port", str(port), *COMMON, "--tensor-parallel-size", "2"]
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "SMALL4_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, proc)
        assert _answers(base) == want
        assert _spec_counter(base, "verify_steps") > 0 and _spec_counter(base, "accepted_tokens") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
