"""Decode steps replayed from CUDA graphs, one graph per batch size on a ladder.

A decode step of the real model launches a few hundred small kernels (36 layers of norms, projections, MLA decode,
routing, fused MoE); at batch 1 their launch overhead is as long as the math. Capturing the step once per batch
size and replaying it removes that overhead. A graph replays fixed addresses and fixed shapes, so:

- every input lives in a static buffer sized for the largest batch (ids, positions, cache slots, block tables,
  context lengths); a step copies its rows in and pads the rest up to the next ladder size;
- padded rows are harmless: their token writes its latent into a spare cache block that the block manager never
  hands out (``pad_block``), their block table points only at that block and their context length is 1;
- attention is told the shapes are static (``AttentionMetadata.static_shapes``), so no host-side heuristic (the
  split-KV count) depends on this step's lengths; the MLA decode kernel reads lengths on the device.

Only decode-only steps are captured; prefill chunks and steps over the ladder's top run eagerly. Without CUDA
(or with ``capture=False``) the same static-buffer path runs eagerly: that is how its padding logic is tested
on a CPU, while the capture itself can only run on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from small4.model.context import AttentionMetadata
from small4.model.mistral4 import Mistral4Model

log = logging.getLogger(__name__)


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 256, of 32 beyond: a step pads fewer than 8 rows up to 64
    sequences (where a decode step's cost hardly depends on the batch), fewer than 16 or 32 above."""
    sizes, b = [], 1
    while b <= max_batch:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 256 else 32)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Static buffers and (on CUDA) one captured decode forward per ladder batch size."""

    def __init__(
        self,
        model: Mistral4Model,
        kv_caches: list[torch.Tensor],
        pad_block: int,
        max_blocks_per_seq: int,
        max_batch: int,
        capture: bool = True,
        batch_sizes: list[int] | None = None,
    ) -> None:
        """``batch_sizes`` replaces the ladder (a benchmark captures just the batch it measures)."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = kv_caches[0].shape[1]
        self.pad_block = pad_block
        self.ladder = sorted(batch_sizes) if batch_sizes else batch_ladder(max_batch)
        device = kv_caches[0].device
        B, W = self.ladder[-1], max_blocks_per_seq
        self.input_ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((B,), pad_block * self.block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((B, W), pad_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture and device.type == "cuda":
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.ladder[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.ladder if b >= batch)

    def _meta(self, bucket: int, seq_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=list(range(bucket + 1)),
            seq_lens=seq_lens,
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            block_size=self.block_size,
            seq_lens_tensor=self.seq_lens[:bucket],
            static_shapes=True,
        )

    def _forward(self, bucket: int, seq_lens: list[int]) -> torch.Tensor:
        meta = self._meta(bucket, seq_lens)
        return self.model(self.input_ids[:bucket], self.positions[:bucket], meta, self.kv_caches)

    def _fill(
        self,
        tokens: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
        slots: Sequence[int] | torch.Tensor,
        tables: Sequence[Sequence[int]] | torch.Tensor,
        seq_lens: Sequence[int] | torch.Tensor,
        bucket: int,
    ) -> None:
        """Real rows first, then padding rows up to ``bucket`` (reset every time: a smaller step may follow).
        Tensors (the runner's staged step, already on the device) are copied device to device; lists are uploaded
        once per field, the ragged block tables scattered into a padded host array without a per-row loop."""
        B = len(tokens)
        device = self.input_ids.device
        self.input_ids[:B].copy_(torch.as_tensor(tokens), non_blocking=True)
        self.positions[:B].copy_(torch.as_tensor(positions), non_blocking=True)
        self.slot_mapping[:B].copy_(torch.as_tensor(slots), non_blocking=True)
        self.seq_lens[:B].copy_(torch.as_tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        if not isinstance(tables, torch.Tensor):
            tables = _padded_table(tables, self.pad_block)
        width = tables.shape[1]
        self.block_tables[:B, :width].copy_(tables.to(device, non_blocking=True))
        self.block_tables[:B, width:].fill_(self.pad_block)
        self._pad(B, bucket)

    def _pad(self, start: int, end: int) -> None:
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(self.pad_block * self.block_size)
        self.seq_lens[start:end].fill_(1)
        self.block_tables[start:end].fill_(self.pad_block)

    def run(
        self,
        tokens: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
        slots: Sequence[int] | torch.Tensor,
        tables: Sequence[Sequence[int]] | torch.Tensor,
        seq_lens: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """One decode step of ``len(tokens)`` sequences -> their final hidden states [B, hidden]. Inputs are lists,
        or device tensors (``tables`` int32 [B, W] padded with ``pad_block``), as the runner stages them."""
        B = len(tokens)
        width = tables.shape[1] if isinstance(tables, torch.Tensor) else max(len(t) for t in tables)
        if not 0 < B <= self.max_batch or width > self.max_blocks_per_seq:
            raise ValueError(f"batch {B} does not fit the decode graphs (max {self.max_batch})")
        bucket = self.bucket(B)
        self._fill(tokens, positions, slots, tables, seq_lens, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:B]
        lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)  # eager: no capture here
        return self._forward(bucket, lens + [1] * (bucket - B))[:B]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, sharing one memory pool: smaller graphs reuse the larger ones' activations."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bucket in reversed(self.ladder):
            self._pad(0, bucket)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles Triton kernels and moves lazy tensors before capture
                    self._forward(bucket, [1] * bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(bucket, [1] * bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.ladder)


def _padded_table(tables: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Ragged block-id lists -> int32 [B, W] padded with ``pad``: one flat upload and a masked scatter."""
    lengths = torch.tensor([len(t) for t in tables])
    width = int(lengths.max())
    flat = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
    host = torch.full((len(tables), width), pad, dtype=torch.int32)
    host[torch.arange(width)[None, :] < lengths[:, None]] = flat  # row-major order = the lists' order
    return host
