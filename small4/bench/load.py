"""``small4 bench load``: what the server holds under load, how fast it refuses, what one image request costs.

A real server (uvicorn on loopback, in this process) over a tiny random checkpoint, with a small admission cap
(``--max-num-seqs`` + ``--max-queue``). Three figures, written as one JSON file (``small4.bench.results``):

* load held: N greedy streams, a fraction of them dropped after their first chunk, ``concurrency`` at a time;
  statuses, 5xx count, throughput, and what is left afterwards (admitted sequences, cache usage);
* rejection latency: a burst of simultaneous requests against the cap (how many got in, the peak admitted, the
  latency of the 503s), and refusals one at a time while the cap is full (the latency a client sees);
* peak RSS (VmHWM, reset just before) of one chat request holding the 6000x6000 1-bit PNG (a 21 KB upload),
  rendered in a fresh subprocess as the server renders it (``after``) and as it did before images were shrunk
  first (``before``: the full-size image handed to mistral-common).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from small4.bench.results import positive_int, write_result


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="load held, rejection latency, peak RSS per image request")
    p.add_argument("--streams", type=positive_int, default=100)
    p.add_argument("--drop-fraction", type=float, default=0.25)
    p.add_argument("--concurrency", type=positive_int, default=4)
    p.add_argument("--max-num-seqs", type=positive_int, default=4)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--burst", type=positive_int, default=30)
    p.add_argument("--max-tokens", type=positive_int, default=12)
    p.add_argument("--out", default=None, help="result path (default bench/results/load-<time>.json)")
    p.set_defaults(func=run)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "max_ms": None}
    v = sorted(values)
    return {
        "p50_ms": round(1000 * v[len(v) // 2], 2),
        "p90_ms": round(1000 * v[min(len(v) - 1, int(0.9 * len(v)))], 2),
        "max_ms": round(1000 * v[-1], 2),
    }


def _start(model_dir: Path, args: argparse.Namespace):
    from small4.server.serve import add_serve_arguments, build_from_args, make_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [str(model_dir), "--port", str(port), "--block-size", "4", "--kv-cache-memory", "8MiB"]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.max_queue)]
    parser = argparse.ArgumentParser(prog="small4 serve")
    add_serve_arguments(parser)  # the serve command's own flags, as `small4 serve` parses them
    app, ctx = build_from_args(parser.parse_args(argv))
    server = make_server(app, ctx, "127.0.0.1", port, 5.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return base, ctx, server, thread
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


def _one_stream(client: httpx.Client, body: dict[str, Any], drop: bool) -> tuple[int, int]:
    """(status, tokens received)."""
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, 0
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                tokens += 1
                if drop:
                    break
    return r.status_code, tokens


def _wait_idle(ctx, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (ctx.admission.in_flight or ctx.engine.stats.num_running) and time.monotonic() < deadline:
        time.sleep(0.02)


def _load(client: httpx.Client, ctx, args: argparse.Namespace) -> dict[str, Any]:
    dropped = set(random.Random(0).sample(range(args.streams), int(args.drop_fraction * args.streams)))
    body = {"prompt": "load", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda i: _one_stream(client, body, i in dropped), range(args.streams)))
    elapsed = time.monotonic() - start
    _wait_idle(ctx)
    statuses = [s for s, _ in results]
    return {
        "streams": args.streams,
        "dropped": len(dropped),
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "num_5xx": sum(s >= 500 for s in statuses),
        "seconds": round(elapsed, 3),
        "chunks_per_s": round(sum(t for _, t in results) / elapsed, 1),
        "admitted_after": ctx.admission.in_flight,
        "kv_cache_usage_after": ctx.engine.engine.block_manager.usage,
        "peak_admitted": ctx.admission.peak,
    }


def _burst(client: httpx.Client, ctx, args: argparse.Namespace) -> dict[str, Any]:
    ctx.admission.peak = 0
    barrier = threading.Barrier(args.burst)
    body = {"prompt": "burst", "max_tokens": 60, "ignore_eos": True}

    def one(_: int) -> tuple[int, float]:
        barrier.wait()
        start = time.monotonic()
        status = client.post("/v1/completions", json=body).status_code
        return status, time.monotonic() - start

    with ThreadPoolExecutor(args.burst) as pool:
        results = list(pool.map(one, range(args.burst)))
    peak = ctx.admission.peak
    _wait_idle(ctx)
    return {
        "requests": args.burst,
        "admitted": sum(s == 200 for s, _ in results),
        "refused_503": sum(s == 503 for s, _ in results),
        "other": sum(s not in (200, 503) for s, _ in results),
        "peak_admitted_sequences": peak,
        "cap": ctx.admission.capacity,
        "refusal_latency": _percentiles([t for s, t in results if s == 503]),
    }


def _refusals_while_full(client: httpx.Client, ctx, base: str) -> dict[str, Any]:
    """Fill the cap with long streams, then time refusals one by one (what a client sees on a busy server)."""
    body = {"prompt": "hold", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    holders = [httpx.Client(base_url=base, timeout=60) for _ in range(ctx.admission.capacity)]
    streams = [h.stream("POST", "/v1/completions", json=body) for h in holders]
    for s in streams:
        s.__enter__()
    latencies = []
    try:
        for _ in range(20):
            start = time.monotonic()
            status = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
            if status == 503:
                latencies.append(time.monotonic() - start)
    finally:
        for s, h in zip(streams, holders, strict=True):
            s.__exit__(None, None, None)
            h.close()
    _wait_idle(ctx)
    return {"refused": len(latencies), **_percentiles(latencies)}


_IMAGE_SCRIPT = """
import base64, sys, time
from small4.chat.render import ChatRenderer
from small4.tokenizer import Tokenizer
renderer = ChatRenderer(Tokenizer.from_file(sys.argv[1]).mistral)
if sys.argv[2] == "before":
    renderer._max_image_side = None
url = "data:image/png;base64," + base64.b64encode(open(sys.argv[3], "rb").read()).decode()
def status_kib(key):  # VmRSS now, VmHWM the peak since the last reset
    line = next(x for x in open("/proc/self/status") if x.startswith(key))
    return int(line.split()[1])
before = status_kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to now: the peak is the render's own
start = time.monotonic()
out = renderer.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
seconds = time.monotonic() - start
print(len(url), (status_kib("VmHWM") - before) / 1024, seconds, len(out.token_ids))
"""


def _image_rss(model_dir: Path) -> dict[str, Any]:
    from PIL import Image

    png = model_dir / "big-1bit.png"  # made here, so the child's peak RSS is the request's alone
    Image.new("1", (6000, 6000), 1).save(png, format="PNG")
    result: dict[str, Any] = {"image": "6000x6000 1-bit PNG as a data: URL"}
    for which in ("before", "after"):
        done = subprocess.run(
            [sys.executable, "-c", _IMAGE_SCRIPT, str(model_dir / "tekken.json"), which, str(png)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        url_len, rss_mib, seconds, tokens = done.stdout.split()
        result["request_bytes"] = int(url_len)
        result[which] = {
            "peak_rss_increase_mib": round(float(rss_mib), 1),
            "render_seconds": round(float(seconds), 3),
            "prompt_tokens": int(tokens),
        }
    return result


def run(args: argparse.Namespace) -> int:
    from small4.weights.tiny import make_tiny

    model_dir = make_tiny(Path(tempfile.mkdtemp(prefix="small4-load-")), layout="hf", seed=7)
    base, ctx, server, thread = _start(model_dir, args)
    try:
        with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            results = {
                "load": _load(client, ctx, args),
                "burst": _burst(client, ctx, args),
                "refusal_while_full": _refusals_while_full(client, ctx, base),
            }
            results["healthy_after"] = httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    results["image_request"] = _image_rss(model_dir)
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"model": "make_tiny(seed=7), CPU"}
    path = write_result("load", config, {"results": results}, args.out)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0
