"""What the engine hands back after each step, per sequence: the new tokens and text, and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from small4.engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """One step's delta for one sequence (``index`` tells the n>1 siblings of ``request_id`` apart).

    ``finish_reason`` is "stop", "length" or "abort" once ``finished``; ``stop_reason`` is the stop string or stop
    token id that ended it (None for EOS)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # speculative decoding: drafts accepted in this step (None: it verified none), and the sequence's totals
    num_accepted_this_step: int | None = None
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_verify_steps: int = 0


@dataclass
class CompletionOutput:
    """A finished sequence, as the offline API returns it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprobs] | None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
