"""Rank 0 drives, the other ranks follow: one ``forward_step`` per engine step on every rank, same inputs.

Only rank 0 runs the scheduler, the sampler and the API. ``DriverRunner`` is the ordinary ``ModelRunner`` whose
``forward_step`` first broadcasts the step's inputs (channel.py); each worker sits in ``worker_loop`` receiving
them and running the same forward, so every rank issues the same collectives in the same order (decode steps
that fit the CUDA graphs: a "graph_step", each rank replaying its own graph, graphs.py). With an EAGLE draft,
the target's verify forwards (which also return hidden states) are broadcast steps like any other, and the draft
runs on rank 0 with the other ranks lending their vocab shards of its embedding and lm_head (draft.py says why).
Startup checks that all ranks agree on the checkpoint config, the split, the engine settings and the draft before
any weight is read, then agrees on one cache size (the smallest any rank can hold).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from small4.config import EngineConfig, load_model_config
from small4.engine.model_runner import ModelRunner, resolve_dtype
from small4.model.context import AttentionMetadata
from small4.parallel.channel import StepInputs, recv_json, recv_step, send_json, send_step
from small4.parallel.config import ParallelConfig
from small4.parallel.draft import (
    DraftExpectation,
    draft_fingerprint,
    run_draft_embed,
    run_draft_logits,
    send_draft_embed,
    send_draft_logits,
)
from small4.parallel.graphs import BroadcastGraphs, graphs_message, prepare_rank_graphs, run_graph_step
from small4.parallel.loading import load_sharded_model
from small4.parallel.plan import ShardPlan
from small4.parallel.state import Dist

log = logging.getLogger(__name__)


class RankMismatchError(RuntimeError):
    """Ranks were started with different checkpoints, splits or engine settings."""


_PER_RANK = ("device", "speculative_model", "num_speculative_tokens")  # compared apart (the draft) or not at all


def fingerprint(
    model_dir: Path,
    engine_cfg: EngineConfig,
    parallel: ParallelConfig,
    world_size: int,
    draft: DraftExpectation | None = None,
) -> dict:
    """What every rank must agree on (the device is per rank and left out). ``draft``: the draft this rank was
    started for (else the one ``engine_cfg`` names), compared by its files' content and its drafts per step, each
    under its own name so a refusal says which."""
    config_file = model_dir / "config.json" if (model_dir / "config.json").is_file() else model_dir / "params.json"
    engine = {k: v for k, v in asdict(engine_cfg).items() if k not in _PER_RANK}
    spec = draft_fingerprint(draft or DraftExpectation.of(engine_cfg))
    return {
        "world_size": world_size,
        "parallel": parallel.to_json(),
        "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest(),
        "engine": engine,
        "draft": spec["files"],
        "num_speculative_tokens": spec["num_speculative_tokens"],
        "torch": torch.__version__,
    }


def all_gather_json(d: Dist, message: dict) -> list[dict]:
    """Every rank's ``message``, on every rank (bytes padded to the longest; JSON, not pickle)."""
    data = json.dumps(message, sort_keys=True).encode()
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=d.cpu_group)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(buf) for _ in range(d.world_size)]
    dist.all_gather(parts, buf, group=d.cpu_group)
    return [json.loads(bytes(p.numpy()).rstrip(b"\0").decode()) for p in parts]


def check_agreement(d: Dist, mine: dict) -> None:
    """Raises on every rank, naming the rank and the fields, when any rank differs from rank 0."""
    everyone = all_gather_json(d, mine)
    if mine["world_size"] != d.world_size:
        raise RankMismatchError(f"rank {d.rank}: started for world size {mine['world_size']}, joined {d.world_size}")
    for rank, theirs in enumerate(everyone):
        diff = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
        if diff:
            raise RankMismatchError(f"rank {rank} disagrees with rank 0 on {', '.join(diff)}")


class DriverRunner(ModelRunner):
    """Rank 0's runner: the same forward, with the inputs sent to the other ranks first."""

    dist: Dist
    # async scheduling's device-side input patch is not sent to the other ranks' steps: the engine runs synchronously
    supports_input_patch = False
    on_failure: Callable[[str], None] | None = None  # the session's: a failed step ends the server
    vocab_parallel = False  # the embedding and lm_head are split: the draft's uses of them are collective

    @contextmanager
    def _in_step(self, what: str) -> Iterator[None]:
        """Around anything the other ranks take part in. A step that failed half-way (a collective timed out: a
        rank hangs; out of memory) leaves the ranks out of step, and no later collective can be trusted: the
        session's handler ends the server (the error still propagates)."""
        try:
            yield
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure(f"{what} failed on rank 0, the ranks are out of step ({str(e).splitlines()[0]})")
            raise

    def forward_step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._broadcast_step(super().forward_step, ids, positions, meta, sample_rows, images)

    def forward_with_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same broadcast "step" as ``forward_step``: the other ranks run their ``forward_step`` (same
        collectives: embedding, every layer, the sampled rows' lm_head); only rank 0 keeps the hidden states, for
        the draft it alone runs. Speculative verify steps come here (eagerly, or through the graphs below)."""
        return self._broadcast_step(super().forward_with_hidden, ids, positions, meta, sample_rows, images)

    def _broadcast_step(self, run: Callable, ids, positions, meta, sample_rows, images):
        """Send one "step" (the other ranks run their ``forward_step``), then ``run`` the same inputs here."""
        if images is not None:
            images = (images[0], images[1].to(self.dtype))
        with self._in_step("step"):
            send_step(self.dist, StepInputs(ids, positions, meta, sample_rows, images))
            return run(ids, positions, meta, sample_rows, images)

    def draft_forward(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The draft on rank 0; with the vocabulary split, the other ranks embed ``next_ids`` with it first."""
        with self._in_step("draft step"):
            if self.vocab_parallel:
                send_draft_embed(self.dist, next_ids)
            return super().draft_forward(next_ids, hidden, positions, meta, images)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's proposals' logits; with the vocabulary split, every rank scores the rows rank 0 sent."""
        with self._in_step("draft step"):
            if self.vocab_parallel:
                hidden = send_draft_logits(self.dist, hidden, self.dtype)
            return super().draft_logits(hidden)

    def prepare_decode_graphs(self, max_model_len: int, max_batch: int, capture: bool = True) -> None:
        """Every rank builds the same decode graphs (graphs.py): told first, then all capture the same ladder in the
        same order, collectives inside. ``capture=False``: the static-buffer path without capture (tests, CPU)."""
        send_json(self.dist, graphs_message(max_model_len, max_batch, capture))
        prepare_rank_graphs(self, max_model_len, max_batch, capture)
        if self.decode_graphs is None:
            log.info("decode steps run eagerly on every rank (no CUDA graphs on %s)", self.device.type)
            return
        self.decode_graphs = BroadcastGraphs(self.decode_graphs, self.dist)

    def _graph_step(self, plan):
        if self.decode_graphs is None:
            return None
        # a decode-only step has one row per request: its sampled rows are those of the requests that sample; a
        # speculative verify through the graphs (model_runner._graph_verify_step) scores every row (None)
        verify = self.draft is not None and any(item.draft_token_ids for item in plan.scheduled)
        sampled = [i for i, item in enumerate(plan.scheduled) if item.samples]
        self.decode_graphs.sample_rows = None if verify else sampled
        with self._in_step("graph step"):
            return super()._graph_step(plan)


def build_rank(
    model_dir: str | Path,
    engine_cfg: EngineConfig,
    parallel: ParallelConfig,
    d: Dist,
    keep_fp8: bool | None = None,
    expect: ParallelConfig | None = None,
    expect_draft: DraftExpectation | None = None,
) -> ModelRunner:
    """This rank's runner (a ``DriverRunner`` on rank 0) over its shard of the weights. ``expect`` /
    ``expect_draft``: the split and the draft this rank was started for (its own command line), checked against
    everyone else's before anything is read. ``keep_fp8`` None: keep an FP8 checkpoint in FP8 on a GPU (the W8A8
    kernels), dequantise it on the CPU. Only rank 0 loads the draft (draft.py)."""
    model_dir = Path(model_dir)
    check_agreement(d, fingerprint(model_dir, engine_cfg, expect or parallel, d.world_size, expect_draft))
    config = load_model_config(model_dir, engine_cfg.attention_scale_mscale)
    plan = ShardPlan(config.text, parallel, d.rank)
    dtype = resolve_dtype(engine_cfg.dtype, d.device)
    if keep_fp8 is None:
        keep_fp8 = d.device.type == "cuda" and config.quant.method == "fp8"
    # only rank 0 runs the vision tower (it broadcasts the image embeddings with the step)
    model, loader = load_sharded_model(
        model_dir,
        plan,
        d.group,
        dtype=dtype,
        device=d.device,
        keep_fp8=keep_fp8,
        vision=d.is_driver,
        attention_scale_mscale=engine_cfg.attention_scale_mscale,
    )
    log.info("rank %d: read %d bytes of weights (skipped %d)", d.rank, loader.bytes_read, loader.bytes_skipped)
    rank_cfg = replace(engine_cfg, device=str(d.device))
    if d.is_driver:
        runner = DriverRunner(model, rank_cfg)
    else:  # the draft is rank 0's alone: followers only lend their vocab shards to it
        runner = ModelRunner(model, replace(rank_cfg, speculative_model=None))
    runner.bytes_read = loader.bytes_read
    agreed = torch.tensor([runner.num_blocks], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=d.cpu_group)
    if int(agreed.item()) != runner.num_blocks:
        runner._setup(int(agreed.item()))
    if d.is_driver:
        runner.dist = d
        runner.vocab_parallel = plan.tp > 1
    return runner


@torch.inference_mode()
def worker_loop(
    d: Dist, device: str, expect: ParallelConfig | None = None, expect_draft: DraftExpectation | None = None
) -> int:
    """Follows rank 0: "load" builds this rank's shard, "step" runs one forward, "draft_embed" / "draft_logits"
    lend this rank's vocab shard to rank 0's draft, "stop" returns the steps run."""
    runner: ModelRunner | None = None
    steps = 0
    while True:
        message = recv_json(d)
        op = message["op"]
        if op == "stop":
            return steps
        if op == "load":
            runner = None  # the old shard goes before the new one is allocated
            engine_cfg = replace(EngineConfig(**message["engine"]), device=device)
            parallel = ParallelConfig(**message["parallel"])
            runner = build_rank(message["model"], engine_cfg, parallel, d, message["keep_fp8"], expect, expect_draft)
        elif op == "graphs" and runner is not None:
            prepare_rank_graphs(runner, message["max_model_len"], message["max_batch"], message["capture"])
        elif op == "graph_step" and runner is not None and runner.decode_graphs is not None:
            run_graph_step(d, runner, message)
            steps += 1
        elif op == "step" and runner is not None:
            step = recv_step(d, message, runner.config.text.hidden_size, runner.dtype)
            runner.forward_step(step.ids, step.positions, step.meta, step.sample_rows, step.images)
            steps += 1
        elif op == "draft_embed" and runner is not None:
            run_draft_embed(d, runner, message)
        elif op == "draft_logits" and runner is not None:
            run_draft_logits(d, runner, message)
        else:
            raise RuntimeError(f"unexpected control message {op!r} (model loaded: {runner is not None})")
