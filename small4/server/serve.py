"""`small4 serve`: load the model, build the app, run uvicorn until SIGTERM / SIGINT (graceful, exit 0)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

import uvicorn

from small4.chat import MediaPolicy, parse_allowed_domains
from small4.config import EngineConfig, parse_bytes, read_generation_config
from small4.engine import AsyncEngine
from small4.server.app import AppOptions, build_app
from small4.server.context import ServerContext, ServerLimits
from small4.tokenizer import Tokenizer

log = logging.getLogger("small4.serve")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SMALL4_API_KEY"), help="or $SMALL4_API_KEY")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--profile", choices=["latency", "throughput"], default="throughput")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="latent-cache budget, e.g. 4GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32", "fp8"], default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="plan and launch the next step while the device runs this one (default: the engine's)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=256, help="sequences admitted beyond --max-num-seqs before answering 503"
    )
    p.add_argument("--max-seqs-per-request", type=int, default=64, help="prompts x n of one request")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling of requests that give no seed")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=32 * 1024 * 1024)
    p.add_argument("--max-header-bytes", type=parse_bytes, default=32 * 1024)
    p.add_argument("--render-timeout", type=float, default=30.0, help="seconds to render / tokenize one request")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may run before they are ended with finish_reason 'abort'",
    )
    p.add_argument("--allowed-media-domains", default="", help="hosts remote image URLs may come from (off if empty)")
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument("--max-image-bytes", type=parse_bytes, default=10 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_pixels)
    p.add_argument("--max-request-image-pixels", type=int, default=MediaPolicy.max_total_pixels)
    p.add_argument("--media-fetch-timeout", type=float, default=10.0)
    p.add_argument(
        "--attention-scale-mscale",
        choices=["auto", "on", "off"],
        default="auto",
        help="YaRN mscale^2 in the softmax scale: auto = only if params.json says yarn.apply_scale true; "
        "on = transformers' reading of mscale_all_dim; off = plain 1/sqrt(qk_head_dim)",
    )
    p.add_argument(
        "--generation-config",
        choices=["auto", "ignore"],
        default="auto",
        help="auto: the model's generation_config.json gives the default sampling parameters; ignore: it does not",
    )
    p.add_argument("--no-web-ui", action="store_true", help="do not serve the chat page at GET /")
    p.add_argument(
        "--engine-process",
        choices=["inline", "separate"],
        default="inline",
        help="separate: the engine core (schedule, forward, sample, detokenize) in its own process, talking to "
        "this one over ZMQ + msgpack (small4/core/); inline: an engine thread in the API process",
    )
    p.add_argument("--speculative-model", default=None, help="EAGLE draft directory: speculative decoding")
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="drafts per step (default: 3 with --profile latency, else 0 = off; needs --speculative-model)",
    )
    add_parallel_arguments(p)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (one process per rank; rank 0, on node 0, serves the API)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks that split heads and vocab")
    g.add_argument("--enable-expert-parallel", action="store_true", help="partition the routed experts over the ranks")
    g.add_argument("--expert-parallel-size", type=int, default=None, help="experts over N ranks, attention replicated")
    g.add_argument("--data-parallel-attention", action="store_true", help="not supported yet")
    g.add_argument("--nnodes", type=int, default=None, help="machines, each with tp / nnodes ranks")
    g.add_argument("--node-rank", type=int, default=None, help="this machine's index (0: the API)")
    g.add_argument("--master-addr", default=None, help="node 0's address, where the ranks meet")
    g.add_argument("--master-port", type=int, default=None)


def parallel_config(args: argparse.Namespace):
    """The split asked for, or None for one process; flags that are not built yet are refused here, by name."""
    from small4.parallel import ParallelConfig

    if args.data_parallel_attention:
        raise ValueError("--data-parallel-attention is not supported yet (the latent cache is replicated per rank)")
    tp = args.tensor_parallel_size
    ep = args.expert_parallel_size or (tp if args.enable_expert_parallel else 1)
    if args.enable_expert_parallel and tp == 1 and args.expert_parallel_size is None:
        raise ValueError("--enable-expert-parallel needs --tensor-parallel-size > 1 (or --expert-parallel-size)")
    parallel = ParallelConfig(tp, ep)
    if parallel.world_size == 1 and node_layout(args).count > 1:
        raise ValueError("--nnodes > 1 needs --tensor-parallel-size > 1")
    return parallel if parallel.world_size > 1 else None


def node_layout(args: argparse.Namespace):
    """Multi-node: every node runs the same command with its own --node-rank; node 0 serves the API."""
    from small4.parallel import Nodes

    if args.nnodes is None or args.nnodes == 1:
        return Nodes()
    if args.node_rank is None or args.master_addr is None or args.master_port is None:
        raise ValueError("--nnodes needs --node-rank, --master-addr and --master-port (node 0's address)")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank must be in [0, {args.nnodes})")
    return Nodes(args.nnodes, args.node_rank, (args.master_addr, int(args.master_port)))


def speculative_model(args: argparse.Namespace) -> str | None:
    """The draft directory: ``--speculative-model``, else the embedded model's own draft when it would speculate
    (``--profile latency`` or drafts asked for), single-device or split alike."""
    from small4.weights import embedded_draft_dir

    if args.speculative_model is not None:
        return str(args.speculative_model)
    wants_drafts = args.profile == "latency" or args.num_speculative_tokens
    draft = embedded_draft_dir() if not args.model and wants_drafts else None
    return None if draft is None else str(draft)


def build_from_args(args: argparse.Namespace):
    from small4.weights import embedded_model_dir

    model_dir = Path(args.model) if args.model else embedded_model_dir()
    parallel = parallel_config(args)
    engine_cfg = EngineConfig(
        profile=args.profile,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        dtype=args.dtype,
        device=args.device,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        **({} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling}),
        attention_scale_mscale=args.attention_scale_mscale,
        speculative_model=speculative_model(args),
        num_speculative_tokens=args.num_speculative_tokens,
    )
    if getattr(args, "engine_process", "inline") == "separate":
        if parallel is not None:
            raise ValueError("--engine-process separate does not support --tensor-parallel-size > 1 yet")
        from small4.core.client import CoreClient

        engine = CoreClient(model_dir, engine_cfg)
    elif parallel is None:
        engine = AsyncEngine.from_model_dir(model_dir, engine_cfg)
    else:  # the API process is rank 0 and starts the other ranks
        from small4.parallel import parallel_async_engine

        engine = parallel_async_engine(model_dir, engine_cfg, parallel, node_layout(args))
    defaults = read_generation_config(model_dir) if args.generation_config == "auto" else {}
    if defaults:
        log.info("default sampling parameters from generation_config.json: %s", defaults)
    name = args.served_model_name or ("small4-tiny" if not args.model else model_dir.name)
    limits = ServerLimits(
        max_model_len=engine.engine.max_model_len,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_seqs_per_request=args.max_seqs_per_request,
        render_timeout_s=args.render_timeout,
    )
    media = MediaPolicy(
        allowed_domains=parse_allowed_domains(args.allowed_media_domains),
        max_images=args.max_images_per_request,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
        max_total_pixels=args.max_request_image_pixels,
        fetch_timeout_s=args.media_fetch_timeout,
    )
    ctx = ServerContext(engine, Tokenizer.from_file(model_dir), name, limits, media, sampling_defaults=defaults)
    options = AppOptions(api_key=args.api_key, shutdown_timeout_s=args.shutdown_timeout, web_ui=not args.no_web_ui)
    return build_app(ctx, options), ctx


CORE_DIED_EXIT_CODE = 3  # `small4 serve --engine-process separate` when its engine core died under it
FLUSH_GRACE_S = 5.0  # after the drain timeout, how long aborted responses get to send their last chunk


class GracefulServer(uvicorn.Server):
    """Shutdown that never cuts a response short: after ``drain_timeout_s`` the requests still running are
    aborted in the engine, so each stream ends with a finish_reason "abort" chunk and ``[DONE]`` (and each
    non-streaming response with "abort") while the sockets are still open; uvicorn's own hard cancel comes
    ``FLUSH_GRACE_S`` later, only for a client that does not read.

    uvicorn also re-raises SIGTERM/SIGINT after its graceful shutdown (so the process dies by the signal); a
    server that drained cleanly exits 0 instead, which is what process supervisors expect."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.ctx, self.drain_timeout_s = ctx, drain_timeout_s

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_timeout_s, self._drain_timed_out)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _drain_timed_out(self) -> None:
        log.warning("shutdown: ending the requests still running after %.1f s", self.drain_timeout_s)
        self.ctx.engine.abort_all()


def make_server(app, ctx: ServerContext, host: str, port: int, shutdown_timeout_s: float) -> GracefulServer:
    """The uvicorn server for an app: h11 with the header cap also bounding an incomplete request head."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http="h11",
        h11_max_incomplete_event_size=ctx.limits.max_header_bytes,
        timeout_graceful_shutdown=int(shutdown_timeout_s + FLUSH_GRACE_S),
    )
    return GracefulServer(config, ctx, shutdown_timeout_s)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nodes = node_layout(args)
    if nodes.rank > 0:  # not the API node: this node's ranks follow rank 0 until it stops
        from small4.parallel import follow_node

        # this node's own draft settings: rank 0's must be the same (checked at load)
        draft = EngineConfig(
            profile=args.profile,
            speculative_model=speculative_model(args),
            num_speculative_tokens=args.num_speculative_tokens,
        )
        return follow_node(parallel_config(args), nodes, args.device, draft)
    app, ctx = build_from_args(args)
    log.info(
        "serving %s on http://%s:%d (max tokens in cache: %d)",
        ctx.model_name,
        args.host,
        args.port,
        ctx.engine.engine.runner.max_cached_tokens,
    )
    server = make_server(app, ctx, args.host, args.port, args.shutdown_timeout)
    if hasattr(ctx.engine, "core_died"):  # a separate core that dies stops the server, which then exits non-zero
        ctx.engine.on_dead = lambda: setattr(server, "should_exit", True)
    server.run()
    if getattr(ctx.engine, "core_died", False):
        log.error("the engine core died: exiting with code %d", CORE_DIED_EXIT_CODE)
        return CORE_DIED_EXIT_CODE
    if parallel_config(args) is not None:  # rank 0 of a split: reap the workers, leave gloo's teardown out
        from small4.parallel import end_serving_process

        end_serving_process(0)
    return 0
