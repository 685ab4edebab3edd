"""The serving part of ``small4 bench full``: TTFT, TPOT and ITL percentiles of the real engine at a fixed
concurrency, on the benchmark's random-weight model.

The engine (scheduler, chunked prefill, sampling, detokenizer, decode CUDA graphs when ``--cuda-graph``) runs
exactly as the server drives it, minus HTTP: a closed loop keeps ``concurrency`` requests in flight, a new one
arriving as soon as one finishes, each with a fresh random prompt (no prefix-cache hits) and a fixed output length
(EOS ignored). A token's time is when the step that produced it returned. Definitions follow vLLM's benchmark:
TTFT = first token - arrival; TPOT = (last - first) / (tokens - 1) per request; ITL = every gap between two
consecutive tokens of a request.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from small4.engine.engine import Engine
from small4.engine.sampling_params import SamplingParams
from small4.tokenizer import TekkenVocab, Tokenizer
from small4.weights.tekken_tiny import NUM_SPECIAL_TOKENS, special_tokens, write_tiny_tekken

if TYPE_CHECKING:
    from small4.bench.harness import Bench


@dataclass
class _Timeline:
    arrival: float
    token_times: list[float] = field(default_factory=list)


def bench_tokenizer(vocab_size: int) -> Tokenizer | TekkenVocab:
    """A v15 tekken tokenizer with exactly the model's vocabulary (the engine detokenizes every token): the
    mistral-common one users run. Where mistral-common is not installed (a bare CUDA image), a ``TekkenVocab`` of
    the same specials and byte-level pieces (the 256 single bytes, then two-letter ASCII merges): the detokenizer
    does the same work per token, which is all a benchmark asks of the tokenizer."""
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        specials = [t["token_str"] for t in special_tokens()]
        letters = [bytes([c]) for c in range(33, 127)]
        merges = (b"".join(p) for n in (2, 3) for p in itertools.product(letters, repeat=n))
        pieces = [bytes([b]) for b in range(256)]
        pieces += itertools.islice(merges, vocab_size - len(specials) - len(pieces))
        return TekkenVocab(specials, pieces)
    with tempfile.TemporaryDirectory(prefix="small4-bench-tok-") as tmp:
        write_tiny_tekken(f"{tmp}/tekken.json", vocab_size - NUM_SPECIAL_TOKENS)
        return Tokenizer.from_file(tmp)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 and mean, in milliseconds (values in seconds)."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    ms = sorted(v * 1e3 for v in values)

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(ms)}


def measure_serving(
    bench: Bench, tokenizer: Tokenizer, concurrency: int, input_len: int, output_len: int, num_requests: int
) -> dict[str, Any]:
    base = {"concurrency": concurrency, "input_len": input_len, "output_len": output_len}
    per_seq = bench.blocks_for(input_len + output_len)
    cache = bench.cache_bytes(concurrency * per_seq)
    chunk = bench.runner.engine_cfg.max_num_batched_tokens
    why = bench.why_not_fit(cache, bench.chunk_activation_bytes(min(chunk, input_len), input_len))
    if why:
        return {**base, "status": "skipped", "reason": why, "cache_bytes": cache}
    runner, saved_cfg = bench.runner, bench.runner.engine_cfg
    bench.allocate_cache(concurrency * per_seq)
    runner.configure(
        replace(
            saved_cfg,
            max_num_seqs=concurrency,
            max_model_len=input_len + output_len,
            enable_prefix_caching=False,
            enforce_eager=not bench.cuda_graph,
            async_scheduling=bench.async_scheduling,
        )
    )
    try:
        engine = Engine(runner, tokenizer)  # captures the decode graphs here, before any timing
        _run_closed_loop(engine, bench, 1, min(input_len, 16), 4, concurrency=1, seed=-1)  # compile kernels
        timelines, wall = _run_closed_loop(engine, bench, num_requests, input_len, output_len, concurrency, seed=0)
        spec = engine.spec.stats if engine.spec is not None else None
    finally:
        runner.configure(saved_cfg)
        bench.release_cache()
    result = {**base, "status": "ok", "num_requests": num_requests, "cache_bytes": cache, **_summarise(timelines, wall)}
    if spec is not None:  # speculation on: how much of it the target accepted
        result |= {"acceptance_rate": spec.acceptance_rate, "mean_accepted_length": spec.mean_accepted_length}
    return result


def _run_closed_loop(
    engine: Engine, bench: Bench, num_requests: int, input_len: int, output_len: int, concurrency: int, seed: int
) -> tuple[list[_Timeline], float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    timelines: dict[str, _Timeline] = {}
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        rid = f"serve-{seed}-{submitted}"
        prompt = bench.random_tokens(input_len, bench.seed * 1_000_003 + seed * 10_007 + submitted)
        timelines[rid] = _Timeline(time.perf_counter())
        engine.add_request(rid, prompt, params)
        submitted += 1

    start = time.perf_counter()
    while submitted < min(concurrency, num_requests):
        submit()
    while engine.has_unfinished():
        outputs = engine.step()  # sampling reads the logits on the host: the step's work is done on return
        now = time.perf_counter()
        for out in outputs:
            timelines[out.request_id].token_times.extend([now] * len(out.new_token_ids))
            if out.finished and submitted < num_requests:
                submit()
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
    return list(timelines.values()), time.perf_counter() - start


def _summarise(timelines: list[_Timeline], wall: float) -> dict[str, Any]:
    ttft = [t.token_times[0] - t.arrival for t in timelines if t.token_times]
    tpot = [
        (t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in timelines if len(t.token_times) > 1
    ]
    itl = [b - a for t in timelines for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    out_tokens = sum(len(t.token_times) for t in timelines)
    return {
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
        "ttft": percentiles(ttft),
        "tpot": percentiles(tpot),
        "itl": percentiles(itl),
    }


# ---- `small4 bench serving`: the HTTP server, engine inline vs in its own process ------------------------------------
def add_parser(sub: Any) -> None:
    from small4.bench.results import int_list, positive_int

    p = sub.add_parser(
        "serving", help="streams through a real server: engine in the API process vs its own process, side by side"
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random one, seed 7)")
    p.add_argument("--modes", default="inline,separate", help="--engine-process values to run, in order")
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 64])
    p.add_argument("--input-len", type=positive_int, default=32)
    p.add_argument("--output-len", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=2, help="requests per stream slot at each concurrency")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="result path (default bench/results/serving-<time>.json)")
    p.set_defaults(func=run_http)


def run_http(args: Any) -> int:
    """Each mode: ``small4 serve`` as a subprocess, a warm-up request, then a closed loop of streamed completions
    per concurrency (EOS ignored, ``output_len`` tokens each, random prompts); client-side TTFT / ITL, output tok/s,
    and the CPU seconds the API process and the core process spent (``/proc``), per output token."""
    import json

    from small4.bench.results import write_result

    model_dir = args.model
    if model_dir is None:
        from small4.weights.tiny import make_tiny

        model_dir = str(make_tiny(tempfile.mkdtemp(prefix="small4-bench-serving-"), layout="hf", seed=7))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, Any] = {mode: _bench_mode(model_dir, mode, args) for mode in modes}
    if {"inline", "separate"} <= set(results):
        results["separate_over_inline"] = {
            str(c): {
                key: _ratio(results["separate"][str(c)], results["inline"][str(c)], key)
                for key in ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "api_cpu_us_per_token")
            }
            for c in args.concurrency
        }
    config = {k: v for k, v in vars(args).items() if k not in ("func", "argv")} | {"model": model_dir}
    path = write_result("serving", config, {"results": results}, args.out, device=args.device)
    print(json.dumps(results.get("separate_over_inline", results), indent=2))
    print(f"wrote {path}")
    return 0


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


def _bench_mode(model_dir: str, mode: str, args: Any) -> dict[str, Any]:
    import asyncio
    import socket
    import subprocess
    import sys

    from small4.server.health import wait_healthy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "small4.cli", "serve", model_dir, "--port", str(port), "--engine-process", mode]
    cmd += ["--device", args.device, "--max-num-seqs", str(max(args.concurrency)), "--kv-cache-memory", "256MiB"]
    cmd += ["--max-queue", "1024", "--no-web-ui", "--max-model-len", str(args.input_len + args.output_len + 8)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, alive=lambda: proc.poll() is None)
        pids = [proc.pid, *_children(proc.pid)]
        out: dict[str, Any] = {}
        asyncio.run(_closed_loop_http(base, args, 1, 1, seed=-1))  # warm-up
        for c in args.concurrency:
            cpu_before = [_cpu_s(pid) for pid in pids]
            summary = asyncio.run(_closed_loop_http(base, args, c, c * args.rounds, seed=c))
            cpu = [after - before for after, before in zip((_cpu_s(pid) for pid in pids), cpu_before, strict=True)]
            tokens = summary["output_tokens"]
            summary["api_cpu_us_per_token"] = round(1e6 * cpu[0] / tokens, 1) if tokens else None
            summary["core_cpu_us_per_token"] = round(1e6 * cpu[1] / tokens, 1) if tokens and len(cpu) > 1 else None
            out[str(c)] = summary
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc."""
    import os
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _closed_loop_http(base: str, args: Any, concurrency: int, num_requests: int, seed: int) -> dict[str, Any]:
    import asyncio
    import json
    import random

    import httpx

    rng = random.Random(seed)
    timelines: list[_Timeline] = []
    tokens = [0]
    todo = iter(range(num_requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in todo:
            prompt = [1] + [rng.randrange(1000, 3000) for _ in range(args.input_len - 1)]
            body = {"prompt": prompt, "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0}
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            line_times = _Timeline(time.perf_counter())
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("usage"):
                        tokens[0] += chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        line_times.token_times.append(time.perf_counter())
            timelines.append(line_times)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [t.token_times[0] - t.arrival for t in timelines if t.token_times]
    itl = [b - a for t in timelines for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    return {
        "num_requests": num_requests,
        "wall_s": round(wall, 3),
        "output_tokens": tokens[0],
        "output_tokens_per_s": round(tokens[0] / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": percentiles(ttft)["p50_ms"],
        "itl_p50_ms": percentiles(itl)["p50_ms"],
        "ttft": percentiles(ttft),
        "itl": percentiles(itl),
    }
