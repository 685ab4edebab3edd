"""Decode CUDA graphs per rank, with the collectives captured inside them.

Every rank builds the same ``DecodeGraphs`` (engine/cuda_graphs.py): rank 0's ``prepare_decode_graphs`` sends a
"graphs" message first, so all ranks capture the same batch ladder in the same order (largest first), and each
capture's collectives (the attention and MoE all-reduces, the vocab-parallel embedding's) pair up across ranks.
On NCCL a collective issued while a stream captures is recorded into the graph (torch's ProcessGroupNCCL keeps it
out of its watchdog); the expert dispatch takes its graph-safe gather while capturing. The lm_head's all-gather
runs after the replay, eagerly, as on one device.

A decode step that fits the graphs is a "graph_step" message: the staged inputs (ids, positions, cache slots,
context lengths, the padded block table and the sampled rows) in one int64 broadcast; each rank then replays its
own graph and computes the sampled rows' logits. A speculative verify that fits the graphs (its last token and
drafts as decode rows of one sequence, model_runner._graph_verify_step) is the same message, every row sampled.
On gloo (CPU) nothing is captured: the ranks keep eager steps,
or (``capture=False``, the tests) run the same static-buffer path eagerly, which exercises this protocol.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from small4.engine.cuda_graphs import DecodeGraphs, _padded_table
from small4.engine.model_runner import ModelRunner
from small4.parallel.channel import send_json
from small4.parallel.state import Dist


def prepare_rank_graphs(runner: ModelRunner, max_model_len: int, max_batch: int, capture: bool) -> None:
    """This rank's decode graphs: captured where the single-device engine would capture them (CUDA, the Triton
    kernels, not ``enforce_eager``), or with ``capture=False`` the static buffers alone, replayed eagerly."""
    runner.decode_graphs = None
    if capture:
        if runner.device.type == "cuda":  # no collective of an earlier step still in flight when capture starts
            torch.cuda.synchronize(runner.device)
        ModelRunner.prepare_decode_graphs(runner, max_model_len, max_batch)
        return
    max_blocks = -(-max_model_len // runner.block_size)
    runner.decode_graphs = DecodeGraphs(
        runner.model, runner.kv_caches, runner.pad_block, max_blocks, max_batch, capture=False
    )


def graphs_message(max_model_len: int, max_batch: int, capture: bool) -> dict:
    return {"op": "graphs", "max_model_len": max_model_len, "max_batch": max_batch, "capture": capture}


def send_graph_step(
    d: Dist,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sample_rows: list[int],
) -> None:
    B, W = int(tokens.numel()), int(tables.shape[1])
    send_json(d, {"op": "graph_step", "batch": B, "table_width": W, "samples": len(sample_rows)})
    rows = torch.tensor(sample_rows, dtype=torch.int64, device=tokens.device)
    parts = [tokens, positions, slots, seq_lens, tables.reshape(-1), rows]
    dist.broadcast(torch.cat([p.to(torch.int64) for p in parts]), src=0, group=d.group)


def run_graph_step(d: Dist, runner: ModelRunner, header: dict) -> torch.Tensor:
    """A worker's side of a "graph_step": the broadcast inputs, its own replay, the sampled rows' logits."""
    B, W, S = header["batch"], header["table_width"], header["samples"]
    packed = torch.empty(4 * B + B * W + S, dtype=torch.int64, device=d.device)
    dist.broadcast(packed, src=0, group=d.group)
    tokens, positions, slots, seq_lens, tables, rows = packed.split([B, B, B, B, B * W, S])
    hidden = runner.decode_graphs.run(
        tokens, positions, slots, tables.view(B, W).to(torch.int32), seq_lens.to(torch.int32)
    )
    return runner.model.compute_logits(hidden if S == B else hidden.index_select(0, rows))


class BroadcastGraphs:
    """Rank 0's ``DecodeGraphs``: each ``run`` first sends the step to the other ranks, which replay with it."""

    def __init__(self, graphs: DecodeGraphs, d: Dist) -> None:
        self.inner, self.dist = graphs, d
        # the coming step's sampled rows, set by the driver before ``run``; None: every row (a speculative verify)
        self.sample_rows: list[int] | None = []
        self.steps = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # max_batch, max_blocks_per_seq, graphs, ...

    def run(self, tokens, positions, slots, tables, seq_lens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):  # a verify step's lists: the tensors every rank then replays
            dev = self.inner.input_ids.device
            tokens, positions, slots, seq_lens = (
                torch.tensor(x, device=dev) for x in (tokens, positions, slots, seq_lens)
            )
            tables = _padded_table(tables, self.inner.pad_block).to(dev)
        rows = list(range(len(tokens))) if self.sample_rows is None else self.sample_rows
        send_graph_step(self.dist, tokens, positions, slots, tables, seq_lens, rows)
        self.steps += 1
        return self.inner.run(tokens, positions, slots, tables, seq_lens)
