"""The continuous-batching scheduler: which requests compute how many tokens in the next step.

Each step has a token budget and a sequence limit. Running decodes go first (one token each, so a long prompt
never stalls them), then running prefills continue in chunks, then waiting requests are admitted in arrival
order while blocks and budget last. When the cache runs out, the youngest running request is preempted by
recompute: its blocks are freed and it goes back to the front of the queue, keeping its output tokens.
The scheduler returns a plan; the runner executes it and reports sampled tokens back. Pure Python, no torch.

With async scheduling (the engine's overlap loop) a step's sampled tokens are read back only after the next step
was planned: ``advance_in_flight`` books a launched step at once (tokens computed, one ``PENDING_TOKEN`` placeholder
per sampled row), so ``schedule`` plans the next decode of each request around its placeholder, and
``resolve_in_flight`` later writes the real tokens and applies the stop rules exactly as ``update_from_output``
would have. A request certain to finish by length once its placeholder is resolved is not scheduled again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from small4.engine.kv_cache import BlockManager
from small4.engine.request import PENDING_TOKEN, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits. ``long_prefill_token_threshold`` caps one request's prefill tokens per step (0: no cap),
    so several long prompts share a step instead of running one after the other."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), or some running sequences could not decode each step"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}), or a long prompt could never be scheduled"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold needs enable_chunked_prefill")


@dataclass(frozen=True)
class ScheduledRequest:
    """Compute tokens ``[start, start + num_new_tokens)`` of ``request``; sample one token if ``samples``
    (the chunk reaches the end of the request's tokens). With ``draft_token_ids`` (speculative decoding) the chunk
    is the last sampled token followed by these drafts, and verification samples 1 to len(drafts) + 1 tokens."""

    request: Request
    num_new_tokens: int
    start: int
    samples: bool
    draft_token_ids: tuple[int, ...] = ()


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # async scheduling: the engine's ``InputPatch`` for decode rows whose input token is still on the device
    # (opaque here, read by the runner: set on the plan so ``execute(plan)`` keeps its one-argument seam)
    input_patch: object | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _StepPlan:
    """The plan under construction: tokens granted so far, in order, and the budget left."""

    budget: int
    granted: dict[Request, int] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)

    def grant(self, request: Request, num_new_tokens: int) -> None:
        self.granted[request] = num_new_tokens
        self.budget -= num_new_tokens

    def revoke(self, request: Request) -> None:
        """Take back a grant (its request was preempted later in the step) and return its tokens."""
        if request in self.granted:
            self.budget += self.granted.pop(request)


class Scheduler:
    """Owns the waiting queue and the running list; a step is ``schedule()``, the runner, then
    ``update_from_output()``. Request state changes only here (and in the block manager it drives)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is the youngest
        self._requests: dict[str, Request] = {}

    # ---- the queue --------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; reject one that could never run, rather than let it wait forever."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt > self.config.max_model_len:
            limit = self.config.max_model_len
            raise ValueError(f"prompt has {num_prompt} tokens, more than max_model_len={limit}")
        max_cached = self._max_cached_tokens(request)
        bm = self.block_manager
        if bm.num_blocks_for(max_cached) > bm.num_blocks:
            raise ValueError(
                f"request needs up to {max_cached} tokens of cache (prompt {num_prompt} + max_tokens "
                f"{request.sampling_params.max_tokens}), more than the whole cache holds "
                f"({bm.num_blocks} blocks x {bm.block_size} = {bm.num_blocks * bm.block_size} tokens)"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def _max_cached_tokens(self, request: Request) -> int:
        """Most tokens the request ever holds in the cache: the last sampled token is never computed, and
        generation ends at max_model_len (a prompt of exactly max_model_len still samples one token)."""
        final = request.num_prompt_tokens + request.sampling_params.max_tokens
        return max(request.num_prompt_tokens, min(final, self.config.max_model_len) - 1)

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a request from outside the step (abort, stop string); frees its blocks at once.
        Returns None if the id is unknown or already finished."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._retire(request, status, stop_reason)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan the next step: running decodes, then running prefill chunks, then admissions (FCFS)."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        decoding, prefilling = [], []
        for r in self.running:  # one pass: a step's host time grows with every running sequence
            left = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if r.num_pending_outputs and self._ends_by_length(r):
                continue  # its in-flight token is its last: another row would only be dropped
            if left == 1:
                decoding.append(r)
            elif left > 1:
                prefilling.append(r)
        for request in decoding + prefilling:
            if plan.budget == 0:
                break
            if request.status is RequestStatus.RUNNING:  # not preempted earlier in this step
                self._schedule_running(request, plan)
        if not plan.preempted:  # the cache is short: admitting more would only thrash it
            self._admit_waiting(plan)
        scheduled = [_scheduled(r, n) for r, n in plan.granted.items()]
        return SchedulerOutput(scheduled=scheduled, preempted=plan.preempted)

    def _chunk(self, num_tokens: int, budget: int) -> int:
        """Tokens to compute this step out of ``num_tokens`` remaining; 0 if they may not be split."""
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            num_tokens = min(num_tokens, threshold)
        if num_tokens > budget:
            return budget if self.config.enable_chunked_prefill else 0
        return num_tokens

    def _schedule_running(self, request: Request, plan: _StepPlan) -> None:
        num_new = self._chunk(request.num_tokens - request.num_computed_tokens, plan.budget)
        if request.draft_token_ids and num_new == 1:  # a decode with drafts verifies them too, budget permitting
            num_new += min(len(request.draft_token_ids), plan.budget - 1)
        if num_new == 0:
            return
        while (new_blocks := self.block_manager.allocate_slots(request, num_new)) is None:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return
        request.block_ids.extend(new_blocks)
        plan.grant(request, num_new)

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Recompute later: free the blocks, keep the tokens, queue it first so it keeps its turn."""
        self.running.remove(request)
        plan.revoke(request)  # a decode granted earlier in this step
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.draft_token_ids = []  # their slots are gone; the draft catches up again during the recompute
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        plan.preempted.append(request)

    def _admit_waiting(self, plan: _StepPlan) -> None:
        """Admit from the head of the queue; stop at the first that does not fit (no overtaking)."""
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed, num_cached = self.block_manager.get_computed_blocks(request)  # the one lookup
            num_new = self._chunk(request.num_tokens - num_cached, plan.budget)
            new_blocks = self.block_manager.allocate_slots(request, num_new, computed) if num_new else None
            if new_blocks is None:
                return
            request.block_ids = computed + new_blocks
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:  # usage reports the first admission, not recompute after preemption
                request.num_cached_prompt_tokens = num_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.grant(request, num_new)

    # ---- after the step ---------------------------------------------------------------------------------
    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int | None]) -> list[Request]:
        """Advance each scheduled request, publish its full blocks, append sampled tokens, apply stop rules.

        ``sampled[request_id]`` is the token sampled for a request whose chunk reached its end, None (or
        absent) for a prefill chunk that did not. Returns the requests that finished in this step.
        """
        finished: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # aborted between schedule() and now
                continue
            token = sampled.get(request.request_id)
            if item.draft_token_ids:
                if self._update_verified(request, item, token):
                    finished.append(request)
                continue
            if (token is not None) != item.samples:
                rid = request.request_id
                raise ValueError(f"request {rid!r}: sampled token {token!r} but samples={item.samples}")
            request.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(request)
            if token is None:
                continue
            request.output_token_ids.append(token)
            status, stop_reason = self._check_stop(request, token)
            if status is not None:
                del self._requests[request.request_id]
                self._retire(request, status, stop_reason)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    # ---- async scheduling: a step booked at launch, its tokens written when they are read back ------------------
    def advance_in_flight(self, output: SchedulerOutput) -> None:
        """Book a launched step whose tokens are still on the device: every chunk counts as computed, and each
        sampling row gets a ``PENDING_TOKEN`` placeholder, so the next ``schedule()`` sees these requests as
        decoding. Full blocks are published now only when every computed token is known (a prefill chunk);
        a decode's block waits for ``resolve_in_flight``. Speculative chunks never come here (they fall back)."""
        for item in output.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                request.output_token_ids.append(PENDING_TOKEN)
                request.num_pending_outputs += 1
            if request.num_computed_tokens <= request.num_tokens - request.num_pending_outputs:
                self.block_manager.cache_full_blocks(request)

    def resolve_in_flight(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """The tokens of a step booked by ``advance_in_flight``: each replaces its request's oldest placeholder,
        and the stop rules run on exactly the state ``update_from_output`` would have seen (later placeholders and
        the next step's computed token set aside). A request that finishes here was maybe already scheduled in
        the step launched after this one: it is retired now (blocks freed, placeholders dropped), and that row's
        token is dropped when it comes. Requests aborted or finished meanwhile are skipped. Returns the finished."""
        finished: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if not item.samples or request.is_finished or not request.num_pending_outputs:
                continue
            token = sampled[request.request_id]
            out = request.output_token_ids
            out[len(out) - request.num_pending_outputs] = token
            request.num_pending_outputs -= 1  # the later placeholders stay: stops count only resolved tokens
            known = len(request.prompt_token_ids) + len(out) - request.num_pending_outputs
            computed = request.num_computed_tokens
            status, stop_reason = self._check_stop(request, token)
            if status is not None:
                # a sampling step leaves exactly the last token uncomputed: what update_from_output publishes
                request.num_computed_tokens = min(computed, known - 1)
                self.block_manager.cache_full_blocks(request)
                self._finish_resolved(request, status, stop_reason)  # drops the later placeholders
                finished.append(request)
            elif computed <= known:
                self.block_manager.cache_full_blocks(request)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    def _finish_resolved(self, request: Request, status: RequestStatus, stop_reason: int | None) -> None:
        """A request found finished when its token came back; it may have been preempted (waiting) since."""
        del self._requests[request.request_id]
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._retire(request, status, stop_reason)

    def _ends_by_length(self, request: Request) -> bool:
        """Whether the request finishes by length once its pending tokens are resolved (whatever they are)."""
        return (
            len(request.output_token_ids) >= request.sampling_params.max_tokens
            or request.num_tokens >= self.config.max_model_len
        )

    def _update_verified(self, request: Request, item: ScheduledRequest, tokens) -> bool:
        """A speculative decode: ``tokens`` are the accepted drafts then the target's own token. Only the
        positions whose tokens were accepted count as computed (the rejected drafts' slots are overwritten later,
        and the prefix cache never hashes them); tokens after a stop are dropped. Returns whether it finished."""
        tokens = list(tokens or [])
        num_drafts = len(item.draft_token_ids)
        if not 1 <= len(tokens) <= num_drafts + 1 or tokens[:-1] != list(item.draft_token_ids[: len(tokens) - 1]):
            raise ValueError(f"request {request.request_id!r}: {tokens} does not verify drafts {item.draft_token_ids}")
        request.draft_token_ids = []
        request.num_computed_tokens += item.num_new_tokens - num_drafts + len(tokens) - 1
        request.num_draft_tokens += num_drafts
        request.num_accepted_draft_tokens += len(tokens) - 1
        request.num_verify_steps += 1
        for token in tokens:
            request.output_token_ids.append(token)
            status, stop_reason = self._check_stop(request, token)
            if status is not None:
                self.block_manager.cache_full_blocks(request)
                del self._requests[request.request_id]
                self._retire(request, status, stop_reason)
                return True
        self.block_manager.cache_full_blocks(request)
        return False

    def _check_stop(self, request: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        """EOS and stop ids end a request only once ``min_tokens`` are out; they win over the length limit
        when both hold, since the model did choose to stop."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token == request.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        num_tokens = request.num_tokens - request.num_pending_outputs  # placeholders are not tokens yet
        if request.num_output_tokens >= params.max_tokens or num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _retire(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        if request.num_pending_outputs:  # finished while tokens were in flight: they are dropped
            del request.output_token_ids[-request.num_pending_outputs :]
            request.num_pending_outputs = 0
        self.block_manager.free(request)
        request.status = status
        request.stop_reason = stop_reason


def _scheduled(request: Request, num_new: int) -> ScheduledRequest:
    """The plan entry for a grant; a grant past the request's tokens carries that many of its drafts."""
    start = request.num_computed_tokens
    extra = start + num_new - request.num_tokens
    drafts = tuple(request.draft_token_ids[:extra]) if extra > 0 else ()
    return ScheduledRequest(request, num_new, start, start + num_new >= request.num_tokens, drafts)
