"""Async scheduling (vLLM v1's async scheduling, mini-sglang's overlap loop): the host plans and launches step N+1
while the device still runs step N, and processes step N's results (stop checks, detokenizing, outputs) after that.

One ``Engine.step()`` call in overlap mode: schedule step N+1 (step N's sampled rows are ``PENDING_TOKEN``
placeholders, booked by ``Scheduler.advance_in_flight``), stage and launch its forward and sampler (each decode row
whose input is step N's token takes it on the device from step N's sampled-ids tensor: ``InputPatch``), book it,
then wait for step N's ids (a non-blocking copy into pinned host memory and a CUDA event: the one place the host
waits for the device), write them (``Scheduler.resolve_in_flight``) and emit their outputs. So the device always has
the next step queued behind the one it runs, and the host's work for a step is off the device's critical path as
long as it is shorter than a device step. A request found finished when its token comes back may already have a
row in the launched step: that row's token is dropped when it comes; its blocks were freed at once (the launched
step still writes into them, stream-ordered before any later step that reuses them).

Which steps overlap: only while every live sequence is *plain*, i.e. nothing about its next step needs the previous
token on the host before the launch. These fall back to the synchronous step (``Engine.step`` first finishes the step
in flight, then steps synchronously until they are gone, then overlaps again):

- a grammar token mask (the matcher must consume the previous token to give the next mask);
- repetition / presence / frequency penalties (the device-side counts are updated from host token lists);
- logprobs (read back to the host inside the sampler: a blocking copy that would serialise the loop anyway);
- speculative decoding (drafts are proposed from the verified tokens on the host), i.e. any engine with a draft;
- a runner that cannot patch its inputs on the device (the tensor-parallel driver: not tested across ranks).

What does overlap, and why it is safe: greedy and sampled rows (seeded rows draw from their own generators, so
their tokens are the synchronous ones; unseeded rows share the engine's generator, so an extra row of a request that
just finished shifts their draws: reproducible run to run, not equal to the synchronous loop's); ``min_tokens``
(the ban needs only the output count, which placeholders keep); stop token ids, EOS, stop strings and max_tokens
(checked when the token is read back; a request certain to end by length is not scheduled again); chunked
prefill, prefix caching, images (prompt tokens are on the host); n > 1 (independent sequences); preemption (a
request preempted while its token is in flight is re-admitted only after that token is resolved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from small4.engine.request import Request
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import SchedulerOutput


def overlaps(params: SamplingParams, has_token_mask: bool) -> bool:
    """Whether a sequence with these settings may run in an overlapped step (see the module docstring)."""
    return (
        not has_token_mask
        and params.logprobs is None
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )


@dataclass
class InFlight:
    """A launched step whose sampled ids are still on their way to the host."""

    plan: SchedulerOutput
    request_ids: list[str]  # the sampled rows, in order
    requests: list[Request]  # the same rows' requests (an id may be reused by a new request before we resolve)
    tokens: torch.Tensor  # int64 [S] on the device: what the next step's decode rows read
    host: torch.Tensor  # int64 [S]: pinned on CUDA, filled by a non-blocking copy
    ready: torch.cuda.Event | None  # recorded after that copy (None on the CPU: already there)
    parents: list[str]  # the parent request ids of every scheduled row, for StepFailedError

    @classmethod
    def launch(
        cls, plan: SchedulerOutput, request_ids: list[str], requests: list[Request], tokens: torch.Tensor, parents
    ) -> InFlight:
        """Start the copy of ``tokens`` to the host without waiting for it."""
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = tokens, None
        return cls(plan, request_ids, requests, tokens, host, ready, parents)

    def row_of(self) -> dict[str, int]:
        """Request id -> row in ``tokens``."""
        return {rid: i for i, rid in enumerate(self.request_ids)}

    def read(self) -> list[int]:
        """The sampled ids on the host: waits for the device only here."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
