"""A bounded load test on loopback: 100 greedy streams with a quarter dropped at random, then a burst against a
small cap. Afterwards no cache block is held, no sequence is counted as admitted, no response was a 5xx other
than the burst's 503s (with Retry-After), the cap held, and the server answers exactly as before the load."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import start_server

MAX_NUM_SEQS, MAX_QUEUE = 4, 4
CAP = MAX_NUM_SEQS + MAX_QUEUE


def _greedy(i: int, stream: bool) -> dict:
    return {"prompt": f"item {i % 10}", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": stream}


def _stream(client: httpx.Client, i: int, drop: bool) -> tuple[int, str | None, bool]:
    """(status, text if the stream was read to the end, whether [DONE] came)."""
    text, done = [], False
    with client.stream("POST", "/v1/completions", json=_greedy(i, True)) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, False
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["text"])
            if drop:
                return r.status_code, None, False  # leaving the block closes the connection mid-stream
    return r.status_code, "".join(text), done


def _wait_idle(ctx, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ctx.admission.in_flight or ctx.engine.stats.num_running or ctx.engine.stats.num_waiting:
        assert time.monotonic() < deadline, "the server did not go idle"
        time.sleep(0.02)


def test_load_with_random_drops_and_a_burst(tiny_model_dir):
    s = start_server(tiny_model_dir, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE))
    try:
        with httpx.Client(base_url=s.base_url, timeout=60, limits=httpx.Limits(max_connections=40)) as client:
            reference = {i: client.post("/v1/completions", json=_greedy(i, False)).json() for i in range(10)}
            reference = {i: r["choices"][0]["text"] for i, r in reference.items()}
            dropped = set(random.Random(12).sample(range(100), 25))

            # 100 streams, 4 at a time against a cap of 8: nothing may be refused, a dropped one frees its room
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda i: _stream(client, i, i in dropped), range(100)))
            assert all(status == 200 for status, _, _ in results), [r[0] for r in results]
            for i, (_, text, done) in enumerate(results):
                if i not in dropped:
                    assert done and text == reference[i % 10], (i, text)
            _wait_idle(s.ctx)

            # a burst of 30 against the cap: the excess is refused at once, the cap holds
            s.ctx.admission.peak = 0
            barrier = threading.Barrier(30)

            def burst(i: int) -> httpx.Response:
                barrier.wait()
                return client.post("/v1/completions", json={**_greedy(i, False), "max_tokens": 60})

            with ThreadPoolExecutor(30) as pool:
                burst_results = list(pool.map(burst, range(30)))
            statuses = [r.status_code for r in burst_results]
            assert set(statuses) <= {200, 503} and statuses.count(503) >= 15, statuses
            assert all(r.headers.get("retry-after") for r in burst_results if r.status_code == 503)
            assert s.ctx.admission.peak <= CAP
            _wait_idle(s.ctx)

            # nothing leaked, and the server answers as before
            assert s.ctx.admission.in_flight == 0
            assert s.ctx.engine.engine.block_manager.usage == 0.0
            assert httpx.get(f"{s.base_url}/health", timeout=10).status_code == 200
            after = client.post("/v1/completions", json=_greedy(3, False)).json()["choices"][0]["text"]
            assert after == reference[3]
    finally:
        s.stop()
