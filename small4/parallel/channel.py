"""The control channel between rank 0 and the workers: plain structured data, never pickle.

A message is a JSON object sent as bytes: its length (one int64) then a uint8 tensor, both broadcast from rank 0
over the CPU (gloo) group. Step inputs follow as tensors broadcast over the tensor group: one packed int64 tensor
(token ids, positions, slots, sampling rows, image rows, the flattened block table) and, when the step has image
rows, one tensor of their embeddings. The header says how to unpack them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from small4.model.context import AttentionMetadata
from small4.parallel.state import Dist


def send_json(d: Dist, message: dict) -> None:
    payload = torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src=0, group=d.cpu_group)
    dist.broadcast(payload, src=0, group=d.cpu_group)


def recv_json(d: Dist) -> dict:
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=d.cpu_group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=d.cpu_group)
    message = json.loads(bytes(payload.numpy()).decode())
    if not isinstance(message, dict) or "op" not in message:
        raise RuntimeError(f"malformed control message from rank 0: {message!r:.200}")
    return message


@dataclass
class StepInputs:
    """Everything ``ModelRunner.forward_step`` consumes."""

    ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [S]
    images: tuple[torch.Tensor, torch.Tensor] | None  # (rows [N], embeddings [N, hidden])


def send_step(d: Dist, step: StepInputs) -> None:
    meta = step.meta
    tables = meta.block_tables
    header = {
        "op": "step",
        "tokens": int(step.ids.numel()),
        "query_start_loc": [int(x) for x in meta.query_start_loc],
        "seq_lens": [int(x) for x in meta.seq_lens],
        "block_size": meta.block_size,
        "cached": tables is not None,
        "table_width": int(tables.shape[1]) if tables is not None else 0,
        "samples": int(step.sample_rows.numel()),
        "images": 0 if step.images is None else int(step.images[0].numel()),
    }
    send_json(d, header)
    parts = [step.ids, step.positions]
    if tables is not None:
        parts += [meta.slot_mapping, tables.reshape(-1)]
    parts.append(step.sample_rows)
    if step.images is not None:
        parts.append(step.images[0])
    dist.broadcast(torch.cat([p.to(torch.int64) for p in parts]), src=0, group=d.group)
    if step.images is not None:
        dist.broadcast(step.images[1].contiguous(), src=0, group=d.group)


def recv_step(d: Dist, header: dict, hidden_size: int, dtype: torch.dtype) -> StepInputs:
    """The inputs of the step that ``header`` (already received) announced."""
    T, B, S, N = header["tokens"], len(header["seq_lens"]), header["samples"], header["images"]
    W = header["table_width"]
    sizes = [T, T] + ([T, B * W] if header["cached"] else []) + [S, N]
    packed = torch.empty(sum(sizes), dtype=torch.int64, device=d.device)
    dist.broadcast(packed, src=0, group=d.group)
    pieces = list(packed.split(sizes))
    ids, positions = pieces[0], pieces[1]
    slots = tables = None
    if header["cached"]:
        slots, tables = pieces[2], pieces[3].view(B, W).to(torch.int32)
    sample_rows, image_rows = pieces[-2], pieces[-1]
    images = None
    if N:
        embeds = torch.empty(N, hidden_size, dtype=dtype, device=d.device)
        dist.broadcast(embeds, src=0, group=d.group)
        images = (image_rows, embeds)
    meta = AttentionMetadata(
        query_start_loc=header["query_start_loc"],
        seq_lens=header["seq_lens"],
        slot_mapping=slots,
        block_tables=tables,
        block_size=header["block_size"],
    )
    return StepInputs(ids, positions, meta, sample_rows, images)
