"""Decode and prefill latency of ``small4 bench full``: engine steps (``ModelRunner.execute``) and bare forwards
timed on the random-weight model, each combination skipped with its reason when it does not fit."""

from __future__ import annotations

from typing import Any

import torch

from small4.bench.harness import Bench
from small4.bench.timing import (
    is_oom,
    median_ms,
    peak_bytes,
    reset_peak,
    time_device,
    time_graph,
    time_host,
)
from small4.engine.request import Request
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import ScheduledRequest, SchedulerOutput
from small4.model.context import AttentionMetadata

FILL_SCRATCH_BYTES = 4 << 30  # attention-score scratch allowed per context-filling chunk on a GPU


def _fill_chunk(bench: Bench, context: int, limit: int) -> int:
    """Largest chunk (multiple of the block size, at most ``limit``) whose attention scratch stays in budget."""
    if bench.device.type != "cuda":
        return limit
    t = bench.text
    chunk = FILL_SCRATCH_BYTES // max(1, t.num_heads * context * 12)
    chunk = max(bench.runner.block_size, chunk // bench.runner.block_size * bench.runner.block_size)
    return min(limit, chunk)


def measure_prefill(bench: Bench, length: int, chunk: int, repeats: int) -> dict[str, Any]:
    """One sequence of ``length`` random tokens, in chunks of ``chunk`` (halved until the estimate fits)."""
    if length > bench.text.max_position_embeddings:
        return {"status": "skipped", "reason": "prefill length over max_position_embeddings"}
    num_blocks = bench.blocks_for(length)
    cache = bench.cache_bytes(num_blocks)
    chunk = min(chunk, length)
    while chunk > bench.runner.block_size and bench.why_not_fit(cache, bench.chunk_activation_bytes(chunk, length)):
        chunk //= 2
    why = bench.why_not_fit(cache, bench.chunk_activation_bytes(chunk, length))
    if why:
        return {"status": "skipped", "reason": why, "prefill_len": length}
    reset_peak(bench.device)
    try:
        bench.allocate_cache(num_blocks)
        req = Request("prefill", bench.random_tokens(length, bench.seed + 7), SamplingParams())
        req.block_ids = list(range(num_blocks))
        run = lambda: bench.run_chunks(req, 0, length, chunk)  # noqa: E731
        run()  # warm-up, excluded (compilation, autotuning, allocator growth)
        seconds = [time_host(run, bench.device) for _ in range(repeats)]
        head = median_ms(bench.head_time(1, repeats=max(repeats, 3), warmup=1))
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return {"status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}", "prefill_len": length}
    finally:
        bench.release_cache()
    ms = median_ms(seconds)
    # the head runs once per chunk on the sampled row only; per-layer scaling treats the rest as layer time
    scaled = bench.scale(ms, head * -(-length // chunk))
    return {
        "status": "ok",
        "prefill_len": length,
        "chunk": chunk,
        "ms_median": ms,
        "ms_all": [s * 1e3 for s in seconds],
        "tokens_per_s": length / (ms / 1e3),
        "full_model_estimate": {**scaled, "tokens_per_s": length / (scaled["ms"] / 1e3)},
        "peak_memory_bytes": peak_bytes(bench.device),
        "cache_bytes": cache,
        "timing": "host clock around ModelRunner.execute with the device synchronised; warm-up run excluded",
    }


def measure_decode(bench: Bench, batch: int, context: int, steps: int, warmup: int) -> dict[str, Any]:
    base = {"batch_size": batch, "context": context}
    total = context + warmup + steps + 1  # +1: the fixed position the forward-only timing rewrites
    if total > bench.text.max_position_embeddings:
        return {**base, "status": "skipped", "reason": "context + steps over max_position_embeddings"}
    per_seq = bench.blocks_for(total)
    cache = bench.cache_bytes(batch * per_seq)
    fill_chunk = _fill_chunk(bench, context, limit=8192)
    activations = max(bench.chunk_activation_bytes(fill_chunk, context), bench.chunk_activation_bytes(batch, 1))
    activations += batch * bench.text.num_heads * context * 4  # padded-attention scratch of a decode step
    why = bench.why_not_fit(cache, activations)
    if why:
        return {**base, "status": "skipped", "reason": why, "cache_bytes": cache}
    reset_peak(bench.device)
    try:
        return {**base, **_decode(bench, batch, context, steps, warmup, per_seq, fill_chunk), "cache_bytes": cache}
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return {**base, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}", "cache_bytes": cache}
    finally:
        bench.release_cache()


def _decode(bench: Bench, B: int, ctx: int, steps: int, warmup: int, per_seq: int, chunk: int) -> dict[str, Any]:
    runner, device = bench.runner, bench.device
    bench.allocate_cache(B * per_seq)
    prompt = bench.random_tokens(ctx, bench.seed + ctx)  # one list shared by every request
    reqs = []
    for i in range(B):
        req = Request(f"seq{i}", prompt, SamplingParams())
        req.block_ids = list(range(i * per_seq, (i + 1) * per_seq))
        reqs.append(req)
    # fill: prefill the first sequence once per context (kept aside for the other batch sizes), then copy its
    # context blocks to every sequence of the batch
    ctx_blocks = bench.blocks_for(ctx)
    fill_s, reused = None, bench.filled is not None and bench.filled[0] == ctx
    with torch.inference_mode():
        if reused:
            for cache, saved in zip(runner.kv_caches, bench.filled[1], strict=True):
                cache[:ctx_blocks] = saved
        else:
            bench.filled = None
            fill_s = time_host(lambda: bench.run_chunks(reqs[0], 0, ctx, chunk), device)
            bench.filled = (ctx, [cache[:ctx_blocks].clone() for cache in runner.kv_caches])
        src = torch.arange(ctx_blocks, device=device)
        for i in range(1, B):
            for cache in runner.kv_caches:
                cache[i * per_seq : i * per_seq + ctx_blocks] = cache[src]
    first = bench.random_tokens(B, bench.seed + 1)
    for req, tok in zip(reqs, first, strict=True):
        req.output_token_ids.append(tok)
    if bench.graphs:  # engine steps replay a captured decode graph, as serving does
        runner.capture_decode_graphs(per_seq, max_batch=B, batch_sizes=[B])

    def step(s: int) -> None:
        plan = SchedulerOutput([ScheduledRequest(r, 1, ctx + s, samples=True) for r in reqs])
        tokens = runner.execute(plan).logits.argmax(dim=-1).tolist()
        for r, t in zip(reqs, tokens, strict=True):
            r.output_token_ids.append(t)

    step_s = []
    for s in range(warmup + steps):
        elapsed = time_host(lambda s=s: step(s), device)
        if s >= warmup:
            step_s.append(elapsed)
    # forward only: prebuilt inputs at one fixed position (its slot is rewritten each time)
    pos = ctx + warmup + steps
    slots = torch.tensor([runner.slot(r, pos) for r in reqs], device=device)
    tables = torch.tensor([r.block_ids for r in reqs], dtype=torch.int32, device=device)
    ids = torch.tensor(bench.random_tokens(B, bench.seed + 2), device=device)
    positions = torch.full((B,), pos, device=device)

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        # a fresh metadata object per forward, as every engine step makes one: its per-step work (the decode split,
        # the rope rows) is timed, not cached from the previous repeat
        meta = AttentionMetadata(list(range(B + 1)), [pos + 1] * B, slots, tables, runner.block_size)
        return runner.model.compute_logits(runner.model(ids, positions, meta, runner.kv_caches))

    fwd_s = time_device(forward, device, repeats=max(steps, 3), warmup=max(warmup, 1))
    graph = None
    if bench.graphs:
        graph = time_graph(forward, device, repeats=max(steps, 3), warmup=max(warmup, 1))
    head_ms = median_ms(bench.head_time(B, repeats=max(steps, 3), warmup=1))
    step_ms, fwd_ms = median_ms(step_s), median_ms(fwd_s)
    scaled = bench.scale(fwd_ms, head_ms)
    host_ms = max(step_ms - fwd_ms, 0.0)  # the engine's per-step host work, beside the device time
    full_step_ms = scaled["ms"] + host_ms
    return {
        "status": "ok",
        "step_ms_median": step_ms,
        "step_ms_all": [s * 1e3 for s in step_s],
        "tokens_per_s": B / (step_ms / 1e3),
        "forward_ms_median": fwd_ms,
        "forward_ms_all": [s * 1e3 for s in fwd_s],
        "forward_tokens_per_s": B / (fwd_ms / 1e3),
        "full_model_estimate": {
            **scaled,
            "forward_tokens_per_s": B / (scaled["ms"] / 1e3),
            "step_ms": full_step_ms,
            "tokens_per_s": B / (full_step_ms / 1e3),
        },
        "forward_graph": _graph_entry(bench, graph, head_ms, B),
        "steps_replay_graphs": runner.decode_graphs is not None,
        "fill_seconds": fill_s,
        "fill_reused": reused,
        "fill_chunk": chunk,
        "peak_memory_bytes": peak_bytes(device),
    }


def _graph_entry(bench: Bench, graph: dict[str, Any] | None, head_ms: float, B: int) -> dict[str, Any] | None:
    if graph is None or graph["status"] != "ok":
        return graph
    scaled = bench.scale(graph["ms_median"], head_ms)
    return {
        **graph,
        "tokens_per_s": B / (graph["ms_median"] / 1e3),
        "full_model_estimate": {**scaled, "tokens_per_s": B / (scaled["ms"] / 1e3)},
    }
