"""Bad input gets an OpenAI error body with the right status (400 at every edge: deep schemas, odd logit_bias
keys, numbers out of range); auth, header, body and path limits; disconnects abort; a failed engine step fails
only its own requests (500 / an error event) and the server keeps serving; SIGTERM drains and exits 0, and what
is still running at --shutdown-timeout ends with finish_reason "abort" and [DONE]."""

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
from small4.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES

AUTH = {"Authorization": "Bearer test-key"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()  # NaN / Infinity as Python writes them: a server must cope
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


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


DEEP_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": _deep_schema(250)}}]
DEEP_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": _deep_schema(250)}}


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tools": DEEP_TOOLS, "tool_choice": "required"}, "tools"),
        ({"response_format": DEEP_FORMAT}, "response_format"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # '²'.isdigit() is True, int('²') raises
        ({"logit_bias": {"1" * 40: 1}}, "logit_bias"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 10**6}, "top_k"),  # above the vocabulary
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_400_not_500_at_the_edges(server, patch, param):
    _assert_error(_post(server, "/v1/chat/completions", {**CHAT, **patch}), 400, param)


def _assert_huge_head_refused(base_url: str) -> None:
    """A 100 kB header is refused: h11's head cap answers 400 (ours 431), or the server closes while the client is
    still writing, and the kernel's reset can reach the client before that 400 does (uvicorn has no lingering
    close). A 200 or any other status fails."""
    try:
        r = httpx.get(f"{base_url}/v1/models", headers={"x-pad": "a" * 100_000}, timeout=30)
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return
    assert r.status_code in (400, 431), r.text


def test_body_header_and_path_limits(tiny_model_dir):
    s = start_server(tiny_model_dir, "--max-body-bytes", "2000", "--max-header-bytes", "8KiB")
    try:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        _assert_error(_post(s, "/v1/chat/completions", big, headers={}), 413)
        chunked = httpx.post(  # no Content-Length: counted while read, still 413 (FastAPI would say 400)
            f"{s.base_url}/v1/chat/completions",
            content=iter([json.dumps(big).encode()[i : i + 500] for i in range(0, 5100, 500)]),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        _assert_error(chunked, 413)
        _assert_huge_head_refused(s.base_url)
        assert httpx.get(f"{s.base_url}/v1/models", headers={"x-pad": "a" * 4000}, timeout=30).status_code == 200
        r = httpx.get(f"{s.base_url}/v1/models/", headers={"host": "evil.example"}, timeout=30)
        assert r.status_code == 404 and "location" not in r.headers
        _assert_error(r, 404)
    finally:
        s.stop()


def _marked_runner(ctx, marker: int):
    """Fault injection through the real step: the runner raises when a scheduled sequence's prompt holds
    ``marker``, as a device fault on that batch would."""
    runner = ctx.engine.engine.runner
    real = runner.execute

    def execute(plan):
        if any(marker in item.request.prompt_token_ids for item in plan.scheduled):
            raise RuntimeError("injected fault")
        return real(plan)

    runner.execute = execute


def test_a_failed_step_fails_its_requests_and_the_server_keeps_serving(tiny_model_dir):
    s = start_server(tiny_model_dir)
    try:
        _marked_runner(s.ctx, 2999)
        bad = {"model": "tiny", "prompt": [1, 2999, 7], "max_tokens": 4}
        err = _assert_error(_post(s, "/v1/completions", bad, headers={}), 500)
        assert err["code"] == "engine_error"
        with httpx.stream("POST", f"{s.base_url}/v1/completions", json={**bad, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"
        assert httpx.get(f"{s.base_url}/health", timeout=10).status_code == 200
        ok = _post(s, "/v1/completions", {**bad, "prompt": [1, 5, 7]}, headers={})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        engine = s.ctx.engine.engine
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        s.stop()


def test_steps_that_keep_failing_mark_the_server_unhealthy(tiny_model_dir):
    s = start_server(tiny_model_dir)
    try:
        _marked_runner(s.ctx, 1)  # every prompt starts with BOS (1): the device is gone
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            _assert_error(_post(s, "/v1/completions", {"prompt": [1, 5], "max_tokens": 2}, headers={}), 500)
        assert httpx.get(f"{s.base_url}/health", timeout=10).status_code == 503
        err = _assert_error(_post(s, "/v1/completions", {"prompt": [1, 5], "max_tokens": 2}, headers={}), 503)
        assert err["code"] == "engine_unhealthy"
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


def test_sigterm_past_the_shutdown_timeout_ends_streams_with_abort_and_done(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "small4.cli", "serve", str(tiny_model_dir), "--port", str(port)]
        + ["--block-size", "4", "--kv-cache-memory", "8MiB", "--enforce-eager", "--shutdown-timeout", "1"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        body = {"prompt": "x", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 2:
                        sent = time.monotonic()
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert time.monotonic() - sent < 20
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
