"""Bad input gets an OpenAI error body with the right status; auth, size and queue limits; disconnects abort;
an engine failure fails requests with 500 and marks /health unhealthy; SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port, start_server, wait_healthy

AUTH = {"Authorization": "Bearer test-key"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=30, **kw)
    return httpx.post(
        f"{server.base_url}{path}",
        content=body,
        headers={**headers, "content-type": "application/json"},
        timeout=30,
        **kw,
    )


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"n": 17}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"tool_choice": "required"}, None),
    ],
)
def test_chat_validation_errors(server, patch, param):
    _assert_error(_post(server, "/v1/chat/completions", {**CHAT, **patch}), 400, param)


def test_invalid_json_and_vocab_checks(server):
    _assert_error(_post(server, "/v1/chat/completions", b"{not json"), 400)
    _assert_error(_post(server, "/v1/chat/completions", {**CHAT, "logit_bias": {"999999": 1}}), 400)
    _assert_error(_post(server, "/v1/completions", {"model": "tiny", "prompt": [1, 999999]}), 400, "prompt")
    _assert_error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}), 400)


def test_model_not_found(server):
    err = _assert_error(_post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "model")
    assert err["code"] == "model_not_found"


def test_api_key_required_except_health(server):
    _assert_error(_post(server, "/v1/chat/completions", CHAT, headers={}), 401)
    _assert_error(_post(server, "/v1/chat/completions", CHAT, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_metrics(server):
    assert _post(server, "/v1/chat/completions", CHAT).status_code == 200
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=10).text
    for name in (
        "small4_requests_total",
        "small4_time_to_first_token_seconds",
        "small4_inter_token_latency_seconds",
        "small4_generation_tokens_total",
        "small4_kv_cache_usage",
        "small4_num_requests_waiting",
    ):
        assert name in text


def test_client_disconnect_aborts(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 30  # a liveness bound, generous for a loaded machine
    while server.ctx.engine.stats.num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.ctx.engine.stats.num_running == 0
    bm = server.ctx.engine.engine.block_manager
    assert bm.usage == 0.0


def test_non_streaming_disconnect_aborts(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=0.3)
    deadline = time.monotonic() + 30
    while server.ctx.engine.stats.num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.ctx.engine.stats.num_running == 0


def test_body_size_and_queue_limits(tiny_model_dir):
    s = start_server(tiny_model_dir, "--max-body-bytes", "2000", "--max-queue", "0")
    try:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        _assert_error(_post(s, "/v1/chat/completions", big, headers={}), 413)
        r = _post(s, "/v1/chat/completions", CHAT, headers={})
        _assert_error(r, 503)
        assert r.headers["retry-after"] == "1"
    finally:
        s.stop()


def test_engine_failure_is_500_and_unhealthy(tiny_model_dir):
    s = start_server(tiny_model_dir)
    try:
        runner = s.ctx.engine.engine.runner

        def broken(plan):
            raise RuntimeError("simulated device failure")

        runner.execute = broken
        _assert_error(_post(s, "/v1/chat/completions", CHAT, headers={}), 500)
        assert httpx.get(f"{s.base_url}/health", timeout=10).status_code == 503
        _assert_error(_post(s, "/v1/chat/completions", CHAT, headers={}), 503)
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_and_exits_zero(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "small4.cli",
            "serve",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--block-size",
            "4",
            "--kv-cache-memory",
            "8MiB",
            "--kv-cache-dtype",
            "bfloat16",
            "--enforce-eager",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        body = {"prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(line[5:].strip())
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
