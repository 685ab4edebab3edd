"""Per-step batch layout, built by the model runner and read by every attention layer.

A step's tokens are one flat batch: the new tokens of many sequences (prefill chunks and decodes) laid end to end.
Keeping this in one object keeps model signatures at ``forward(input_ids, positions, meta, kv_caches)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """``query_start_loc[i]:query_start_loc[i+1]`` are sequence i's new tokens; ``seq_lens[i]`` its context length
    after this step (cached + new). With a cache, ``slot_mapping[t]`` is the cache slot (block * block_size +
    offset) where token t's latent is written and ``block_tables[i]`` lists sequence i's blocks. Without a cache
    (``block_tables is None``) each sequence attends to its own new tokens only."""

    query_start_loc: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    block_size: int = 0
    seq_lens_tensor: torch.Tensor | None = None  # int32 [B] on the device: made on first use, shared by all layers
    # CUDA-graph capture: shapes are padded to a fixed batch and must not steer host-side choices (split counts)
    static_shapes: bool = False
    _split: tuple[SubBatch | None, SubBatch | None] | None = field(default=None, repr=False)
    _rope: tuple[torch.Tensor, torch.dtype, tuple[torch.Tensor, ...]] | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def uses_cache(self) -> bool:
        return self.block_tables is not None

    def device_seq_lens(self, device: torch.device) -> torch.Tensor:
        """``seq_lens`` as an int32 device tensor, made once per step (not once per layer) and then reused."""
        if self.seq_lens_tensor is None or self.seq_lens_tensor.device != device:
            self.seq_lens_tensor = torch.tensor(self.seq_lens, dtype=torch.int32).to(device, non_blocking=True)
        return self.seq_lens_tensor

    def rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype, make: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """The step's rotary cos/sin (and query scale) rows: ``make()`` runs in the first layer, the other layers
        reuse its result (every layer sees the same positions). Keyed on the positions tensor itself and the dtype,
        so a caller that passes other positions with the same metadata gets its own rows."""
        cached = self._rope
        if cached is None or cached[0] is not positions or cached[1] != dtype:
            self._rope = cached = (positions, dtype, make())
        return cached[2]

    @property
    def max_seq_len(self) -> int | None:
        """Host-side bound on ``seq_lens`` for heuristics; None under graph capture (the bound is the table's)."""
        return None if self.static_shapes else max(self.seq_lens)

    def split_decode_rows(self, device: torch.device) -> tuple[SubBatch | None, SubBatch | None]:
        """(sequences with exactly one new token, the others) as sub-batches, their rows on ``device``; None for
        an empty side. Made once per step (rows copied to the device once) and shared by every layer."""
        if self._split is None:
            lens = [b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:], strict=False)]
            decode = [i for i, n in enumerate(lens) if n == 1]
            chunked = [i for i, n in enumerate(lens) if n != 1]
            self._split = (self._subset(decode, device), self._subset(chunked, device))
        return self._split

    def _subset(self, seqs: list[int], device: torch.device) -> SubBatch | None:
        if not seqs:
            return None
        if len(seqs) == self.num_seqs:
            return SubBatch(torch.arange(self.query_start_loc[-1], device=device), self)
        rows: list[int] = []
        starts = [0]
        for i in seqs:
            a, b = self.query_start_loc[i], self.query_start_loc[i + 1]
            rows.extend(range(a, b))
            starts.append(starts[-1] + b - a)
        tables = None
        if self.block_tables is not None:
            tables = self.block_tables[torch.tensor(seqs, device=self.block_tables.device)]
        meta = AttentionMetadata(starts, [self.seq_lens[i] for i in seqs], None, tables, self.block_size)
        return SubBatch(torch.tensor(rows, device=device), meta)

    @classmethod
    def for_prefill(cls, seq_lens: list[int]) -> AttentionMetadata:
        """Stateless causal prefill of whole sequences (no cache): parity tests, scoring, training."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(query_start_loc=starts, seq_lens=list(seq_lens))


@dataclass
class SubBatch:
    """Some of a step's sequences: their rows in the flat batch and their own metadata (no slot mapping: the
    cache was written for the whole step before attention)."""

    rows: torch.Tensor  # int64 [T_sub], on the device of the step's tokens
    meta: AttentionMetadata
