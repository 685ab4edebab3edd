"""``small4 bench host-overhead``: the engine step's host time, piece by piece, with the model forward taken out.

A decode step of the real model is a few milliseconds of device time; whatever the engine does on the host around
it (scheduling, building the batch's tensors, filling the graph buffers, sampling bookkeeping, detokenizing) either
overlaps that time or adds to it. To measure only the host side on any machine, the model is replaced by
``NoOpModel``: a real module with the model's interface (``forward``, ``compute_logits``, ``config``) whose forward
returns a preallocated hidden state and whose logits are a fixed random table, so the runner, the graph buffers,
the sampler, the scheduler and the detokenizer all run exactly as they do around the real model. The vocabulary is
small (the tiny tokenizer's) so that the sampler's arithmetic, device work on a GPU, stays small on a CPU; torch
runs on one thread (``--threads``), as the engine's step does.

Each piece is timed by wrapping the engine's own bound methods on the instance (no code path is replaced):
``schedule``, ``execute`` (the runner: inputs, graph fill, forward, logits rows), ``graph_run`` (inside execute, the
decode-graph buffer fill + the no-op replay), ``sample``, ``update`` and ``emit``. ``step`` is the whole
``Engine.step`` (with a device synchronize). Medians over the timed decode steps, per batch size and sampling mode,
in milliseconds, both wall time (``ms_median``) and the engine thread's CPU time (``cpu_ms_median``: what the host
work costs, whatever else the machine runs; on a GPU the difference is mostly waiting for the device).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from small4.bench.results import int_list, positive_int, write_result
from small4.bench.synthetic import TINY_BENCH_SPEC, model_config
from small4.config import EngineConfig, ModelConfig
from small4.engine.engine import Engine
from small4.engine.model_runner import ModelRunner
from small4.engine.sampling_params import SamplingParams

MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_p": 0.95},
    "seeded": {"temperature": 0.8, "seed": 1},
    "penalties": {"temperature": 0.0, "repetition_penalty": 1.1, "frequency_penalty": 0.2},
}


class NoOpModel(nn.Module):
    """The model's interface without its math: ``forward`` returns a fixed hidden state, ``compute_logits`` rows of
    a fixed random table (distinct per row, so sampling and detokenizing see varied tokens)."""

    def __init__(self, config: ModelConfig, device: torch.device, max_tokens: int, max_rows: int, dtype) -> None:
        super().__init__()
        text = config.text
        self.config = config
        self.vision = None
        self.embed_tokens = nn.Embedding(1, text.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.register_buffer("hidden", torch.zeros(max_tokens, text.hidden_size, device=device, dtype=dtype))
        g = torch.Generator(device="cpu").manual_seed(0)
        table = torch.randn(max_rows, text.vocab_size, generator=g) * 4  # [rows, V]
        self.register_buffer("table", table.to(device))

    def set_attn_impl(self, impl: str) -> None:
        """Nothing to configure: there is no attention."""

    def set_backend(self, backend: str) -> None:
        """Nothing to configure: there are no kernels."""

    def forward(self, input_ids, positions, meta, kv_caches=None, inputs_embeds=None) -> torch.Tensor:
        return self.hidden[: input_ids.shape[0]]  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[: hidden.shape[0]]  # [N, V] float32


def _timed(store: dict[str, list[float]], cpu: dict[str, list[float]], name: str, fn: Callable) -> Callable:
    """Wall time and this thread's CPU time of every call: on a shared machine the wall clock also counts the time
    other processes held the core, the thread's CPU time only the work itself."""

    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name].append(time.perf_counter() - t)
            cpu[name].append(time.thread_time() - c)

    return wrapper


def build_engine(batch: int, max_model_len: int, device: torch.device, graphs: bool) -> Engine:
    """A real engine around a no-op model; decode graphs (captured on CUDA, static buffers on a CPU) if asked."""
    from small4.bench.serving import bench_tokenizer

    config = model_config(replace(TINY_BENCH_SPEC, num_layers=1))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = max(8192, batch)
    model = NoOpModel(config, device, budget, batch, dtype)
    cfg = EngineConfig(
        device=str(device), max_num_seqs=batch, max_num_batched_tokens=budget, max_model_len=max_model_len,
        enable_prefix_caching=False, enforce_eager=True,
    )  # fmt: skip
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    runner = ModelRunner(model, cfg, num_blocks=batch * blocks_per_seq)
    engine = Engine(runner, bench_tokenizer(config.text.vocab_size))
    if graphs:  # the static-buffer path of a decode step; on CUDA the no-op forward is captured too
        runner.capture_decode_graphs(blocks_per_seq, batch, batch_sizes=[batch], capture=device.type == "cuda")
    return engine


def measure(batch: int, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    max_model_len = args.prompt_len + args.warmup_steps + args.steps + 8
    engine = build_engine(batch, max_model_len, device, not args.no_graphs)
    params = SamplingParams(max_tokens=args.warmup_steps + args.steps + 4, ignore_eos=True, **MODES[mode])
    g = torch.Generator().manual_seed(batch)
    vocab = engine.tokenizer.vocab_size
    for i in range(batch):
        prompt = torch.randint(engine.tokenizer.num_special_tokens, vocab, (args.prompt_len,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything: what follows is decode only
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    runner, sched = engine.runner, engine.scheduler
    engine.runner.execute = _timed(times, cpu, "execute", runner.execute)
    if runner.decode_graphs is not None:
        runner.decode_graphs.run = _timed(times, cpu, "graph_run", runner.decode_graphs.run)
    sched.schedule = _timed(times, cpu, "schedule", sched.schedule)
    sched.update_from_output = _timed(times, cpu, "update", sched.update_from_output)
    engine._sample = _timed(times, cpu, "sample", engine._sample)
    engine._emit = _timed(times, cpu, "emit", engine._emit)

    def step() -> None:
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timed_step = _timed(times, cpu, "step", step)
    for s in range(args.warmup_steps + args.steps):
        if s == args.warmup_steps:
            times.clear()
            cpu.clear()
        timed_step()
    pieces = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    cpu_pieces = {name: statistics.median(v) * 1e3 for name, v in cpu.items()}
    return {
        "batch_size": batch,
        "mode": mode,
        "graphs": runner.decode_graphs is not None,
        "ms_median": pieces,
        "cpu_ms_median": cpu_pieces,
        "step_us_per_seq": pieces["step"] * 1e3 / batch,
        "step_cpu_us_per_seq": cpu_pieces["step"] * 1e3 / batch,
        "step_ms_all": [v * 1e3 for v in times["step"]],
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], torch.device]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )  # fmt: skip
    torch.set_num_threads(args.threads)  # the engine's step runs on one thread; more only add contention here
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}: choose from {sorted(MODES)}")
    rows = [measure(b, m, args, device) for m in args.modes for b in args.batch_sizes]
    config = {
        "batch_sizes": args.batch_sizes,
        "modes": {m: MODES[m] for m in args.modes},
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "graphs": not args.no_graphs,
        "threads": args.threads,
        "label": args.label,
    }
    return config, rows, device


def summary(rows: list[dict[str, Any]]) -> str:
    names = ["step", "schedule", "execute", "graph_run", "sample", "update", "emit"]
    lines = [f"  {'mode':>9} {'batch':>5} " + " ".join(f"{n:>9}" for n in names) + f" {'us/seq':>7} {'wall ms':>8}"]
    for r in rows:
        ms = r["cpu_ms_median"]
        cells = " ".join(f"{ms[n]:9.3f}" if n in ms else f"{'-':>9}" for n in names)
        per_seq, wall = r["step_cpu_us_per_seq"], r["ms_median"]["step"]
        lines.append(f"  {r['mode']:>9} {r['batch_size']:>5} {cells} {per_seq:7.1f} {wall:8.3f}")
    title = "small4 bench host-overhead (CPU ms of the engine thread per decode step, median; no-op model)"
    return title + "\n" + "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config, rows, device = run(args)
    path = write_result("host-overhead", config, {"results": rows}, out=args.out, device=device)
    print(summary(rows))
    print(f"wrote {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``host-overhead`` under ``small4 bench``."""
    p = sub.add_parser("host-overhead", help="the engine step's host time per piece, model forward replaced by a no-op")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 64, 256])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["greedy", "sampled", "seeded", "penalties"])
    p.add_argument("--prompt-len", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=20, help="timed decode steps")
    p.add_argument("--warmup-steps", type=positive_int, default=3)
    p.add_argument("--no-graphs", action="store_true", help="eager decode steps (no decode-graph buffers)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default=None, help="free text stored in the JSON (e.g. 'before' / 'after')")
    p.add_argument("--out", help="result JSON path (default: bench/results/host-overhead-<UTC time>.json)")
    p.set_defaults(func=main)
