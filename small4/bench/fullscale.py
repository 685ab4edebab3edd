"""``small4 bench full``: decode and prefill throughput at the real Mistral Small 4 shapes, on random weights.

No checkpoint is needed: ``small4.bench.synthetic`` builds the model on the device with random BF16 or FP8
weights (``--layers L`` keeps the first L of the 36 layers, so a layer-scaled model fits a smaller GPU) and puts
a ModelRunner around it. What is measured, all into one JSON file (``small4.bench.results``):

- decode: for each (batch, context), one sequence's context is prefilled once with random tokens (in chunks that
  fit), its latent blocks are copied to the other sequences of the batch (each sequence owns its blocks, so every
  step reads B separate caches), then ``decode_steps`` whole-batch steps are timed after ``warmup_steps`` untimed
  ones. Two times per step: ``step`` is ``ModelRunner.execute`` plus greedy argmax and ``.tolist()`` as the engine
  does it (host metadata included, scheduler and sampler not), synchronised and read off the host clock; ``forward``
  is the model forward + logits alone on prebuilt inputs, timed with CUDA events (device time). Medians.
  Combos that do not fit (latent cache + activations over free memory, or over ``--max-cache-memory``) are skipped
  with the reason recorded; an out-of-memory error while running one is recorded the same way.
- prefill: one sequence of ``--prefill-len`` tokens in one forward (chunked only if that cannot fit).
- peak memory (``torch.cuda.max_memory_allocated``) per measurement and overall.
- roofline for batch-1 decode: the bytes one step must read (attention, router, shared expert, the top-k routed
  experts of every layer, lm_head, the latent cache of the context) over the HBM bandwidth of the device, beside
  the measured step; and a device-to-device copy measured on the spot as the achievable bandwidth.
- with ``--layers L`` every time is also scaled to the full model: ``head + per_layer * full_layers``, where
  ``head`` (embedding, final norm, lm_head) is timed on its own and ``per_layer = (forward - head) / L``.
- ``--reference``: the same weights (dequantised to BF16) through transformers ``Mistral4ForCausalLM.generate`` at
  batch 1 and 8, when transformers is installed and the copy fits beside small4's model.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from small4.bench.results import device_name, int_list, positive_int, write_result
from small4.bench.serving import bench_tokenizer, measure_serving
from small4.bench.synthetic import (
    FULL_SPEC,
    TINY_BENCH_SPEC,
    WeightDtype,
    build_random_model,
    model_config,
)
from small4.config import EngineConfig, parse_bytes
from small4.engine.cuda_graphs import DecodeGraphs
from small4.engine.model_runner import ModelRunner
from small4.engine.request import Request
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import ScheduledRequest, SchedulerOutput
from small4.kernels.backend import kernel_backend
from small4.model.context import AttentionMetadata
from small4.parallel.config import ParallelConfig
from small4.parallel.plan import ShardPlan
from small4.parallel.spmd import agree_any, finish, start_ranks
from small4.parallel.state import Dist
from small4.parallel.tp import parallelize
from small4.weights.quant import dequantize_fp8
from small4.weights.tiny import TinySpec, hf_config

# Datasheet HBM bandwidth, bytes/s, matched against the device name in order (most specific first).
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
)
FIRST_REGULAR_TOKEN = 1000
FILL_SCRATCH_BYTES = 4 << 30  # attention-score scratch allowed per context-filling chunk on a GPU
HEADROOM_BYTES = 1 << 30  # left free besides every estimate (allocator fragmentation, Triton scratch)
CPU_CACHE_BUDGET = 1 << 30


def hbm_bandwidth(name: str) -> float | None:
    """Datasheet bandwidth of a known GPU (H100 SXM 3.35 TB/s, H200 4.8 TB/s), None when unknown."""
    for key, bw in HBM_BANDWIDTH:
        if key in name:
            return bw
    return None


# ---- timing -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn`` with the device drained before and after (what a synchronous engine step costs)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_device(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``, ``warmup`` calls first and excluded: CUDA events on a GPU, else host clock."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return [time_host(fn, device) for _ in range(repeats)]
    _sync(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    _sync(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def time_graph(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """``fn`` captured once as a CUDA graph and replayed (what the step costs without launch gaps); a capture that
    fails (a host sync or a host-to-device copy inside ``fn``) is recorded as the error, not raised."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        seconds = time_device(graph.replay, device, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - any capture failure is a result to report
        torch.cuda.synchronize(device)
        first = str(e).splitlines()[0] if str(e) else ""
        return {"status": "failed", "error": f"{type(e).__name__}: {first}"}
    return {"status": "ok", "ms_median": _median_ms(seconds), "ms_all": [t * 1e3 for t in seconds]}


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Achievable device memory bandwidth: a large device-to-device copy, bytes read + written per second."""
    if device.type != "cuda":
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_device(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * nbytes / statistics.median(seconds)


# ---- memory -------------------------------------------------------------------------------------------------
def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---- the model under test -----------------------------------------------------------------------------------
@dataclass
class Bench:
    """The random model, its runner and the shapes the estimates need."""

    runner: ModelRunner
    spec: TinySpec
    full_layers: int
    weights: WeightDtype
    device: torch.device
    max_cache_memory: int | None
    seed: int
    cuda_graph: bool = False
    filled: tuple[int, list[torch.Tensor]] | None = None  # (context, first sequence's latent blocks per layer)
    dist: Dist | None = None  # this rank's process group when the model is split (every rank runs the bench)

    @property
    def model(self):
        return self.runner.model

    @property
    def graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs: asked for, on CUDA, and with the Triton kernels (the
        reference kernels read lengths on the host, which a capture cannot do), as the engine decides it."""
        return self.cuda_graph and self.device.type == "cuda" and kernel_backend(self.device) == "triton"

    @property
    def text(self):
        return self.runner.config.text

    @property
    def layers(self) -> int:
        return self.text.num_layers

    def cache_bytes(self, num_blocks: int) -> int:
        itemsize = torch.empty((), dtype=self.runner.cache_dtype).element_size()
        layers = self.layers + self.runner._draft_layers  # a draft's latent caches share the blocks
        return layers * num_blocks * self.runner.block_size * self.text.latent_dim * itemsize

    def allocate_cache(self, num_blocks: int) -> None:
        self.runner.kv_caches = []
        _free_bytes(self.device)
        t = self.text
        shape = (num_blocks + 1, self.runner.block_size, t.latent_dim)  # + the padding block of graph steps
        self.runner.kv_caches = [
            torch.empty(shape, dtype=self.runner.cache_dtype, device=self.device) for _ in range(self.layers)
        ]
        self.runner.draft_kv_caches = [
            torch.empty_like(self.runner.kv_caches[0]) for _ in range(self.runner._draft_layers)
        ]
        self.runner.num_blocks = num_blocks
        self.runner.pad_block = num_blocks

    def release_cache(self) -> None:
        self.runner.kv_caches = []
        self.runner.draft_kv_caches = []
        self.runner.decode_graphs = None
        _free_bytes(self.device)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.runner.block_size)

    def chunk_activation_bytes(self, chunk: int, context: int) -> int:
        """Rough peak activations of a ``chunk``-token forward against a ``context``-token cache: the reference
        attention's [H, chunk, context] scores (bf16 product, float32 masked copy and softmax, bf16 probs) plus
        the MoE and projection intermediates, and the float32 logits of the sampled rows."""
        t = self.text
        # CPU SDPA materialises scores; a GPU runs flash attention over expanded K/V (3 x 128 wide per head)
        scores = 0 if self.device.type == "cuda" else t.num_heads * chunk * context * 12
        scores += context * t.num_heads * (2 * t.qk_head_dim + t.v_head_dim) * 2 if chunk > 1 else 0
        moe = chunk * t.num_experts_per_tok * 3 * t.moe_intermediate_size * 4 * 2
        proj = chunk * (16 * t.hidden_size + 4 * t.num_heads * (t.kv_lora_rank + t.qk_head_dim + t.v_head_dim))
        return scores + moe + proj + 8 * t.vocab_size

    def why_not_fit(self, cache_bytes: int, activation_bytes: int) -> str | None:
        """Why a run needing this much does not fit (None: it fits); split over ranks, it fits only on all."""
        why = self._why_not_fit_here(cache_bytes, activation_bytes)
        if agree_any(why is not None, self.dist):
            return why or "does not fit on another rank"
        return None

    def _why_not_fit_here(self, cache_bytes: int, activation_bytes: int) -> str | None:
        if self.max_cache_memory is not None and cache_bytes > self.max_cache_memory:
            return f"latent cache needs {_gib(cache_bytes)}, over --max-cache-memory {_gib(self.max_cache_memory)}"
        free = _free_bytes(self.device)
        if free is not None and cache_bytes + activation_bytes + HEADROOM_BYTES > free:
            return (
                f"needs {_gib(cache_bytes)} of latent cache + ~{_gib(activation_bytes)} of activations "
                f"+ {_gib(HEADROOM_BYTES)} headroom, {_gib(free)} free"
            )
        return None

    def random_tokens(self, n: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(FIRST_REGULAR_TOKEN, self.text.vocab_size, (n,), generator=g).tolist()

    def run_chunks(self, req: Request, start: int, end: int, chunk: int) -> None:
        """Prefills tokens [start, end) of ``req`` through ``ModelRunner.execute``, ``chunk`` tokens a step."""
        for s in range(start, end, chunk):
            n = min(chunk, end - s)
            self.runner.execute(SchedulerOutput([ScheduledRequest(req, n, s, samples=s + n == end)]))

    def head_time(self, num_tokens: int, repeats: int, warmup: int) -> list[float]:
        """Device time of the parts outside the layers: embedding, final norm, lm_head of ``num_tokens`` rows."""
        ids = torch.randint(FIRST_REGULAR_TOKEN, self.text.vocab_size, (num_tokens,), device=self.device)
        m = self.model

        @torch.inference_mode()
        def head() -> torch.Tensor:
            return m.compute_logits(m.norm(m.embed_tokens(ids)))

        return time_device(head, self.device, repeats, warmup)

    def scale(self, total_ms: float, head_ms: float) -> dict[str, float]:
        per_layer = max(total_ms - head_ms, 0.0) / self.layers
        return {"head_ms": head_ms, "per_layer_ms": per_layer, "ms": head_ms + per_layer * self.full_layers}


def _gib(n: int) -> str:
    """Human-readable bytes (the name is historic: small sizes print in KiB or MiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _fill_chunk(bench: Bench, context: int, limit: int) -> int:
    """Largest chunk (multiple of the block size, at most ``limit``) whose attention scratch stays in budget."""
    if bench.device.type != "cuda":
        return limit
    t = bench.text
    chunk = FILL_SCRATCH_BYTES // max(1, t.num_heads * context * 12)
    chunk = max(bench.runner.block_size, chunk // bench.runner.block_size * bench.runner.block_size)
    return min(limit, chunk)


# ---- measurements -------------------------------------------------------------------------------------------
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
    _reset_peak(bench.device)
    try:
        bench.allocate_cache(num_blocks)
        req = Request("prefill", bench.random_tokens(length, bench.seed + 7), SamplingParams())
        req.block_ids = list(range(num_blocks))
        run = lambda: bench.run_chunks(req, 0, length, chunk)  # noqa: E731
        run()  # warm-up, excluded (compilation, autotuning, allocator growth)
        seconds = [time_host(run, bench.device) for _ in range(repeats)]
        head = _median_ms(bench.head_time(1, repeats=max(repeats, 3), warmup=1))
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        return {"status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}", "prefill_len": length}
    finally:
        bench.release_cache()
    ms = _median_ms(seconds)
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
        "peak_memory_bytes": _peak(bench.device),
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
    _reset_peak(bench.device)
    try:
        return {**base, **_decode(bench, batch, context, steps, warmup, per_seq, fill_chunk), "cache_bytes": cache}
    except RuntimeError as e:
        if not _is_oom(e):
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
        runner.decode_graphs = DecodeGraphs(
            runner.model, runner.kv_caches, runner.pad_block, per_seq, max_batch=B, batch_sizes=[B]
        )

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
    head_ms = _median_ms(bench.head_time(B, repeats=max(steps, 3), warmup=1))
    step_ms, fwd_ms = _median_ms(step_s), _median_ms(fwd_s)
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
        "peak_memory_bytes": _peak(device),
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


# ---- roofline -----------------------------------------------------------------------------------------------
def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_bytes(bench: Bench, context: int) -> dict[str, Any]:
    """Bytes one batch-1 decode step must read: every weight it touches once, and the context's latent rows."""
    layer = bench.model.layers[0]
    mlp, t = layer.mlp, bench.text
    experts = mlp.experts
    per_expert = experts.w13[0].numel() * experts.w13.element_size() + experts.w2[0].numel() * experts.w2.element_size()
    itemsize = torch.empty((), dtype=bench.runner.cache_dtype).element_size()
    per_layer = {
        "attention": _bytes(layer.self_attn) + _bytes(layer.input_layernorm) + _bytes(layer.post_attention_layernorm),
        "router": _bytes(mlp.gate),
        "shared_expert": _bytes(mlp.shared_experts) if mlp.shared_experts is not None else 0,
        "routed_experts": t.num_experts_per_tok * per_expert,
        "latent_cache": context * t.latent_dim * itemsize,
    }
    m = bench.model
    outside = (
        _bytes(m.lm_head) + _bytes(m.norm) + m.embed_tokens.weight[0].numel() * m.embed_tokens.weight.element_size()
    )
    layer_total = sum(per_layer.values())
    return {
        "per_layer": {**per_layer, "total": layer_total},
        "lm_head_norm_embedding_row": outside,
        "total": outside + bench.layers * layer_total,
        "full_model_total": outside + bench.full_layers * layer_total,
    }


def roofline(bench: Bench, decode: list[dict[str, Any]], bandwidth: float | None, measured: float | None) -> list[dict]:
    rows = []
    for run in decode:
        if run["batch_size"] != 1:
            continue
        b = decode_bytes(bench, run["context"])
        row: dict[str, Any] = {
            "context": run["context"],
            "bytes_per_step": b,
            "hbm_bandwidth_bytes_per_s": bandwidth if bandwidth is not None else "unknown",
            "measured_copy_bandwidth_bytes_per_s": measured,
        }
        for name, bw in (("datasheet", bandwidth), ("measured_copy", measured)):
            if bw is None:
                row[name] = None
                continue
            floor = b["total"] / bw * 1e3
            full_floor = b["full_model_total"] / bw * 1e3
            entry: dict[str, Any] = {"floor_ms": floor, "full_model_floor_ms": full_floor}
            if run["status"] == "ok":
                est = run["full_model_estimate"]
                entry |= {
                    "forward_ms": run["forward_ms_median"],
                    "step_ms": run["step_ms_median"],
                    "floor_over_forward": floor / run["forward_ms_median"],
                    "floor_over_step": floor / run["step_ms_median"],
                    "full_model_floor_over_forward": full_floor / est["ms"],
                    "full_model_floor_over_step": full_floor / est["step_ms"],
                }
                graph = run.get("forward_graph")
                if graph and graph["status"] == "ok":
                    entry |= {
                        "graph_ms": graph["ms_median"],
                        "floor_over_graph": floor / graph["ms_median"],
                        "full_model_floor_over_graph": full_floor / graph["full_model_estimate"]["ms"],
                    }
            row[name] = entry
        rows.append(row)
    return rows


# ---- transformers side by side ------------------------------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference_skip_reason(bench: Bench) -> str | None:
    if bench.dist is not None:
        return "not with tensor/expert parallelism (transformers runs on one device)"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install small4[test])"
    need = sum(p.numel() for p in bench.model.parameters()) * torch.empty((), dtype=bench.runner.dtype).element_size()
    free = _free_bytes(bench.device)
    if free is not None and need + 4 * HEADROOM_BYTES > free:
        return f"a dense {bench.runner.dtype} copy for transformers needs {_gib(need)}, {_gib(free)} free"
    return None


def build_reference(bench: Bench) -> Any:
    """transformers ``Mistral4ForCausalLM`` with small4's weights (dequantised) copied in by checkpoint name."""
    from transformers import Mistral4Config, Mistral4ForCausalLM

    from small4.weights.names import NameMapper, split_role

    text_cfg = hf_config(replace(bench.spec, num_layers=bench.layers), fp8=False)["text_config"]
    text_cfg.pop("model_type")
    cfg = Mistral4Config(**text_cfg)
    with _default_dtype(bench.runner.dtype), torch.device(bench.device):
        hf = Mistral4ForCausalLM(cfg).eval()
    for module in hf.modules():  # small4's softmax scale (transformers reads mscale_all_dim differently: README)
        if hasattr(module, "scaling") and hasattr(module, "qk_head_dim"):
            module.scaling = bench.runner.config.text.softmax_scale
    mapper, modules = NameMapper(bench.runner.config), dict(bench.model.named_modules())
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            base, role = split_role(name)
            dest = mapper.map(base)
            if dest is None or role != "weight":
                raise RuntimeError(f"transformers tensor {name} has no small4 counterpart")
            module = modules[dest.module]
            if dest.param == "weight" and hasattr(module, "dense_weight"):
                src = module.dense_weight(tensor.dtype)
            elif dest.param in ("w13", "w2") and not dest.index:
                _copy_experts(tensor, getattr(module, dest.param), getattr(module, f"{dest.param}_scale"))
                continue
            elif dest.param in ("w13", "w2"):
                src = module.dense(tensor.dtype)[0 if dest.param == "w13" else 1]
            else:
                src = getattr(module, dest.param)
            tensor.copy_(src[dest.index] if dest.index else src)
    return hf


def _copy_experts(out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Stacked expert weights into ``out``, dequantised one expert at a time (no full float32 copy at once)."""
    for e in range(weight.shape[0]):
        out[e].copy_(weight[e] if scale is None else dequantize_fp8(weight[e], scale[e], out.dtype))


def run_reference(bench: Bench, batch_sizes: list[int], prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Decode tokens/s of ``generate``: (time of N new tokens - time of 1) / (N - 1) steps, so prefill cancels."""
    import transformers

    hf = build_reference(bench)
    device = bench.device

    @torch.inference_mode()
    def generate(ids: torch.Tensor, n: int) -> None:
        hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=hf.config.pad_token_id,
        )

    runs = []
    n = max(new_tokens, 2)
    for b in batch_sizes:
        ids = torch.tensor([bench.random_tokens(prompt_len, bench.seed + 100 + i) for i in range(b)], device=device)
        try:
            generate(ids, 2)  # warm-up, excluded
            t1 = time_host(lambda ids=ids: generate(ids, 1), device)
            tn = time_host(lambda ids=ids: generate(ids, n), device)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            runs.append({"batch_size": b, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"})
            continue
        step = max(tn - t1, 1e-9) / (n - 1)
        runs.append({"batch_size": b, "status": "ok", "step_ms": step * 1e3, "tokens_per_s": b / step})
    return {
        "engine": f"transformers {transformers.__version__} Mistral4ForCausalLM.generate (greedy, KV cache)",
        "prompt_len": prompt_len,
        "new_tokens": n,
        "runs": runs,
    }


def _ratios(decode: list[dict[str, Any]], reference: dict[str, Any]) -> list[dict[str, Any]]:
    ours = {(r["batch_size"], r["context"]): r for r in decode if r["status"] == "ok"}
    out = []
    for ref in reference["runs"]:
        mine = ours.get((ref["batch_size"], reference["prompt_len"]))
        ok = mine is not None and ref["status"] == "ok"
        ratio = mine["tokens_per_s"] / ref["tokens_per_s"] if ok else None
        out.append(
            {"batch_size": ref["batch_size"], "context": reference["prompt_len"], "small4_over_reference": ratio}
        )
    return out


# ---- the command --------------------------------------------------------------------------------------------
def _int_list_or_none(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else int_list(text)


def build_bench(args: argparse.Namespace, d: Dist | None = None) -> Bench:
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    device = d.device if d is not None else device
    spec = TINY_BENCH_SPEC if args.tiny else FULL_SPEC
    layers = args.layers or spec.num_layers
    if layers > spec.num_layers:
        raise ValueError(f"--layers {layers}: the model has only {spec.num_layers}")
    config = model_config(spec, layers, args.dtype)
    act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine_cfg = EngineConfig(device=str(device), seed=args.seed, block_size=args.block_size)
    transform = None
    if d is not None:  # this rank's shard: the same transform as a served model
        plan = ShardPlan(config.text, parallel_config(args), d.rank)
        transform = lambda m: parallelize(m, plan, d.group)  # noqa: E731
    model = build_random_model(config, device, act_dtype, args.dtype, seed=args.seed, transform=transform)
    runner = ModelRunner.from_model(model, engine_cfg, num_blocks=1)
    budget = (
        args.max_cache_memory
        if args.max_cache_memory is not None
        else (CPU_CACHE_BUDGET if device.type == "cpu" else None)
    )
    return Bench(runner, spec, spec.num_layers, args.dtype, device, budget, args.seed, args.cuda_graph, dist=d)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    tp = args.tensor_parallel_size
    return ParallelConfig(tp, tp if args.enable_expert_parallel else 1)


def _overall_peak(build: int | None, decode: list[dict], prefill: dict, last: int | None) -> int | None:
    peaks = [build, last, prefill.get("peak_memory_bytes"), *(r.get("peak_memory_bytes") for r in decode)]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def run_full_bench(
    args: argparse.Namespace, d: Dist | None = None
) -> tuple[dict[str, Any], dict[str, Any], torch.device]:
    bench = build_bench(args, d)
    device = bench.device
    build_peak = _peak(device)  # measurements reset the peak counter: the overall peak is the max of all of them
    weights_bytes = _bytes(bench.model)
    name = device_name(device)
    bandwidth = hbm_bandwidth(name) if device.type == "cuda" else None
    measured_bw = measure_copy_bandwidth(device)
    decode = [
        measure_decode(bench, b, c, args.decode_steps, args.warmup_steps)
        for c in args.contexts
        for b in args.batch_sizes
    ]
    bench.filled = None
    prefill = measure_prefill(bench, args.prefill_len, args.prefill_chunk, args.repeats)
    serving = []
    if args.serving_concurrency:
        tokenizer = bench_tokenizer(bench.text.vocab_size)
        serving = [
            measure_serving(bench, tokenizer, c, args.serving_input_len, args.serving_output_len, max(4, 2 * c))
            for c in args.serving_concurrency
        ]
    speculative = []
    if args.serving_concurrency and args.num_speculative_tokens:
        speculative = measure_speculative(bench, bench_tokenizer(bench.text.vocab_size), args, serving)
    reference, note, ratios = None, None, None
    if args.reference:
        note = reference_skip_reason(bench)
        if note is None:
            ref_batches = [b for b in (1, 8) if b in args.batch_sizes] or [1]
            reference = run_reference(bench, ref_batches, min(args.contexts), args.decode_steps)
            _free_bytes(device)  # the transformers copy is garbage once run_reference returns
            ratios = _ratios(decode, reference)
    else:
        note = "disabled (pass --reference)"
    config = {
        "model": "tiny" if args.tiny else "mistral-small-4 shapes",
        "spec": asdict(bench.spec),
        "layers": bench.layers,
        "full_layers": bench.full_layers,
        "weights": args.dtype,
        "activation_dtype": str(bench.runner.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(bench.runner.cache_dtype).removeprefix("torch."),
        "kernels": kernel_backend(device),
        "batch_sizes": args.batch_sizes,
        "contexts": args.contexts,
        "prefill_len": args.prefill_len,
        "prefill_chunk": args.prefill_chunk,
        "serving_concurrency": args.serving_concurrency,
        "serving_input_len": args.serving_input_len,
        "serving_output_len": args.serving_output_len,
        "cuda_graph": bench.cuda_graph,
        "cuda_graph_used": bench.graphs,
        "decode_steps": args.decode_steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "block_size": args.block_size,
        "max_cache_memory": bench.max_cache_memory,
        "seed": args.seed,
        "attn_impl": bench.runner.engine_cfg.attn_impl,
        "parameters": sum(p.numel() for p in bench.model.parameters()),
        "weights_bytes": weights_bytes,  # this rank's, when split
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel_size": parallel_config(args).expert_parallel_size,
        "world_size": 1 if d is None else d.world_size,
    }
    results = {
        "decode": decode,
        "prefill": prefill,
        "serving": serving,
        "speculative": speculative,
        "memory": {
            "weights_bytes": weights_bytes,
            "peak_allocated_bytes": _overall_peak(build_peak, decode, prefill, _peak(device)),
            "device_total_bytes": torch.cuda.get_device_properties(device).total_memory
            if device.type == "cuda"
            else None,
        },
        "roofline": roofline(bench, decode, bandwidth, measured_bw),
        "reference": reference,
        "reference_note": note,
        "reference_ratio": ratios,
    }
    return config, results, device


def summary(config: dict[str, Any], results: dict[str, Any], device: str) -> str:
    lines = [
        f"small4 bench full: {config['model']}, {config['layers']}/{config['full_layers']} layers, {config['weights']} "
        f"weights, kernels {config['kernels']}, on {device}",
        f"  {'batch':>5} {'context':>8} {'step ms':>9} {'tok/s':>10} {'fwd ms':>9} {'full-model tok/s':>17}",
    ]
    for r in results["decode"]:
        if r["status"] != "ok":
            lines.append(f"  {r['batch_size']:>5} {r['context']:>8}  skipped: {r['reason']}")
            continue
        est = r["full_model_estimate"]
        lines.append(
            f"  {r['batch_size']:>5} {r['context']:>8} {r['step_ms_median']:9.2f} {r['tokens_per_s']:10.1f} "
            f"{r['forward_ms_median']:9.2f} {est['tokens_per_s']:17.1f}"
        )
    p = results["prefill"]
    if p["status"] == "ok":
        lines.append(
            f"  prefill {p['prefill_len']} tokens: {p['tokens_per_s']:.0f} tok/s "
            f"(full model ~{p['full_model_estimate']['tokens_per_s']:.0f})"
        )
    else:
        lines.append(f"  prefill skipped: {p['reason']}")
    for row in results["roofline"]:
        d = row["datasheet"]
        if d and "floor_over_forward" in d:
            lines.append(
                f"  roofline batch 1, context {row['context']}: floor {d['floor_ms']:.3f} ms, forward "
                f"{d['forward_ms']:.3f} ms ({d['floor_over_forward']:.0%} of floor), step {d['step_ms']:.3f} ms"
            )
    for r in results["serving"]:
        if r["status"] != "ok":
            lines.append(f"  serving concurrency {r['concurrency']}: skipped: {r['reason']}")
            continue
        lines.append(
            f"  serving {r['input_len']} in / {r['output_len']} out, concurrency {r['concurrency']}: "
            f"{r['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {r['ttft']['p50_ms']:.1f} ms p99 "
            f"{r['ttft']['p99_ms']:.1f} ms, TPOT p50 {r['tpot']['p50_ms']:.2f} ms, ITL p99 {r['itl']['p99_ms']:.2f} ms"
        )
    for r in results.get("speculative") or []:
        if r["status"] != "ok":
            lines.append(f"  speculative concurrency {r['concurrency']}: skipped: {r['reason']}")
            continue
        lines.append(
            f"  speculative k={r['num_speculative_tokens']} (random draft), concurrency {r['concurrency']}: "
            f"{r['output_tokens_per_s']:.0f} out tok/s vs {r['plain_output_tokens_per_s']:.0f} plain, acceptance "
            f"{r['acceptance_rate']:.2f}, {r['mean_accepted_length']:.2f} tokens/step"
        )
    peak = results["memory"]["peak_allocated_bytes"]
    if peak is not None:
        lines.append(f"  peak memory {_gib(peak)}")
    for r in results["reference_ratio"] or []:
        if r["small4_over_reference"] is not None:
            lines.append(f"  small4 / transformers decode, batch {r['batch_size']}: {r['small4_over_reference']:.2f}x")
    if results["reference_note"]:
        lines.append(f"  reference: {results['reference_note']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    parallel = parallel_config(args)
    if parallel.world_size == 1:
        return _report(*run_full_bench(args), args)
    # split: every rank runs this same command on its shard (the first process starts the others)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    d, procs = start_ranks(args.argv, parallel.world_size, torch.device(auto if args.device == "auto" else args.device))
    results = run_full_bench(args, d)
    code = _report(*results, args) if d.is_driver else 0
    return max(code, finish(procs))


def _report(config: dict[str, Any], results: dict[str, Any], device: torch.device, args: argparse.Namespace) -> int:
    path = write_result("full", config, results, out=args.out, device=device)
    print(summary(config, results, device_name(device)))
    print(f"wrote {path}")
    return 0


def random_draft(bench: Bench, seed: int):
    """The released draft's architecture at the target's shapes (2 layers, MLP 12288; the tiny spec's width for
    ``--tiny``) with random weights: acceptance is near zero, so its run measures what speculation costs."""
    from small4.spec.eagle import EagleConfig, EagleDraft

    text = bench.text
    width = 12288 if text.hidden_size >= 1024 else 4 * text.hidden_size
    draft = EagleDraft(EagleConfig.from_target(text, num_layers=2, intermediate_size=width))
    draft = draft.to(device=bench.device, dtype=bench.runner.dtype)
    g = torch.Generator(device=bench.device).manual_seed(seed)
    for p in draft.parameters():
        if p.dim() == 2:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
        else:
            p.fill_(1.0)
    return draft


def measure_speculative(bench: Bench, tokenizer, args: argparse.Namespace, plain: list[dict]) -> list[dict]:
    """The serving runs again with a random draft attached (speculation on), beside the plain ones."""
    runner, saved = bench.runner, bench.runner.engine_cfg
    runner.draft = random_draft(bench, args.seed)
    runner.engine_cfg = replace(saved, num_speculative_tokens=args.num_speculative_tokens)
    out = []
    try:
        for c, base in zip(args.serving_concurrency, plain, strict=True):
            if c not in args.speculative_concurrency:
                continue
            r = measure_serving(bench, tokenizer, c, args.serving_input_len, args.serving_output_len, max(4, 2 * c))
            r["num_speculative_tokens"] = args.num_speculative_tokens
            r["plain_output_tokens_per_s"] = base.get("output_tokens_per_s")
            stats = getattr(bench, "last_spec_stats", None)
            r["acceptance_rate"] = stats.acceptance_rate if stats else 0.0
            r["mean_accepted_length"] = stats.mean_accepted_length if stats else 0.0
            out.append(r)
    finally:
        runner.draft, runner.engine_cfg = None, saved
        runner.draft_kv_caches = []
        _free_bytes(bench.device)
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``full`` under ``small4 bench``."""
    p = sub.add_parser("full", help="decode/prefill throughput and roofline at the real shapes, random weights")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke runs) instead of the real ones")
    p.add_argument("--layers", type=positive_int, help="keep only the first L decoder layers (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="fp8", help="attention and expert weight storage")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int_list, default=[1024, 32768], help="decode context lengths")
    p.add_argument("--prefill-len", type=positive_int, default=8192)
    p.add_argument(
        "--prefill-chunk", type=positive_int, default=8192, help="tokens per prefill forward (halved to fit)"
    )
    p.add_argument("--decode-steps", type=positive_int, default=20, help="timed decode steps per combo")
    p.add_argument("--warmup-steps", type=positive_int, default=3, help="untimed decode steps first")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed prefill runs (median)")
    p.add_argument(
        "--serving-concurrency",
        type=_int_list_or_none,
        default=[1, 32, 256],
        help="closed-loop serving runs through the engine at these concurrencies ('none' skips them)",
    )
    p.add_argument("--serving-input-len", type=positive_int, default=1024)
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=3,
        help="serving runs at --speculative-concurrency again with a random draft of the release's shapes (0: no)",
    )
    p.add_argument("--speculative-concurrency", type=_int_list_or_none, default=[1, 32])
    p.add_argument("--serving-output-len", type=positive_int, default=512)
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--max-cache-memory", type=parse_bytes, help="skip combos whose latent cache exceeds this")
    p.add_argument("--reference", action="store_true", help="also time transformers generate at batch 1 and 8")
    p.add_argument("--cuda-graph", action="store_true", help="also time the decode forward as a CUDA graph replay")
    p.add_argument("--device", default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, help="ranks (one process each)")
    p.add_argument("--enable-expert-parallel", action="store_true", help="partition the experts over the ranks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON path (default: bench/results/full-<UTC time>.json)")
    p.set_defaults(func=main)
