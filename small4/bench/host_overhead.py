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

``--schedulings sync,overlap`` measures the synchronous loop and async scheduling (``EngineConfig.async_scheduling``,
engine/overlap.py) side by side in one run. What matters is the host time on the *critical path*: the part the
device waits for. On a GPU that is the device's idle time between steps; here there is no device doing the model's
work, so it is modelled: with ``--device-ms`` (``auto``: an H200's FP8 decode step at the HBM roofline as issue 14
estimates it, 1.4 ms at batch 1 and 24 ms at batch 256, linear in between; or one number for every batch) the
device is a FIFO queue that starts a step when the host has launched it (the moment the sampler's kernels are
enqueued, ``Sampler.sample`` returning) and the previous step is done, and takes ``device-ms``; reading a step's
sampled ids back waits until its modelled end (``_sample`` returning in the synchronous loop, ``_resolve`` starting
in the overlap loop; the wait spins, and its CPU time is taken out of the CPU figures). The device's idle time per
step is then the critical-path host time (``critical_ms_median``) and ``device_idle_fraction`` its share of the
run. This is a model of the device, not a measurement of one: it ignores kernel-launch latency and the host work
a real CUDA stream would overlap anyway, and the no-op forward enqueues nothing. ``--device-ms 0`` turns the model
off (then the critical path is the whole step in the synchronous loop and is not reported for the overlap loop).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict, deque
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


class DeviceModel:
    """A device that takes ``step_ms`` per step, started in launch order (see the module docstring): ``launch`` when
    a step's sampler is enqueued, ``wait`` when the host reads the oldest unread step's ids."""

    # a wait spins (a sleep's wake-up on a loaded machine overshoots by milliseconds, which would count as device
    # idle time); its CPU time is counted and taken out of the step's. Only waits longer than this sleep first.
    SPIN_S = 0.05

    def __init__(self, step_ms: float) -> None:
        self.step_s = step_ms / 1e3
        self.ends: deque[float] = deque()
        self.last_end = time.perf_counter()
        self.idle: list[float] = []  # seconds the device waited before each launch
        self.spin_cpu = 0.0

    def launch(self) -> None:
        now = time.perf_counter()
        self.idle.append(max(0.0, now - self.last_end))
        self.last_end = max(now, self.last_end) + self.step_s
        self.ends.append(self.last_end)

    def pending(self) -> None:
        """A step launched before the model was installed: done now."""
        self.ends.append(time.perf_counter())

    def wait(self) -> None:
        if not self.ends:
            return
        end = self.ends.popleft()
        left = end - time.perf_counter()
        if left > self.SPIN_S:
            time.sleep(left - self.SPIN_S)
        c = time.thread_time()
        while time.perf_counter() < end:
            pass
        self.spin_cpu += time.thread_time() - c


def device_ms_for(spec: str, batch: int) -> float:
    """``auto``: issue 14's H200 FP8 decode-step estimate (1.4 ms at batch 1, 24 ms at 256, linear); else a number."""
    if spec == "auto":
        return 1.4 + (24.0 - 1.4) * (min(batch, 256) - 1) / 255
    return float(spec)


def build_engine(batch: int, max_model_len: int, device: torch.device, graphs: bool, overlap: bool = False) -> Engine:
    """A real engine around a no-op model; decode graphs (captured on CUDA, static buffers on a CPU) if asked."""
    from small4.bench.serving import bench_tokenizer

    config = model_config(replace(TINY_BENCH_SPEC, num_layers=1))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = max(8192, batch)
    model = NoOpModel(config, device, budget, batch, dtype)
    cfg = EngineConfig(
        device=str(device), max_num_seqs=batch, max_num_batched_tokens=budget, max_model_len=max_model_len,
        enable_prefix_caching=False, enforce_eager=True, async_scheduling=overlap,
    )  # fmt: skip
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    runner = ModelRunner(model, cfg, num_blocks=batch * blocks_per_seq)
    engine = Engine(runner, bench_tokenizer(config.text.vocab_size))
    if graphs:  # the static-buffer path of a decode step; on CUDA the no-op forward is captured too
        runner.capture_decode_graphs(blocks_per_seq, batch, batch_sizes=[batch], capture=device.type == "cuda")
    return engine


def measure(
    batch: int, mode: str, args: argparse.Namespace, device: torch.device, scheduling: str = "sync"
) -> dict[str, Any]:
    overlap = scheduling == "overlap"
    max_model_len = args.prompt_len + args.warmup_steps + args.steps + 8
    engine = build_engine(batch, max_model_len, device, not args.no_graphs, overlap)
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
    # both loops' pieces: the engine picks one per step (an overlap run falls back for penalties). The overlap
    # loop's update is split in two: booked at launch, written when the ids come back
    sched.update_from_output = _timed(times, cpu, "update", sched.update_from_output)
    sched.advance_in_flight = _timed(times, cpu, "update", sched.advance_in_flight)
    sched.resolve_in_flight = _timed(times, cpu, "update", sched.resolve_in_flight)
    engine._sample = _timed(times, cpu, "sample", engine._sample)
    engine._sample_on_device = _timed(times, cpu, "sample", engine._sample_on_device)
    engine._emit = _timed(times, cpu, "emit", engine._emit)
    model = _install_device_model(engine, device_ms_for(args.device_ms, batch))

    def step() -> None:
        engine.step()
        if device.type == "cuda" and engine._in_flight is None:
            torch.cuda.synchronize(device)

    timed_step = _timed(times, cpu, "step", step)
    spin = []
    for s in range(args.warmup_steps + args.steps):
        if s == args.warmup_steps:
            times.clear()
            cpu.clear()
            if model is not None:
                model.idle.clear()
        before = model.spin_cpu if model is not None else 0.0
        timed_step()
        spin.append(model.spin_cpu - before if model is not None else 0.0)
    cpu["step"] = [c - w for c, w in zip(cpu["step"], spin[args.warmup_steps :], strict=True)]
    pieces = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    cpu_pieces = {name: statistics.median(v) * 1e3 for name, v in cpu.items()}
    row = {
        "batch_size": batch,
        "mode": mode,
        "scheduling": scheduling,
        "graphs": runner.decode_graphs is not None,
        "ms_median": pieces,
        "cpu_ms_median": cpu_pieces,
        "step_us_per_seq": pieces["step"] * 1e3 / batch,
        "step_cpu_us_per_seq": cpu_pieces["step"] * 1e3 / batch,
        "step_ms_all": [v * 1e3 for v in times["step"]],
        "overlapped_steps": engine.num_overlapped_steps,
    }
    row.update(_critical_path(model, cpu_pieces["step"], overlap))
    return row


def _install_device_model(engine: Engine, step_ms: float) -> DeviceModel | None:
    """Hook the modelled device onto the engine's own seams (see the module docstring), for both loops (the engine
    picks one per step); None without a model."""
    if step_ms <= 0:
        return None
    model = DeviceModel(step_ms)
    if engine._in_flight is not None:
        model.pending()
    sample, sample_sync, resolve = engine.sampler.sample, engine._sample, engine._resolve

    def launched(*a, **k):
        out = sample(*a, **k)
        model.launch()
        return out

    def sampled(*a, **k):  # the synchronous loop reads the ids inside _sample
        out = sample_sync(*a, **k)
        model.wait()
        return out

    def resolved(step):  # the overlap loop reads them first thing in _resolve
        model.wait()
        return resolve(step)

    engine.sampler.sample, engine._sample, engine._resolve = launched, sampled, resolved
    return model


def _critical_path(model: DeviceModel | None, step_cpu_ms: float, overlap: bool) -> dict[str, Any]:
    """The host time the device waits for per step, and the device's idle share of the run (modelled device)."""
    if model is None:
        return {"device_ms": 0.0, "critical_ms_median": None if overlap else step_cpu_ms, "device_idle_fraction": None}
    busy = model.step_s * len(model.idle)
    idle = sum(model.idle)
    return {
        "device_ms": model.step_s * 1e3,
        "critical_ms_median": statistics.median(model.idle) * 1e3,
        "critical_ms_mean": idle / len(model.idle) * 1e3,
        "device_idle_fraction": idle / (idle + busy),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], torch.device]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )  # fmt: skip
    torch.set_num_threads(args.threads)  # the engine's step runs on one thread; more only add contention here
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}: choose from {sorted(MODES)}")
    unknown = [s for s in args.schedulings if s not in ("sync", "overlap")]
    if unknown:
        raise ValueError(f"unknown scheduling(s) {unknown}: choose from sync, overlap")
    rows = [
        measure(b, m, args, device, sched) for m in args.modes for b in args.batch_sizes for sched in args.schedulings
    ]
    config = {
        "batch_sizes": args.batch_sizes,
        "modes": {m: MODES[m] for m in args.modes},
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "graphs": not args.no_graphs,
        "threads": args.threads,
        "schedulings": args.schedulings,
        "device_ms": args.device_ms,
        "label": args.label,
    }
    return config, rows, device


def summary(rows: list[dict[str, Any]]) -> str:
    names = ["step", "schedule", "execute", "graph_run", "sample", "update", "emit"]
    head = f"  {'sched':>7} {'mode':>9} {'batch':>5} " + " ".join(f"{n:>9}" for n in names)
    lines = [head + f" {'us/seq':>7} {'wall ms':>8} {'dev ms':>7} {'crit ms':>8} {'idle':>6}"]
    for r in rows:
        ms = r["cpu_ms_median"]
        cells = " ".join(f"{ms[n]:9.3f}" if n in ms else f"{'-':>9}" for n in names)
        per_seq, wall = r["step_cpu_us_per_seq"], r["ms_median"]["step"]
        crit, idle = r["critical_ms_median"], r["device_idle_fraction"]
        tail = f" {r['device_ms']:7.2f} " + (f"{crit:8.3f}" if crit is not None else f"{'-':>8}")
        tail += f" {idle:6.1%}" if idle is not None else f" {'-':>6}"
        lines.append(
            f"  {r['scheduling']:>7} {r['mode']:>9} {r['batch_size']:>5} {cells} {per_seq:7.1f} {wall:8.3f}{tail}"
        )
    title = (
        "small4 bench host-overhead (CPU ms of the engine thread per decode step, median; no-op model; "
        "crit ms: host time on the critical path = modelled device idle per step)"
    )
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
    p.add_argument(
        "--schedulings", type=lambda s: s.split(","), default=["sync", "overlap"],
        help="the synchronous loop and/or async scheduling (EngineConfig.async_scheduling), side by side",
    )  # fmt: skip
    p.add_argument(
        "--device-ms", default="auto",
        help="modelled device time per step (ms, or auto: issue 14's H200 estimate per batch size; 0: no model)",
    )  # fmt: skip
    p.add_argument("--label", default=None, help="free text stored in the JSON (e.g. 'before' / 'after')")
    p.add_argument("--out", help="result JSON path (default: bench/results/host-overhead-<UTC time>.json)")
    p.set_defaults(func=main)
