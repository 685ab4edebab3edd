"""What every route handler shares: the async engine, tokenizer, limits and metrics, plus the checks they all
make (model name, admission, model-dependent bounds, token budget) and the bounded pools blocking work runs in,
so each handler stays about its own endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from starlette.responses import Response, StreamingResponse

from small4.chat import MediaPolicy
from small4.engine import AsyncEngine, EngineDeadError, ImageInput, RequestStream, SamplingParams, TokenMaskFactory
from small4.server.errors import APIError
from small4.server.metrics import ServerMetrics
from small4.server.protocol import ChatCompletionRequest, CompletionRequest
from small4.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True)
class ServerLimits:
    max_model_len: int
    # sequences admitted beyond the engine's max_num_seqs (waiting, rendering, compiling) before new requests
    # get 503 + Retry-After
    max_queue: int = 256
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 32 * 1024
    retry_after_s: int = 1
    max_seqs_per_request: int = 64  # prompts x n of one request
    render_workers: int = 2  # per lane (small / large requests), separate from asyncio's default executor
    render_timeout_s: float = 30.0  # queueing + rendering + grammar compile of one request
    small_request_chars: int = 64 * 1024  # text-only requests up to this size render in the small lane


class Admission:
    """Counts sequences (prompts x n) from a request's arrival, before any rendering or grammar compile, until
    its response is done, so a burst cannot slip past the cap between arrival and the engine's next snapshot.
    Only the event loop touches the counter (one thread: check-and-add is atomic)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.peak = 0  # the most sequences ever admitted at once (tests and the load benchmark read it)

    def admit(self, num_seqs: int) -> Ticket | None:
        """A ticket for ``num_seqs`` sequences, or None when they do not fit now."""
        if self.in_flight + num_seqs > self.capacity:
            return None
        self.in_flight += num_seqs
        self.peak = max(self.peak, self.in_flight)
        return Ticket(self, num_seqs)


class Ticket:
    """Admitted sequences; ``release()`` is idempotent and also runs when the ticket is garbage collected (a
    streaming body that never started still gives its sequences back)."""

    def __init__(self, admission: Admission, num_seqs: int) -> None:
        self._admission, self.num_seqs, self._held = admission, num_seqs, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.in_flight -= self.num_seqs

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


async def hold_until_done(ticket: Ticket, respond: Awaitable[Response]) -> Response:
    """Awaits a handler's response holding the admission ticket: given back when the response is complete, or,
    for a streaming response, handed to its body (``sse_response_body``), which gives it back at the end."""
    try:
        response = await respond
    except BaseException:
        ticket.release()
        raise
    if not isinstance(response, StreamingResponse):
        ticket.release()
    return response


class ServerContext:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_name: str,
        limits: ServerLimits,
        media_policy: MediaPolicy | None = None,
        sampling_defaults: dict[str, float] | None = None,
    ) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        # generation_config.json's sampling values for fields a request leaves unset (--generation-config auto)
        self.sampling_defaults = dict(sampling_defaults or {})
        self.media_policy = media_policy or MediaPolicy()
        self.metrics = ServerMetrics(lambda: engine.stats)
        self.vocab_size = engine.engine.runner.config.text.vocab_size
        self.admission = Admission(engine.engine.scheduler.config.max_num_seqs + limits.max_queue)
        self.max_token_chars = _longest_token(tokenizer)
        self._pools = {
            lane: ThreadPoolExecutor(limits.render_workers, thread_name_prefix=f"small4-render-{lane}")
            for lane in ("small", "large")
        }

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def admit(self, num_seqs: int) -> Ticket:
        """Admission at arrival: 503 if the engine is dead, 400 if the request alone can never fit, 503 +
        Retry-After if the sequences in flight leave no room for it now."""
        if not self.engine.healthy:
            raise APIError(503, "the engine is not able to serve requests", code="engine_unhealthy")
        most = min(self.limits.max_seqs_per_request, self.admission.capacity)
        if num_seqs > most:
            raise APIError(400, f"this request asks for {num_seqs} sequences (prompts x n); at most {most}", "n")
        ticket = self.admission.admit(num_seqs)
        if ticket is None:
            raise APIError(
                503,
                "the server is busy; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )
        return ticket

    def check_model_bounds(self, fields: dict[str, list[int]]) -> None:
        """top_k and token ids within the vocabulary (the bounds pydantic cannot know)."""
        vocab = self.vocab_size
        for name, values in fields.items():
            if name == "top_k":
                bad, rule = [v for v in values if v > vocab], f"must be -1, 0 or at most the vocabulary size {vocab}"
            else:
                bad, rule = [v for v in values if not 0 <= v < vocab], f"token ids must be in [0, {vocab})"
            if bad:
                raise APIError(400, f"{name}: {rule}, got {bad[0]}", name)

    def sampling_params(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        max_tokens: int,
        logprobs: int | None,
        kept_special_token_ids: tuple[int, ...] = (),
    ) -> SamplingParams:
        """The request's ``SamplingParams`` (generation_config.json's defaults for the fields it leaves unset); their
        own validation, a backstop behind protocol.py, is a 400 too."""
        try:
            return body.sampling_params(max_tokens, logprobs, kept_special_token_ids, self.sampling_defaults)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuses, before any tokenizing, text that cannot fit: every token covers at most ``max_token_chars``
        characters, so a prompt of more than ``max_model_len * max_token_chars`` characters is over-length."""
        limit = self.limits.max_model_len * self.max_token_chars
        if num_chars > limit:
            raise APIError(
                400,
                f"this model's maximum context length is {self.limits.max_model_len} tokens; the prompt has "
                f"{num_chars} characters, more than that many tokens can hold",
                param,
                "context_length_exceeded",
            )

    async def run_blocking(self, fn: Callable[..., T], *args: object, size: int = 0) -> T:
        """Runs blocking request work (rendering, image decoding, tokenizing, grammar compiles) in a bounded pool,
        never asyncio's default executor: requests up to ``small_request_chars`` in their own lane, so large ones
        cannot starve them. The time limit covers queueing too (a queued call is cancelled); 503 past it. A call
        already running cannot be killed: it finishes in the background, holding its worker, so a lane stays
        bounded either way."""
        lane = "small" if size <= self.limits.small_request_chars else "large"
        future = asyncio.get_running_loop().run_in_executor(self._pools[lane], fn, *args)
        try:
            return await asyncio.wait_for(future, self.limits.render_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                503, f"preparing the request took longer than {self.limits.render_timeout_s:g} s", code="timeout"
            ) from None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        room = self.limits.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {self.limits.max_model_len} tokens; the "
                f"prompt has {prompt_len} tokens",
                "messages",
                "context_length_exceeded",
            )
        if requested is None:
            return room
        if requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {self.limits.max_model_len} tokens; you "
                f"requested {prompt_len + requested} ({prompt_len} in the prompt, {requested} to "
                "generate)",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested

    async def add(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        token_mask_factory: TokenMaskFactory | None = None,
        images: list[ImageInput] | None = None,
    ) -> RequestStream:
        try:
            stream = await self.engine.add(
                request_id, token_ids, params, token_mask_factory=token_mask_factory, images=images
            )
        except EngineDeadError as e:
            raise APIError(503, "the engine is not able to serve requests", code="engine_unhealthy") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        self.metrics.prompt_tokens.inc(len(token_ids))
        return stream

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _longest_token(tokenizer: Tokenizer) -> int:
    """The most bytes (so the most characters) one ordinary token covers; specials never come from text."""
    return max(
        (len(tokenizer.token_bytes(t)) for t in range(tokenizer.vocab_size) if not tokenizer.is_special(t)), default=1
    )
