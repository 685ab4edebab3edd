"""The state of one sequence as the engine sees it: tokens, progress through the cache, blocks, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from small4.engine.sampling_params import SamplingParams

# the value an output token holds while it is still being sampled on the device (async scheduling): never a token id,
# so a placeholder that reached the model's embedding would fail loudly instead of computing garbage
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """One sequence. ``num_computed_tokens`` counts tokens whose latent already sits in the cache.

    A request is "prefilling" while ``num_computed_tokens < num_tokens - 1`` and "decoding" when exactly the last
    sampled token remains to be computed. Preemption by recompute resets ``num_computed_tokens`` (and the blocks)
    but keeps the output tokens, so the request continues exactly where it stopped.
    ``block_hash_extras`` carries per-token extra keys for prefix hashing (image content hashes), or None.
    With async scheduling, the last ``num_pending_outputs`` output tokens are ``PENDING_TOKEN`` placeholders for
    tokens sampled on the device but not yet read back: they count in ``num_tokens`` (the scheduler plans around
    them) but not in ``num_output_tokens`` (what stops and usage see).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    block_hash_extras: list[bytes | None] | None = None
    mm_inputs: object | None = None  # engine.multimodal.MultiModalInputs; opaque to the scheduler
    # speculative decoding: the draft's proposals for the tokens after the last sampled one (verified next step;
    # their cache slots are already allocated), and what verification made of this request's drafts so far
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_verify_steps: int = 0
    num_pending_outputs: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_pending_outputs

    @property
    def is_finished(self) -> bool:
        return self.status.finished


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output without copying the whole sequence (a decode reads one token)."""
    prompt, num_prompt = request.prompt_token_ids, request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return prompt[start:end]
    return prompt[start:] + request.output_token_ids[: end - num_prompt]
