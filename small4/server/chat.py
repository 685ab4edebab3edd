"""POST /v1/chat/completions: render with mistral-common, generate (optionally under a grammar), parse the
output into content / reasoning_content / tool_calls, answer as JSON or as SSE deltas."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from small4.chat import (
    MARKERS,
    ChatRenderer,
    CompiledGrammar,
    Dialect,
    GrammarCompiler,
    GrammarError,
    OutputParser,
    ParsedDelta,
    RenderedPrompt,
    RenderError,
    enforce_schemas,
    response_format_from_openai,
)
from small4.chat import dialect as dia
from small4.engine import (
    GrammarMaskFactory,
    GrammarSpec,
    ImageInput,
    TokenLogprobs,
    TokenMaskFactory,
    token_mask_provider,
)
from small4.server.context import ServerContext, Ticket, hold_until_done
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
    num_cached: int = 0
    reasoning_tokens: int = 0
    _thinking: bool = False

    def count(self, out, think_id: int, end_think_id: int) -> None:
        """Token accounting of one engine output: totals, prefix-cache hits, and reasoning tokens (the
        ``[THINK]`` ... ``[/THINK]`` span, markers included)."""
        self.num_tokens += len(out.new_token_ids)
        self.num_cached = max(self.num_cached, out.num_cached_tokens)
        for t in out.new_token_ids:
            if t == think_id:
                self._thinking = True
            if self._thinking:
                self.reasoning_tokens += 1
            if t == end_think_id:
                self._thinking = False


class ChatHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.renderer = ChatRenderer(ctx.tokenizer.mistral, ctx.model_name, media_policy=ctx.media_policy)
        self.grammars = GrammarCompiler(ctx.tokenizer.mistral)
        self.control_token_ids = tuple(ctx.tokenizer.special_id(m) for m in MARKERS)
        self._think_ids = (ctx.tokenizer.special_id(MARKERS[0]), ctx.tokenizer.special_id(MARKERS[1]))

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        self.ctx.check_model(body.model)
        self.ctx.check_model_bounds(body.model_bounded_fields())
        chars, has_images = _text_size(body)
        self.ctx.check_prompt_chars(chars, "messages")
        ticket = self.ctx.admit(body.n)  # at arrival, before any rendering: the cap holds under a burst
        # rendering may fetch and decode images, then the grammar compiles: both in the bounded render lanes, by size
        size = chars + _json_size(body.tools, body.response_format)
        size = self.ctx.limits.small_request_chars + 1 if has_images else size
        return await hold_until_done(ticket, self._respond(body, request, ticket, size))

    async def _respond(
        self, body: ChatCompletionRequest, request: Request, ticket: Ticket, size: int
    ) -> JSONResponse | StreamingResponse:
        dialect = _dialect(body, request)
        rendered = await self.ctx.run_blocking(self._render, body, size=size)
        prompt_len = len(rendered.token_ids)
        max_tokens = self.ctx.resolve_max_tokens(prompt_len, body.requested_max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        # control tokens ([THINK], [TOOL_CALLS], ...) stay in the text for the output parser; other specials never
        params = self.ctx.sampling_params(body, max_tokens, logprobs, self.control_token_ids)
        mask = await self._token_mask(body, rendered, size)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.ctx.add(
            rid, rendered.token_ids, params, token_mask_factory=mask, images=_image_inputs(rendered)
        )
        tools = bool(body.tools) and body.tool_choice != "none"
        choices = [_Choice(i, OutputParser(reasoning=rendered.reasoning, tools=tools)) for i in range(body.n)]
        created = int(time.time())
        answer = _Answer(dialect, _prefix_text(body) if dialect is Dialect.MISTRAL else "", body.parallel_tool_calls)
        if body.stream:
            chunks = self._stream(body, rid, created, stream, choices, prompt_len, answer)
            body_iter = sse_response_body(chunks, self.ctx.metrics, ENDPOINT, ticket)
            return StreamingResponse(body_iter, media_type="text/event-stream")
        done = await until_disconnect(request, self._collect(stream, choices))
        if done is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(self._final(body, rid, created, choices, prompt_len, answer))

    def _render(self, body: ChatCompletionRequest) -> RenderedPrompt:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        if body.safe_prompt:
            messages = dia.with_safe_prompt(messages)
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

    async def _token_mask(
        self, body: ChatCompletionRequest, rendered: RenderedPrompt, size: int
    ) -> TokenMaskFactory | None:
        """The request's grammar compiled in the render lanes; each of the n sequences then gets its own matcher
        over the shared compiled grammar. None when the request has no grammar."""
        grammar = await self.ctx.run_blocking(self._grammar, body, rendered, size=size)
        if grammar is None:
            return None
        compiled, make = grammar
        vocab = self.ctx.vocab_size
        spec = GrammarSpec(compiled.text, triggered=make == self.grammars.triggered_matcher)  # for a separate core
        return GrammarMaskFactory(spec, lambda: token_mask_provider(make(compiled), vocab))

    def _grammar(
        self, body: ChatCompletionRequest, rendered: RenderedPrompt
    ) -> tuple[CompiledGrammar, Callable[[CompiledGrammar], Any]] | None:
        """The request's compiled grammar (json_schema / json_object / tool_choice required or named; for "auto"
        with tools the tool-call section, triggered by the model's own [TOOL_CALLS]) and the matcher maker, or
        None. Blocking (schema to grammar, then the compile, itself time-limited): runs in the render lanes."""
        request = rendered.request
        try:
            if body.response_format is not None:
                rf = response_format_from_openai(body.response_format)
                request = request.model_copy(update={"response_format": rf})
            grammar = self.grammars.grammar_for(enforce_schemas(request), rendered.reasoning)
            make = self.grammars.matcher
            if grammar is None:  # tool_choice auto: from the model's own [TOOL_CALLS] on, only the offered tools
                grammar, make = (
                    self.grammars.tool_section_grammar(enforce_schemas(request)),
                    self.grammars.triggered_matcher,
                )
            return None if grammar is None else (self.grammars.compile(grammar), make)
        except GrammarError as e:
            raise APIError(400, str(e), "response_format" if body.response_format else "tool_choice") from e

    async def _collect(self, stream, choices: list[_Choice]) -> bool:
        async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
            c = choices[out.index]
            c.parser.feed(out.new_text)
            c.logprobs += out.logprobs
            c.count(out, *self._think_ids)
            if out.finished:
                c.parser.finish(truncated=out.finish_reason == "length")
                c.finish_reason = out.finish_reason
        return True

    def _usage(self, choices: list[_Choice], prompt_len: int) -> dict[str, Any]:
        completion = sum(c.num_tokens for c in choices)
        cached = max((c.num_cached for c in choices), default=0)
        return dia.usage_body(prompt_len, completion, cached, sum(c.reasoning_tokens for c in choices))

    def _logprobs_body(self, lps: list[TokenLogprobs]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            raw = self.ctx.tokenizer.token_bytes(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
            ]
        }

    def _final(self, body, rid, created, choices: list[_Choice], prompt_len: int, answer: _Answer) -> dict[str, Any]:
        out = []
        for c in choices:
            p = c.parser
            calls = answer.calls(p.tool_calls)
            content = answer.prefix + p.content
            text = content or (None if calls else "")
            message: dict[str, Any] = {"role": "assistant", "content": None}
            message.update(dia.content_and_reasoning(answer.dialect, text, p.reasoning_content))
            if calls:
                message["tool_calls"] = dia.tool_calls_body(calls)
            out.append(
                {
                    "index": c.index,
                    "message": message,
                    "finish_reason": dia.finish_reason(answer.dialect, c.finish_reason, bool(calls)),
                    "logprobs": self._logprobs_body(c.logprobs) if body.logprobs else None,
                }
            )
        self.ctx.metrics.requests.labels(ENDPOINT, "200").inc()
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.ctx.model_name,
            "choices": out,
            "usage": self._usage(choices, prompt_len),
        }

    @staticmethod
    def _delta_body(d: ParsedDelta, answer: _Answer) -> dict[str, Any]:
        delta = dia.content_and_reasoning(answer.dialect, d.content or None, d.reasoning_content)
        if d.tool_calls and answer.dialect is Dialect.OPENAI:  # Mistral's clients get whole calls at the end
            calls = []
            for t in d.tool_calls:
                call: dict[str, Any] = {"index": t.index, "function": {"arguments": t.arguments_delta}}
                if t.id is not None:
                    call["id"], call["type"] = t.id, "function"
                if t.name is not None:
                    call["function"]["name"] = t.name
                calls.append(call)
            calls = answer.stream_calls(calls)
            if calls:
                delta["tool_calls"] = calls
        return delta

    async def _stream(
        self, body, rid, created, stream, choices: list[_Choice], prompt_len: int, answer: _Answer
    ) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.ctx.model_name}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lps=None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if body.logprobs:
                choice["logprobs"] = self._logprobs_body(lps or [])
            return sse({**base, "choices": [choice]})

        try:
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": answer.prefix})
            async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
                c = choices[out.index]
                c.count(out, *self._think_ids)
                parsed = c.parser.feed(out.new_text)
                if out.finished:
                    parsed = _merge_parsed(parsed, c.parser.finish(truncated=out.finish_reason == "length"))
                    c.finish_reason = out.finish_reason
                delta = self._delta_body(parsed, answer)
                if out.finished and answer.dialect is Dialect.MISTRAL and c.parser.streamed_tool_calls:
                    delta["tool_calls"] = dia.tool_calls_body(answer.calls(c.parser.streamed_tool_calls))
                if delta or out.logprobs:
                    yield chunk(c.index, delta, None, out.logprobs)
                if out.finished:
                    calls = answer.calls(c.parser.streamed_tool_calls)
                    yield chunk(c.index, {}, dia.finish_reason(answer.dialect, c.finish_reason, bool(calls)))
            usage_wanted = body.stream_options is not None and body.stream_options.include_usage
            if usage_wanted or answer.dialect is Dialect.MISTRAL:  # Mistral's API always ends with the usage
                yield sse({**base, "choices": [], "usage": self._usage(choices, prompt_len)})
        finally:
            await stream.aclose()


def _text_size(body: ChatCompletionRequest) -> tuple[int, bool]:
    """Characters of message text (a lower bound on what rendering costs) and whether any image is attached."""
    chars, images = 0, False
    for m in body.messages:
        parts = [m.content] if isinstance(m.content, str) else m.content or []
        for part in parts:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                chars += len(text) if isinstance(text, str) else 0
                images |= part.get("type") == "image_url"
    return chars, images


def _json_size(*values: Any) -> int:
    """Characters of the tools and response_format as compact JSON: they are rendered and compiled too."""
    return sum(len(json.dumps(v, separators=(",", ":"))) for v in values if v is not None)


def _image_inputs(rendered: RenderedPrompt) -> list[ImageInput] | None:
    """mistral-common's preprocessed pixel arrays, keyed for the prefix cache by the server-computed content hash."""
    if not rendered.images:
        return None
    return [ImageInput(pixels, digest) for pixels, digest in zip(rendered.images, rendered.image_hashes, strict=True)]


def _merge_parsed(a: ParsedDelta, b: ParsedDelta) -> ParsedDelta:
    return ParsedDelta(a.content + b.content, a.reasoning_content + b.reasoning_content, a.tool_calls + b.tool_calls)


_MISTRAL_FIELDS = frozenset({"random_seed", "safe_prompt", "prompt_mode"})


def _dialect(body: ChatCompletionRequest, request: Request) -> Dialect:
    uses_mistral = bool(_MISTRAL_FIELDS & body.model_fields_set) or body.tool_choice == "any"
    try:
        headers = request.headers
        return dia.choose_dialect(headers.get(dia.DIALECT_HEADER), headers.get("user-agent"), uses_mistral)
    except ValueError as e:
        raise APIError(400, str(e), dia.DIALECT_HEADER) from e


def _prefix_text(body: ChatCompletionRequest) -> str:
    """The continued assistant message's text (``prefix: true``), which Mistral's API returns with the answer."""
    last = body.messages[-1]
    if last.role != "assistant" or not getattr(last, "prefix", False) or not isinstance(last.content, str):
        return ""
    return last.content


@dataclass(frozen=True)
class _Answer:
    """How this request's answer is shaped: the dialect, the prefix to repeat, and parallel_tool_calls (false:
    at most one call is returned, whatever the model wrote after it)."""

    dialect: Dialect
    prefix: str
    parallel_tool_calls: bool

    def calls(self, calls: list) -> list:
        return calls if self.parallel_tool_calls else calls[:1]

    def stream_calls(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return deltas if self.parallel_tool_calls else [d for d in deltas if d["index"] == 0]
