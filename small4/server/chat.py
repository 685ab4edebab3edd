"""POST /v1/chat/completions: render with mistral-common, generate (optionally under a grammar), parse the
output into content / reasoning_content / tool_calls, answer as JSON or as SSE deltas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from small4.chat.grammar import GrammarCompiler, GrammarError, enforce_schemas, response_format_from_openai
from small4.chat.parse import MARKERS, OutputParser, ParsedDelta
from small4.chat.render import ChatRenderer, RenderedPrompt, RenderError
from small4.engine.engine import TokenMaskFactory
from small4.engine.multimodal import ImageInput
from small4.engine.sampler import TokenLogprobs
from small4.engine.token_mask import token_mask_provider
from small4.server.context import ServerContext
from small4.server.errors import APIError
from small4.server.protocol import ChatCompletionRequest
from small4.server.streaming import sse, sse_response_body, timed_outputs, until_disconnect

ENDPOINT = "chat"


@dataclass
class _Choice:
    index: int
    parser: OutputParser
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0


class ChatHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.renderer = ChatRenderer(ctx.tokenizer.mistral, ctx.model_name, media_policy=ctx.media_policy)
        self.grammars = GrammarCompiler(ctx.tokenizer.mistral)
        self.control_token_ids = tuple(ctx.tokenizer.special_id(m) for m in MARKERS)

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        self.ctx.check_model(body.model)
        self.ctx.check_capacity()
        rendered = await asyncio.to_thread(self._render, body)  # may fetch remote images: off the event loop
        prompt_len = len(rendered.token_ids)
        max_tokens = self.ctx.resolve_max_tokens(prompt_len, body.requested_max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        # control tokens ([THINK], [TOOL_CALLS], ...) stay in the text for the output parser; other specials never
        params = body.sampling_params(max_tokens, logprobs, self.control_token_ids, self.ctx.sampling_defaults)
        mask = await self._token_mask(body, rendered)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.ctx.add(
            rid, rendered.token_ids, params, token_mask_factory=mask, images=_image_inputs(rendered)
        )
        tools = bool(body.tools) and body.tool_choice != "none"
        choices = [_Choice(i, OutputParser(reasoning=rendered.reasoning, tools=tools)) for i in range(body.n)]
        created = int(time.time())
        if body.stream:
            chunks = self._stream(body, rid, created, stream, choices, prompt_len)
            return StreamingResponse(
                sse_response_body(chunks, self.ctx.metrics, ENDPOINT), media_type="text/event-stream"
            )
        done = await until_disconnect(request, self._collect(stream, choices))
        if done is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(self._final(body, rid, created, choices, prompt_len))

    def _render(self, body: ChatCompletionRequest) -> RenderedPrompt:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        try:
            return self.renderer.render(
                messages,
                tools=body.tools,
                tool_choice=body.tool_choice,
                reasoning_effort=body.reasoning_effort,
                parallel_tool_calls=body.parallel_tool_calls,
            )
        except RenderError as e:
            raise APIError(400, str(e), getattr(e, "param", None) or "messages") from e

    async def _token_mask(self, body: ChatCompletionRequest, rendered: RenderedPrompt) -> TokenMaskFactory | None:
        """Compiles the request's grammar (json_schema / json_object / tool_choice required or named) off the event
        loop; each of the n sequences then gets its own matcher over the shared compiled grammar."""
        request = rendered.request
        try:
            if body.response_format is not None:
                rf = response_format_from_openai(body.response_format)
                request = request.model_copy(update={"response_format": rf})
            grammar = self.grammars.grammar_for(enforce_schemas(request), rendered.reasoning)
            if grammar is None:
                return None
            compiled = await asyncio.to_thread(self.grammars.compile, grammar)
        except GrammarError as e:
            raise APIError(400, str(e), "response_format" if body.response_format else "tool_choice") from e
        vocab = self.ctx.vocab_size
        return lambda: token_mask_provider(self.grammars.matcher(compiled), vocab)

    async def _collect(self, stream, choices: list[_Choice]) -> bool:
        async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
            c = choices[out.index]
            c.parser.feed(out.new_text)
            c.logprobs += out.logprobs
            c.num_tokens += len(out.new_token_ids)
            if out.finished:
                c.parser.finish()
                c.finish_reason = out.finish_reason
        return True

    def _finish_reason(self, c: _Choice) -> str | None:
        if c.parser.tool_calls and c.finish_reason == "stop":
            return "tool_calls"
        return c.finish_reason

    def _logprobs_body(self, lps: list[TokenLogprobs]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            raw = self.ctx.tokenizer.token_bytes(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
            ]
        }

    def _final(self, body, rid, created, choices: list[_Choice], prompt_len: int) -> dict[str, Any]:
        out = []
        for c in choices:
            p = c.parser
            message: dict[str, Any] = {"role": "assistant", "content": p.content or (None if p.tool_calls else "")}
            if p.reasoning_content:
                message["reasoning_content"] = p.reasoning_content
            if p.tool_calls:
                message["tool_calls"] = [
                    {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                    for t in p.tool_calls
                ]
            out.append(
                {
                    "index": c.index,
                    "message": message,
                    "finish_reason": self._finish_reason(c),
                    "logprobs": self._logprobs_body(c.logprobs) if body.logprobs else None,
                }
            )
        completion = sum(c.num_tokens for c in choices)
        self.ctx.metrics.requests.labels(ENDPOINT, "200").inc()
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.ctx.model_name,
            "choices": out,
            "usage": {
                "prompt_tokens": prompt_len,
                "completion_tokens": completion,
                "total_tokens": prompt_len + completion,
            },
        }

    @staticmethod
    def _delta_body(d: ParsedDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if d.content:
            delta["content"] = d.content
        if d.reasoning_content:
            delta["reasoning_content"] = d.reasoning_content
        if d.tool_calls:
            calls = []
            for t in d.tool_calls:
                call: dict[str, Any] = {"index": t.index, "function": {"arguments": t.arguments_delta}}
                if t.id is not None:
                    call["id"], call["type"] = t.id, "function"
                if t.name is not None:
                    call["function"]["name"] = t.name
                calls.append(call)
            delta["tool_calls"] = calls
        return delta

    async def _stream(self, body, rid, created, stream, choices: list[_Choice], prompt_len: int) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.ctx.model_name}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lps=None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if body.logprobs:
                choice["logprobs"] = self._logprobs_body(lps or [])
            return sse({**base, "choices": [choice]})

        try:
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
                c = choices[out.index]
                c.num_tokens += len(out.new_token_ids)
                delta = self._delta_body(c.parser.feed(out.new_text))
                if out.finished:
                    tail = self._delta_body(c.parser.finish())
                    delta = _merge_deltas(delta, tail)
                    c.finish_reason = out.finish_reason
                if delta or out.logprobs:
                    yield chunk(c.index, delta, None, out.logprobs)
                if out.finished:
                    yield chunk(c.index, {}, self._finish_reason(c))
            if body.stream_options and body.stream_options.include_usage:
                completion = sum(c.num_tokens for c in choices)
                usage = {
                    "prompt_tokens": prompt_len,
                    "completion_tokens": completion,
                    "total_tokens": prompt_len + completion,
                }
                yield sse({**base, "choices": [], "usage": usage})
        finally:
            await stream.aclose()


def _image_inputs(rendered: RenderedPrompt) -> list[ImageInput] | None:
    """mistral-common's preprocessed pixel arrays, keyed for the prefix cache by the server-computed content hash."""
    if not rendered.images:
        return None
    return [ImageInput(pixels, digest) for pixels, digest in zip(rendered.images, rendered.image_hashes, strict=True)]


def _merge_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key in ("content", "reasoning_content"):
        if key in b:
            merged[key] = merged.get(key, "") + b[key]
    if "tool_calls" in b:
        merged["tool_calls"] = merged.get("tool_calls", []) + b["tool_calls"]
    return merged
