"""How the model is split over ranks: one frozen dataclass, validated against the model's shapes once.

Attention (heads), the embedding and the lm_head (vocabulary) are split over ``tensor_parallel_size`` ranks, or
replicated when it is 1. The MoE block is always split over all ``world_size`` ranks: routed experts either
partitioned (expert parallel) or each expert's intermediate width split (tensor parallel), the shared expert's
intermediate width split. Either way the MoE output is a partial sum, so one all-reduce per MoE block combines it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from small4.config import ConfigError, TextConfig


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1  # > 1: the routed experts are partitioned over this many ranks
    # expert dispatch (ep.py): batches of at least this many tokens go all-to-all, smaller ones through the gather
    # (no extra collective); None: always the gather, the faster one while tokens are replicated (measured)
    all_to_all_min_tokens: int | None = None

    def __post_init__(self) -> None:
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        if tp < 1 or ep < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got tensor {tp}, expert {ep}")
        if tp > 1 and ep > 1 and tp != ep:
            raise ConfigError(f"expert parallel size {ep} must equal the tensor parallel size {tp} (or be 1)")
        if self.all_to_all_min_tokens is not None and self.all_to_all_min_tokens < 1:
            raise ConfigError(f"all_to_all_min_tokens must be >= 1 or None, got {self.all_to_all_min_tokens}")

    @property
    def world_size(self) -> int:
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @property
    def expert_parallel(self) -> bool:
        return self.expert_parallel_size > 1

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self, text: TextConfig) -> None:
        """Every split must be exact: fails with the shape that does not divide."""
        tp, n = self.tensor_parallel_size, self.world_size
        checks = [("num_heads", text.num_heads, tp), ("vocab_size", text.vocab_size, tp)]
        if self.expert_parallel:
            checks.append(("num_experts", text.num_experts, n))
        else:
            checks.append(("moe_intermediate_size", text.moe_intermediate_size, n))
        checks.append(("shared expert width", text.moe_intermediate_size * text.num_shared_experts, n))
        for name, value, parts in checks:
            if value % parts:
                raise ConfigError(f"{name} = {value} does not split over {parts} ranks")


@dataclass(frozen=True)
class Range:
    """[start, stop) of a split dimension."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def __contains__(self, i: int) -> bool:
        return self.start <= i < self.stop


def split(total: int, parts: int, index: int) -> Range:
    size = total // parts
    return Range(index * size, (index + 1) * size)
