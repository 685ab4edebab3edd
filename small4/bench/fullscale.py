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
from dataclasses import asdict, replace
from typing import Any

import torch

from small4.bench.harness import Bench
from small4.bench.latency import measure_decode, measure_prefill
from small4.bench.reference import reference_skip_reason, run_reference, transformers_ratios
from small4.bench.results import device_name, int_list, positive_int, write_result
from small4.bench.roofline import hbm_bandwidth, module_bytes, roofline
from small4.bench.serving import bench_tokenizer, measure_serving
from small4.bench.synthetic import (
    FULL_SPEC,
    TINY_BENCH_SPEC,
    build_random_model,
    model_config,
)
from small4.bench.timing import (
    free_bytes,
    gib,
    measure_copy_bandwidth,
    peak_bytes,
)
from small4.config import EngineConfig, parse_bytes
from small4.engine.model_runner import ModelRunner
from small4.kernels.backend import kernel_backend
from small4.parallel.config import ParallelConfig
from small4.parallel.plan import ShardPlan
from small4.parallel.spmd import finish, start_ranks
from small4.parallel.state import Dist
from small4.parallel.tp import parallelize

CPU_CACHE_BUDGET = 1 << 30


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
    runner = ModelRunner(model, engine_cfg, num_blocks=1)
    budget = (
        args.max_cache_memory
        if args.max_cache_memory is not None
        else (CPU_CACHE_BUDGET if device.type == "cpu" else None)
    )
    return Bench(
        runner,
        spec,
        spec.num_layers,
        args.dtype,
        device,
        budget,
        args.seed,
        args.cuda_graph,
        dist=d,
        async_scheduling=getattr(args, "async_scheduling", False),  # namespaces built by hand (tests, spmd) lack it
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    tp = args.tensor_parallel_size
    a2a = getattr(args, "ep_all_to_all_min_tokens", None)
    return ParallelConfig(tp, tp if args.enable_expert_parallel else 1, all_to_all_min_tokens=a2a)


def _overall_peak(build: int | None, decode: list[dict], prefill: dict, last: int | None) -> int | None:
    peaks = [build, last, prefill.get("peak_memory_bytes"), *(r.get("peak_memory_bytes") for r in decode)]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def run_full_bench(
    args: argparse.Namespace, d: Dist | None = None
) -> tuple[dict[str, Any], dict[str, Any], torch.device]:
    bench = build_bench(args, d)
    device = bench.device
    build_peak = peak_bytes(device)  # measurements reset the peak counter: the overall peak is the max of all of them
    weights_bytes = module_bytes(bench.model)
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
            free_bytes(device)  # the transformers copy is garbage once run_reference returns
            ratios = transformers_ratios(decode, reference)
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
        "ep_all_to_all_min_tokens": parallel_config(args).all_to_all_min_tokens,
        "world_size": 1 if d is None else d.world_size,
    }
    results = {
        "decode": decode,
        "prefill": prefill,
        "serving": serving,
        "speculative": speculative,
        "memory": {
            "weights_bytes": weights_bytes,
            "peak_allocated_bytes": _overall_peak(build_peak, decode, prefill, peak_bytes(device)),
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
        lines.append(f"  peak memory {gib(peak)}")
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
    runner.attach_draft(random_draft(bench, args.seed))
    runner.configure(replace(saved, num_speculative_tokens=args.num_speculative_tokens))
    out = []
    try:
        for c, base in zip(args.serving_concurrency, plain, strict=True):
            if c not in args.speculative_concurrency:
                continue
            r = measure_serving(bench, tokenizer, c, args.serving_input_len, args.serving_output_len, max(4, 2 * c))
            r["num_speculative_tokens"] = args.num_speculative_tokens
            r["plain_output_tokens_per_s"] = base.get("output_tokens_per_s")
            r.setdefault("acceptance_rate", 0.0)
            r.setdefault("mean_accepted_length", 0.0)
            out.append(r)
    finally:
        runner.attach_draft(None)
        runner.configure(saved)
        bench.release_cache()
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
    p.add_argument(
        "--async-scheduling", action="store_true", help="the serving measurement's engine overlaps host and device"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, help="ranks (one process each)")
    p.add_argument("--enable-expert-parallel", action="store_true", help="partition the experts over the ranks")
    p.add_argument(
        "--ep-all-to-all-min-tokens",
        type=positive_int,
        help="expert dispatch: batches of at least this many tokens go all-to-all (default: always the gather)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON path (default: bench/results/full-<UTC time>.json)")
    p.set_defaults(func=main)
