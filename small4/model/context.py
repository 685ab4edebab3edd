"""Per-step batch layout, built by the model runner and read by every attention layer.

A step's tokens are one flat batch: the new tokens of many sequences (prefill chunks and decodes) laid end to end.
Keeping this in one object keeps model signatures at ``forward(input_ids, positions, meta, kv_caches)``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def for_prefill(cls, seq_lens: list[int]) -> AttentionMetadata:
        """Stateless causal prefill of whole sequences (no cache): parity tests, scoring, training."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(query_start_loc=starts, seq_lens=list(seq_lens))
