"""POST /v1/completions: text or token-id prompts, plain continuation (no chat template)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from small4.engine import TokenLogprobs
from small4.server.context import ServerContext, Ticket, hold_until_done
from small4.server.errors import APIError
from small4.server.protocol import CompletionRequest
from small4.server.streaming import sse, sse_response_body, timed_outputs, until_disconnect

ENDPOINT = "completions"


@dataclass
class _Choice:
    index: int
    prefix: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


def _legacy_logprobs(ctx: ServerContext, lps: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    tokens = [ctx.token_text(lp.token_id) for lp in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{ctx.token_text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


class CompletionHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of every prompt; blocking for long text, so it runs in the render pool."""
        vocab = self.ctx.vocab_size
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(self.ctx.tokenizer.encode(prompt, bos=True))
            elif any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            else:
                out.append(prompt)
        return out

    async def __call__(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        self.ctx.check_model(body.model)
        self.ctx.check_model_bounds(body.model_bounded_fields())
        texts = body.prompts()
        for text in texts:
            self.ctx.check_prompt_chars(len(text) if isinstance(text, str) else 0, "prompt")
        ticket = self.ctx.admit(len(texts) * body.n)  # sequences, at arrival, before tokenizing
        return await hold_until_done(ticket, self._respond(body, request, ticket, texts))

    async def _respond(
        self, body: CompletionRequest, request: Request, ticket: Ticket, texts: list[str | list[int]]
    ) -> JSONResponse | StreamingResponse:
        size = sum(len(t) for t in texts if isinstance(t, str))
        prompts = await self.ctx.run_blocking(self._prompt_ids, texts, size=size)
        max_tokens = self.ctx.resolve_max_tokens(max(len(p) for p in prompts), body.max_tokens)
        params = self.ctx.sampling_params(body, max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(await self.ctx.add(f"{rid}-{i}", ids, params))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        created = int(time.time())
        echo = [self.ctx.tokenizer.decode(p) if body.echo else "" for p in prompts]
        choices = [_Choice(i * body.n + k, echo[i]) for i in range(len(prompts)) for k in range(body.n)]
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        usage["prompt_tokens_details"] = {"cached_tokens": 0}  # prefix-cache hits, summed over the prompts
        if body.stream:
            gen = self._stream(body, rid, created, streams, choices, usage)
            body_iter = sse_response_body(gen, self.ctx.metrics, ENDPOINT, ticket)
            return StreamingResponse(body_iter, media_type="text/event-stream")
        result = await until_disconnect(request, self._collect(streams, choices, usage, body.n))
        if result is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(self._final(body, rid, created, choices, usage))

    async def _collect(self, streams, choices: list[_Choice], usage: dict[str, int], n: int) -> bool:
        for p, stream in enumerate(streams):
            async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
                self._apply(choices[p * n + out.index], out, usage)
        return True

    @staticmethod
    def _apply(choice: _Choice, out, usage: dict[str, int]) -> None:
        choice.text += out.new_text
        choice.token_ids += out.new_token_ids
        choice.logprobs += out.logprobs
        usage["completion_tokens"] += len(out.new_token_ids)
        if out.finished:
            choice.finish_reason = out.finish_reason
            if out.index == 0:  # the n sequences of a prompt share its cached blocks: count them once
                usage["prompt_tokens_details"]["cached_tokens"] += out.num_cached_tokens

    def _choice_body(
        self, body: CompletionRequest, c: _Choice, text: str, lps: list[TokenLogprobs], offset: int
    ) -> dict[str, Any]:
        return {
            "index": c.index,
            "text": text,
            "logprobs": _legacy_logprobs(self.ctx, lps, offset) if body.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }

    def _final(self, body, rid, created, choices: list[_Choice], usage) -> dict[str, Any]:
        self.ctx.metrics.requests.labels(ENDPOINT, "200").inc()
        out = [self._choice_body(body, c, c.prefix + c.text, c.logprobs, len(c.prefix)) for c in choices]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.ctx.model_name,
            "choices": out,
            "usage": usage,
        }

    async def _stream(self, body, rid, created, streams, choices: list[_Choice], usage) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.ctx.model_name}
        try:
            for p, stream in enumerate(streams):
                for c in choices[p * body.n : (p + 1) * body.n]:
                    if c.prefix:
                        yield sse({**base, "choices": [self._choice_body(body, c, c.prefix, [], 0)]})
                async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
                    c = choices[p * body.n + out.index]
                    offset = len(c.prefix) + len(c.text)
                    self._apply(c, out, usage)
                    if out.new_text or out.finished or out.logprobs:
                        chunk = self._choice_body(body, c, out.new_text, out.logprobs, offset)
                        chunk["finish_reason"] = out.finish_reason if out.finished else None
                        yield sse({**base, "choices": [chunk]})
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield sse({**base, "choices": [], "usage": usage})
        finally:
            for s in streams:
                await s.aclose()
