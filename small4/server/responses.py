"""POST /v1/responses: the OpenAI Responses API over the chat pipeline.

The request is converted (``chat/responses_input.py``) into a chat-completions request, then rendered, constrained
and generated exactly as ``/v1/chat/completions`` does it (the same renderer, grammars and output parser). The
answer is a ``response`` object whose ``output`` holds, in order, a ``reasoning`` item (the model's whole
reasoning as ``reasoning_text``), a ``message`` item (``output_text``) and one ``function_call`` item per tool
call. Streaming sends the documented event sequence: ``response.created``, ``response.in_progress``, then per item
``response.output_item.added``, ``response.content_part.added``, the ``*.delta`` events, their ``*.done``,
``response.content_part.done``, ``response.output_item.done``, and ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the answer), each with its ``sequence_number``.

Nothing is stored: ``store`` must be false or left out (the response cannot be fetched later) and
``previous_response_id`` is refused; a conversation is continued by sending its items back as ``input``, which is
what the Agents SDK does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, ValidationError, model_validator
from starlette.requests import Request

from small4.chat import OutputParser, ParsedDelta, RenderError
from small4.chat import responses_input as ri
from small4.server.chat import ChatHandler, _Choice, _image_inputs, _json_size, _text_size
from small4.server.context import Ticket, hold_until_done
from small4.server.errors import APIError
from small4.server.protocol import ChatCompletionRequest, _Strict
from small4.server.streaming import timed_outputs, until_disconnect

ENDPOINT = "responses"


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)  # a routing hint: the prefix cache is automatic
    store: bool | None = None
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None
    previous_response_id: str | None = None
    service_tier: Literal["auto", "default"] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        if self.store:
            raise ValueError("store=true is not supported: responses are never stored (send store false, or omit it)")
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id is not supported (nothing is stored): send the items as input")
        if self.include:
            raise ValueError(f"include {self.include[0]!r} is not supported")
        if set(self.stream_options or {}) - {"include_obfuscation"}:
            raise ValueError("stream_options supports include_obfuscation only")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The equivalent chat-completions request (``RenderError`` / ``ValidationError`` on what has none)."""
        return ChatCompletionRequest(
            model=self.model,
            messages=ri.chat_messages(self.instructions, self.input),
            tools=ri.chat_tools(self.tools),
            tool_choice=ri.chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=ri.chat_response_format(self.text),
            reasoning_effort=ri.reasoning_effort(self.reasoning),
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
        )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesHandler:
    def __init__(self, chat: ChatHandler) -> None:
        self.chat = chat
        self.ctx = chat.ctx

    async def __call__(self, body: ResponsesRequest, request: Request) -> JSONResponse | StreamingResponse:
        self.ctx.check_model(body.model)
        ticket = self.ctx.admit(1)  # at arrival, before any rendering, as chat completions
        return await hold_until_done(ticket, self._respond(body, request, ticket))

    async def _respond(
        self, body: ResponsesRequest, request: Request, ticket: Ticket
    ) -> JSONResponse | StreamingResponse:
        try:
            chat_body = body.chat_request()
        except RenderError as e:
            raise APIError(400, e.message, e.param) from e
        except ValidationError as e:
            first = e.errors()[0]
            raise APIError(400, str(first.get("msg")), ".".join(str(p) for p in first.get("loc", ())) or None) from e
        self.ctx.check_model_bounds(chat_body.model_bounded_fields())
        chars, has_images = _text_size(chat_body)
        self.ctx.check_prompt_chars(chars, "input")
        size = chars + _json_size(chat_body.tools, chat_body.response_format)
        size = self.ctx.limits.small_request_chars + 1 if has_images else size
        rendered = await self.ctx.run_blocking(self.chat._render, chat_body, size=size)
        prompt_len = len(rendered.token_ids)
        max_tokens = self.ctx.resolve_max_tokens(prompt_len, chat_body.requested_max_tokens)
        params = self.ctx.sampling_params(chat_body, max_tokens, None, self.chat.control_token_ids)
        mask = await self.chat._token_mask(chat_body, rendered, size)
        rid = _new_id("resp")
        stream = await self.ctx.add(
            rid, rendered.token_ids, params, token_mask_factory=mask, images=_image_inputs(rendered)
        )
        tools = bool(chat_body.tools) and chat_body.tool_choice != "none"
        choice = _Choice(0, OutputParser(reasoning=rendered.reasoning, tools=tools))
        shell = _Shell(body, rid, int(time.time()), self.ctx.model_name)
        if body.stream:
            events = _Events(self, shell, choice, prompt_len).run(stream, ticket)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await until_disconnect(request, self._collect(stream, choice))
        if done is None:
            return JSONResponse({}, status_code=499)
        self.ctx.metrics.requests.labels(ENDPOINT, "200").inc()
        return JSONResponse(shell.response(_final_items(choice, body.parallel_tool_calls), choice, prompt_len, self))

    async def _collect(self, stream, choice: _Choice) -> bool:
        async for out in timed_outputs(stream, self.ctx.metrics, ENDPOINT):
            choice.parser.feed(out.new_text)
            choice.count(out, *self.chat._think_ids)
            if out.finished:
                choice.parser.finish(truncated=out.finish_reason == "length")
                choice.finish_reason = out.finish_reason
        return True

    def usage(self, choice: _Choice, prompt_len: int) -> dict[str, Any]:
        """Responses usage: cached tokens are prefix-cache hits; every other prompt token was computed and its
        latent written to the cache (``cache_write_tokens``)."""
        cached = choice.num_cached
        return {
            "input_tokens": prompt_len,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": prompt_len - cached},
            "output_tokens": choice.num_tokens,
            "output_tokens_details": {"reasoning_tokens": choice.reasoning_tokens},
            "total_tokens": prompt_len + choice.num_tokens,
        }


def _reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": "completed"}


def _message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _final_items(choice: _Choice, parallel_tool_calls: bool) -> list[dict[str, Any]]:
    p = choice.parser
    items = []
    if p.reasoning_content:
        items.append(_reasoning_item(_new_id("rs"), p.reasoning_content))
    calls = p.tool_calls if parallel_tool_calls else p.tool_calls[:1]
    if p.content or not calls:
        items.append(_message_item(_new_id("msg"), p.content))
    items += [_call_item(_new_id("fc"), c.id, c.name, c.arguments) for c in calls]
    return items


class _Shell:
    """The parts of the response object that do not depend on the output."""

    def __init__(self, body: ResponsesRequest, rid: str, created: int, model: str) -> None:
        self.body, self.rid, self.created, self.model = body, rid, created, model

    def response(self, items, choice: _Choice | None, prompt_len: int, handler: ResponsesHandler | None) -> dict:
        b = self.body
        status = "in_progress"
        if choice is not None and choice.finish_reason is not None:
            status = "incomplete" if choice.finish_reason == "length" else "completed"
        reasoning = b.reasoning or {}
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": items,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "parallel_tool_calls": b.parallel_tool_calls,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "tools": b.tools or [],
            "tool_choice": b.tool_choice or "auto",
            "text": b.text or {"format": {"type": "text"}},
            "reasoning": {"effort": reasoning.get("effort"), "summary": None},
            "metadata": b.metadata or {},
            "store": False,
            "truncation": "disabled",
            "previous_response_id": None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": handler.usage(choice, prompt_len) if handler is not None and choice is not None else None,
        }


class _Events:
    """The streaming event sequence: parser deltas open and close output items as the answer moves from reasoning
    to text to tool calls."""

    def __init__(self, handler: ResponsesHandler, shell: _Shell, choice: _Choice, prompt_len: int) -> None:
        self.handler, self.shell, self.choice, self.prompt_len = handler, shell, choice, prompt_len
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # finished items, in output order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text: list[str] = []
        self.num_calls = 0

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"

    async def run(self, stream, ticket: Ticket) -> AsyncIterator[str]:
        """The events; the admission ticket is given back however the stream ends (done, failed, client gone)."""
        metrics = self.handler.ctx.metrics
        try:
            yield self._event("response.created", response=self.shell.response([], None, 0, None))
            yield self._event("response.in_progress", response=self.shell.response([], None, 0, None))
            async for out in timed_outputs(stream, metrics, ENDPOINT):
                self.choice.count(out, *self.handler.chat._think_ids)
                parsed = self.choice.parser.feed(out.new_text)
                for event in self._deltas(parsed):
                    yield event
                if out.finished:
                    self.choice.finish_reason = out.finish_reason
                    tail = self.choice.parser.finish(truncated=out.finish_reason == "length")
                    for event in [*self._deltas(tail), *self._close()]:
                        yield event
                    if not self.items:  # an empty answer is still one (empty) message, as without streaming
                        for event in [*self._ensure("message"), *self._close()]:
                            yield event
            final = self.shell.response(self.items, self.choice, self.prompt_len, self.handler)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            metrics.requests.labels(ENDPOINT, "200").inc()
            yield self._event(kind, response=final)
        except APIError as e:
            metrics.requests.labels(ENDPOINT, str(e.status)).inc()
            yield self._event("error", code=str(e.status), message=e.message, param=None)
        finally:
            ticket.release()

    def _deltas(self, d: ParsedDelta) -> list[str]:
        events: list[str] = []
        if d.reasoning_content:
            events += self._ensure("reasoning")
            events.append(self._delta("response.reasoning_text.delta", d.reasoning_content))
        if d.content:
            events += self._ensure("message")
            events.append(self._delta("response.output_text.delta", d.content, logprobs=[]))
        for t in d.tool_calls:
            if t.index > 0 and not self.shell.body.parallel_tool_calls:
                continue
            if t.name is not None:  # a new call
                events += self._close()
                self.open = _call_item(_new_id("fc"), t.id or "", t.name, "", status="in_progress")
                self.num_calls += 1
                events.append(self._event("response.output_item.added", output_index=len(self.items), item=self.open))
            if t.arguments_delta:
                self.text.append(t.arguments_delta)
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.open["id"],
                        output_index=len(self.items),
                        delta=t.arguments_delta,
                    )
                )
        return events

    def _delta(self, kind: str, text: str, **extra: Any) -> str:
        self.text.append(text)
        return self._event(
            kind, item_id=self.open["id"], output_index=len(self.items), content_index=0, delta=text, **extra
        )

    def _ensure(self, kind: str) -> list[str]:
        """Open an item of ``kind`` unless one is open: its ``output_item.added`` and ``content_part.added``."""
        if self.open is not None and self.open["type"] == kind:
            return []
        events = self._close()
        if kind == "reasoning":
            self.open, part = _reasoning_item(_new_id("rs"), None), {"type": "reasoning_text", "text": ""}
        else:
            self.open = _message_item(_new_id("msg"), None, status="in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.items)
        events.append(self._event("response.output_item.added", output_index=index, item=self.open))
        events.append(
            self._event(
                "response.content_part.added", item_id=self.open["id"], output_index=index, content_index=0, part=part
            )
        )
        return events

    def _close(self) -> list[str]:
        """Finish the open item: its ``*.done`` events, then ``output_item.done`` with the whole item."""
        item, self.open = self.open, None
        if item is None:
            return []
        text, self.text = "".join(self.text), []
        index, events = len(self.items), []
        if item["type"] == "function_call":
            item = {**item, "arguments": text.strip(), "status": "completed"}
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            if item["type"] == "reasoning":
                item = _reasoning_item(item["id"], text)
                done_kind, part = "response.reasoning_text.done", item["content"][0]
                events.append(
                    self._event(done_kind, item_id=item["id"], output_index=index, content_index=0, text=text)
                )
            else:
                item = _message_item(item["id"], text)
                part = item["content"][0]
                events.append(
                    self._event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    )
                )
            events.append(
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return events
