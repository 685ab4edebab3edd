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
    from small4.bench.fullscale import Bench


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
    chunk = bench.runner.engine_cfg.max_num_batched_tokens or 8192
    why = bench.why_not_fit(cache, bench.chunk_activation_bytes(min(chunk, input_len), input_len))
    if why:
        return {**base, "status": "skipped", "reason": why, "cache_bytes": cache}
    runner, saved_cfg = bench.runner, bench.runner.engine_cfg
    bench.allocate_cache(concurrency * per_seq)
    runner.engine_cfg = replace(
        saved_cfg,
        max_num_seqs=concurrency,
        max_model_len=input_len + output_len,
        enable_prefix_caching=False,
        enforce_eager=not bench.cuda_graph,
    )
    try:
        engine = Engine.from_runner(runner, tokenizer)  # captures the decode graphs here, before any timing
        _run_closed_loop(engine, bench, 1, min(input_len, 16), 4, concurrency=1, seed=-1)  # compile kernels
        timelines, wall = _run_closed_loop(engine, bench, num_requests, input_len, output_len, concurrency, seed=0)
        bench.last_spec_stats = engine.spec.stats if engine.spec is not None else None
    finally:
        runner.engine_cfg = saved_cfg
        bench.release_cache()
    return {**base, "status": "ok", "num_requests": num_requests, "cache_bytes": cache, **_summarise(timelines, wall)}


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
