"""One step's flat-batch inputs, built on the host into persistent buffers and copied to the device in three
non-blocking copies.

A step used to turn Python lists into fresh pageable tensors (six host-to-device copies, each a synchronous
staging copy in the CUDA driver) and rebuilt every running sequence's whole block table from its list. Here:

- the ids, positions, cache slots, sampled rows and block-table row indices share one int64 host buffer, the
  context lengths one int32 buffer: pinned on CUDA, so each copies asynchronously in one call;
- positions, slots and lengths are computed with numpy from per-sequence starts and counts, not per token;
- block tables live in a persistent host table, one row per running sequence, updated by appending the blocks a
  sequence gained since the last step (a sequence that vanished from a step, or was preempted, loses its row;
  a row whose ids no longer match is rewritten whole). The table is copied whole (rows * width * 4 bytes, tiny
  next to a step) and the step's rows are gathered on the device.

The host buffers are rewritten only after the previous step's copies have completed (an event), so a step may
be prepared while the device still runs the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from small4.engine.request import Request, token_slice


@dataclass
class StagedStep:
    """A step's inputs on the device (views into persistent buffers, valid until the next step is staged) and
    the host-side lists that attention heuristics read."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    sample_rows: torch.Tensor  # int64 [S]: rows of the flat batch whose logits are sampled
    block_tables: torch.Tensor  # int32 [B, W]: W = the longest table of this step
    seq_lens: torch.Tensor  # int32 [B]
    query_start_loc: list[int]
    seq_lens_list: list[int]
    all_rows_sample: bool  # every row samples (a decode-only step): the hidden states need no gather


class StepInputs:
    """Persistent host + device buffers for the runner's per-step inputs (see the module docstring)."""

    def __init__(self, device: torch.device, block_size: int, pad_block: int) -> None:
        self.device = device
        self.block_size = block_size
        self.pad_block = pad_block
        self._pinned = device.type == "cuda"
        # request id -> (the request, its table row, block ids written, the last id written)
        self._rows: dict[str, tuple[Request, int, int, int]] = {}
        self._free: list[int] = []
        self._copied: torch.cuda.Event | None = None
        self._ints = self._host(0, torch.int64)
        self._int32 = self._host(0, torch.int32)
        self._table = self._host((0, 0), torch.int32)
        self._dev_ints = self._dev_int32 = self._dev_table = None

    # ---- buffers ------------------------------------------------------------------------------------------
    def _host(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self._pinned)

    def _ensure(self, ints: int, int32s: int, rows: int, width: int) -> None:
        """Grows the buffers (doubling) to hold a step of this size; the table keeps its rows."""
        if ints > self._ints.numel():
            self._ints = self._host(max(ints, 2 * self._ints.numel()), torch.int64)
            self._dev_ints = None
        if int32s > self._int32.numel():
            self._int32 = self._host(max(int32s, 2 * self._int32.numel()), torch.int32)
            self._dev_int32 = None
        old_rows, old_width = self._table.shape
        if rows > old_rows or width > old_width:  # each dimension doubles only when it is the one too small
            new_rows = max(rows, 2 * old_rows) if rows > old_rows else old_rows
            new_width = max(width, 2 * old_width) if width > old_width else old_width
            table = self._host((new_rows, new_width), torch.int32)
            table.fill_(self.pad_block)
            table[:old_rows, :old_width] = self._table
            self._free.extend(range(old_rows, table.shape[0]))
            self._table = table
            self._dev_table = None
        self._ints_np, self._int32_np, self._table_np = self._ints.numpy(), self._int32.numpy(), self._table.numpy()
        if self._dev_ints is None:
            self._dev_ints = self._to_device_buffer(self._ints)
        if self._dev_int32 is None:
            self._dev_int32 = self._to_device_buffer(self._int32)
        if self._dev_table is None:
            self._dev_table = self._to_device_buffer(self._table)

    def _to_device_buffer(self, host: torch.Tensor) -> torch.Tensor:
        return host if self.device.type == "cpu" else torch.empty_like(host, device=self.device)

    # ---- block-table rows ---------------------------------------------------------------------------------
    def _release_absent(self, present: set[str]) -> None:
        for rid in [r for r in self._rows if r not in present]:
            self._free.append(self._rows.pop(rid)[1])

    def _table_row(self, req: Request, table: np.ndarray) -> int:
        """The request's row, with its block ids brought up to date (appended, or rewritten if they changed)."""
        blocks = req.block_ids
        n = len(blocks)
        owner, row, written, last = self._rows.get(req.request_id, (None, -1, 0, -1))
        if owner is req and written == n and (n == 0 or blocks[-1] == last):
            return row  # the common decode step: no new block
        if owner is not req and row >= 0:  # the id was reused by a new request (or another engine's): start over
            written = 0
        if row < 0:
            row = self._free.pop()
        elif written > n or (written and blocks[written - 1] != last):
            written = 0  # the ids changed under us (recomputed after preemption): rewrite the row
        if written == 0:
            table[row].fill(self.pad_block)
        if n > written:
            table[row, written:n] = blocks[written:]
        self._rows[req.request_id] = (req, row, n, blocks[-1] if n else -1)
        return row

    # ---- one step -----------------------------------------------------------------------------------------
    def stage(self, items: Sequence, preempted: Sequence[Request] = ()) -> StagedStep:
        """``items`` are the plan's ``ScheduledRequest``s, in order; ``preempted`` lose their table rows."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies read the host buffers
        for req in preempted:
            if req.request_id in self._rows:
                self._free.append(self._rows.pop(req.request_id)[1])
        B = len(items)
        self._release_absent({it.request.request_id for it in items})
        T = sum(it.num_new_tokens for it in items)
        width = max(len(it.request.block_ids) for it in items)
        self._ensure(3 * T + 2 * B, B, len(self._rows) + B, width)
        table = self._table_np
        tokens: list[int] = []
        rows = [self._table_row(it.request, table) for it in items]
        for it in items:
            tokens.extend(token_slice(it.request, it.start, it.start + it.num_new_tokens))
            tokens.extend(getattr(it, "draft_token_ids", ()))  # speculative decoding: verified with the last token
        if T == B:  # decode only (one token each): plain lists beat numpy's per-call cost at these sizes
            positions = [it.start for it in items]
            bs = self.block_size
            slots = [it.request.block_ids[p // bs] * bs + p % bs for it, p in zip(items, positions, strict=True)]
            sample_rows = [i for i, it in enumerate(items) if it.samples]
            seq_lens = [p + 1 for p in positions]
            qsl = list(range(B + 1))
        else:
            positions, slots, sample_rows, seq_lens, qsl = self._chunk_layout(items, rows)
            if any(getattr(it, "draft_token_ids", ()) for it in items):
                sample_rows = _verify_rows(items, qsl)
        S = len(sample_rows)
        ints = self._ints_np
        ints[:T] = tokens
        ints[T : 2 * T] = positions
        ints[2 * T : 3 * T] = slots
        ints[3 * T : 3 * T + S] = sample_rows
        ints[3 * T + S : 3 * T + S + B] = rows
        self._int32_np[:B] = seq_lens
        n_ints, n_rows = 3 * T + S + B, int(self._table.shape[0])
        if self.device.type != "cpu":
            self._dev_ints[:n_ints].copy_(self._ints[:n_ints], non_blocking=True)
            self._dev_int32[:B].copy_(self._int32[:B], non_blocking=True)
            self._dev_table[:n_rows].copy_(self._table[:n_rows], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        dev = self._dev_ints
        row_index = dev[3 * T + S : 3 * T + S + B]
        return StagedStep(
            input_ids=dev[:T],
            positions=dev[T : 2 * T],
            slot_mapping=dev[2 * T : 3 * T],
            sample_rows=dev[3 * T : 3 * T + S],
            block_tables=self._dev_table[:, :width].index_select(0, row_index),
            seq_lens=self._dev_int32[:B],
            query_start_loc=qsl if isinstance(qsl, list) else qsl.tolist(),
            seq_lens_list=seq_lens if isinstance(seq_lens, list) else seq_lens.tolist(),
            all_rows_sample=S == T,
        )

    def _chunk_layout(self, items: Sequence, rows: list[int]) -> tuple[np.ndarray, ...]:
        """Positions, slots, sampled rows, lengths and query starts of a step with multi-token chunks, per
        sequence with numpy (a chunk of n tokens costs a few array operations, not n Python iterations)."""
        B = len(items)
        counts = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=B)
        starts = np.fromiter((it.start for it in items), dtype=np.int64, count=B)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        T = int(qsl[-1])
        positions = np.arange(T) + np.repeat(starts - qsl[:-1], counts)  # each sequence's own positions
        token_rows = np.repeat(np.asarray(rows, dtype=np.int64), counts)
        bs = self.block_size
        slots = self._table_np[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        sample = np.fromiter((it.samples for it in items), dtype=bool, count=B)
        return positions, slots, qsl[1:][sample] - 1, starts + counts, qsl


def _verify_rows(items: Sequence, qsl: np.ndarray) -> np.ndarray:
    """Sampled rows when some chunks verify drafts: a chunk with m drafts samples its last m + 1 rows."""
    rows = [
        np.arange(qsl[i + 1] - 1 - len(getattr(it, "draft_token_ids", ())), qsl[i + 1])
        for i, it in enumerate(items)
        if it.samples
    ]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-row tensor on ``device`` without a blocking copy: a copy from pageable memory waits for the
    device to finish the forward first, so the host could not prepare anything meanwhile. Pinned + non_blocking
    queues the copy behind the forward instead (the caching host allocator keeps the buffer until it is done)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
