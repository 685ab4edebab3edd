"""Overload and hostile numbers: admission counts sequences at arrival (a burst cannot pass the cap, one request's
fan-out cannot either), rendering runs in bounded lanes with a time limit, over-length text is refused before it
is tokenized, and any JSON number in any request field gives 200 or 400, never a 500 or a dead engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import start_server
from small4.server.errors import APIError

AUTH = {"Authorization": "Bearer test-key"}


def _post(base: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    raw = json.dumps(body).encode()  # allows NaN / Infinity, which Python's json.loads on the server accepts
    headers = {**(headers or {}), "content-type": "application/json"}
    return httpx.post(f"{base}{path}", content=raw, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def small_cap(tiny_model_dir):
    s = start_server(tiny_model_dir, "--max-num-seqs", "2", "--max-queue", "2", "--render-timeout", "1")
    yield s
    s.stop()


def _wait_idle(ctx, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ctx.admission.in_flight or ctx.engine.stats.num_running or ctx.engine.stats.num_waiting:
        assert time.monotonic() < deadline, "the server did not go idle"
        time.sleep(0.02)


def test_a_burst_cannot_pass_the_queue_cap(small_cap):
    """30 simultaneous requests against --max-num-seqs 2 --max-queue 2: at most 4 sequences are ever admitted,
    the rest are refused at once with 503 + Retry-After."""
    _wait_idle(small_cap.ctx)
    small_cap.ctx.admission.peak = 0
    body = {"model": "tiny", "prompt": "x", "max_tokens": 150, "ignore_eos": True}
    barrier = threading.Barrier(30)
    client = httpx.Client(base_url=small_cap.base_url, timeout=60, limits=httpx.Limits(max_connections=40))

    def one(_):
        barrier.wait()
        start = time.monotonic()
        r = client.post("/v1/completions", json=body)
        return r, time.monotonic() - start

    with client, ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert len(refused) >= 20, statuses
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r, _ in refused)
    assert sorted(t for _, t in refused)[len(refused) // 2] < 2.0  # refused without waiting for anything
    assert small_cap.ctx.admission.peak <= 4
    _wait_idle(small_cap.ctx)


def test_fan_out_counts_sequences(small_cap):
    base = small_cap.base_url
    r = _post(base, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 8, "n": 16, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = _post(base, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 3, "n": 2, "max_tokens": 2})
    assert r.status_code == 400, r.text  # 6 sequences can never fit a cap of 4
    r = _post(base, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 65, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(base, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    r = _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    _wait_idle(small_cap.ctx)


def test_render_lanes_are_bounded_separate_and_time_limited(small_cap):
    """Large work fills its own lane; a small chat still renders; large work past the limit is a 503."""
    ctx, release = small_cap.ctx, threading.Event()
    large = ctx.limits.small_request_chars + 1

    async def block_large_lane():
        tasks = [asyncio.ensure_future(ctx.run_blocking(release.wait, 30, size=large)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(APIError) as refused:
            await ctx.run_blocking(time.sleep, 0, size=large)  # queued behind the two: times out after 1 s
        assert refused.value.status == 503
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        start = time.monotonic()
        r = await asyncio.to_thread(_post, small_cap.base_url, "/v1/chat/completions", chat)
        assert r.status_code == 200 and time.monotonic() - start < 10
        release.set()
        for t in tasks:
            with pytest.raises(APIError):
                await t  # they overran the limit too (the worker itself finishes once released)

    try:
        asyncio.run(block_large_lane())
    finally:
        release.set()


def test_over_length_text_is_refused_before_tokenizing(small_cap):
    huge = "lorem ipsum " * 350_000  # 4.2 MB
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
        ("/v1/completions", {"prompt": huge}),
    ]:
        start = time.monotonic()
        r = _post(small_cap.base_url, path, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert time.monotonic() - start < 5


# ---- any JSON number in any field -----------------------------------------------------------------------

EDGES = [0, -1, 1, 2, 16, 17, 20, 21, 100, 101, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63)]
EDGES += [-(2**63) - 1, 10**30, -(10**30), 0.5, -0.5, 1e-5, 1e-300, 5e-324, -0.0, 1.5, 2.0000001, 1e308, -1e308]
EDGES += [float("inf"), float("-inf"), float("nan")]
NUMBERS = st.one_of(
    st.sampled_from(EDGES),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
SAMPLING = [
    "n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "max_tokens", "stream", "ignore_eos", "user", "model", "stop",
    "logit_bias.5", "logit_bias.<key>", "stop_token_ids.0", "stream_options.include_usage",
]  # fmt: skip
CHAT_FIELDS = [*SAMPLING, "max_completion_tokens", "top_logprobs", "logprobs", "messages.0.content", "tools"]
CHAT_FIELDS += ["tool_choice", "response_format", "reasoning_effort", "parallel_tool_calls", "metadata.k"]
CHAT_FIELDS += ["schema.minimum", "schema.maxLength", "schema.maxItems", "tool.maxItems"]  # numbers in grammars
COMPLETION_FIELDS = [*SAMPLING, "logprobs", "best_of", "echo", "prompt", "prompt.0", "prompt.0.0"]


def _schema(keyword: str, value) -> dict:
    kind = {"minimum": "integer", "maxLength": "string", "maxItems": "array"}[keyword]
    return {"type": "object", "properties": {"a": {"type": kind, keyword: value}}, "required": ["a"]}


def _with(body: dict, field: str, value) -> dict:
    head, _, rest = field.partition(".")
    if head == "schema":
        spec = {"name": "out", "strict": True, "schema": _schema(rest, value)}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif head == "tool":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": _schema(rest, value)}}]
        body["tool_choice"] = "required"
    elif head == "metadata":
        body["metadata"] = {rest: value}
    elif head == "logit_bias" and rest == "<key>":
        body["logit_bias"] = {str(value): 1}
    elif head in ("logit_bias", "stream_options"):
        body[head] = {rest: value}
    elif head == "stop_token_ids":
        body[head] = [value]
    elif head == "prompt" and rest:
        body["prompt"] = [[value]] if rest == "0.0" else [value]
    elif head == "messages" and rest:
        body["messages"] = [{"role": "user", "content": value}]
    else:
        body[head] = value
        if head == "top_logprobs":
            body["logprobs"] = True
    return body


def _request(endpoint: str, field: str, value, stream: bool) -> tuple[str, dict]:
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    else:
        path, body = "/v1/completions", {"prompt": [1, 5, 9], "max_tokens": 3}
    body = _with({**body, "stream": stream}, field, value)
    if field in ("max_tokens", "max_completion_tokens", "min_tokens") and isinstance(value, int) and value > 64:
        body["stop"] = ["a", "e", "i", "o", "u", " "]  # a valid huge budget: stop early, keep the test fast
    return path, body


def _assert_200_or_400(client: httpx.Client, endpoint: str, field: str, value, stream: bool) -> None:
    path, body = _request(endpoint, field, value, stream)
    r = client.post(path, content=json.dumps(body).encode(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code in (200, 400), (endpoint, field, value, r.status_code, r.text)
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    elif body.get("stream") is True:
        events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), (field, value)


FIELDS = [("chat", f) for f in CHAT_FIELDS] + [("completions", f) for f in COMPLETION_FIELDS]
WORST = [2**63, -(2**63) - 1, 2**31, 10**30, 1e308, -1e308, float("inf"), float("nan"), 5e-324, -1, 0, 0.5]


def test_the_worst_numbers_in_every_field_are_200_or_400(server):
    """A deterministic sweep: every field gets every number known to break something somewhere."""
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for endpoint, field in FIELDS:
            for value in WORST:
                _assert_200_or_400(client, endpoint, field, value, stream=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FIELDS), value=NUMBERS, stream=st.booleans())
def test_any_number_in_any_field_is_200_or_400(server, case, value, stream):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        _assert_200_or_400(client, *case, value, stream)


def test_after_the_numbers_the_engine_still_serves(server):
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    r = _post(server.base_url, "/v1/completions", {"prompt": [1, 5, 9], "max_tokens": 3, "temperature": 0}, AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
