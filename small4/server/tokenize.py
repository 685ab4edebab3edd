"""POST /tokenize and /detokenize, in vLLM's request and response shapes.

``/tokenize`` takes either a ``prompt`` (encoded as ``/v1/completions`` encodes it: BOS first when
``add_special_tokens``, the default) or chat ``messages`` (+ ``tools``, ``reasoning_effort``), rendered exactly as
``/v1/chat/completions`` renders them, so ``count`` is the ``prompt_tokens`` that request would report. The answer
is ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` only with ``return_token_strs``).
``/detokenize`` takes ``tokens`` and answers ``{"prompt"}``; special tokens are kept as their text, so a rendered
chat prompt reads back with its ``[INST]`` markers.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from small4.chat import ChatRenderer, RenderError
from small4.server.context import ServerContext
from small4.server.errors import APIError
from small4.server.protocol import ChatMessage, _Strict

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is None and (self.tools is not None or self.reasoning_effort is not None):
            raise ValueError("tools and reasoning_effort apply to messages only")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("add_special_tokens applies to prompt only (a chat prompt has its own)")
        if not self.add_generation_prompt:
            raise ValueError("add_generation_prompt=false is not supported: a chat prompt always ends ready to answer")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class TokenizeHandler:
    def __init__(self, ctx: ServerContext, renderer: ChatRenderer) -> None:
        self.ctx = ctx
        self.renderer = renderer

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.ctx.check_model(body.model)
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            self.ctx.check_prompt_chars(len(body.prompt), "prompt")
            tokens = await self.ctx.run_blocking(
                self.ctx.tokenizer.encode, body.prompt, add_special, size=len(body.prompt)
            )
        else:
            # may fetch and decode images: in the bounded render lanes (the large one: size unknown until rendered)
            tokens = await self.ctx.run_blocking(self._render, body, size=self.ctx.limits.small_request_chars + 1)
        out: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": self.ctx.limits.max_model_len,
            "tokens": tokens,
            "token_strs": [self.ctx.token_text(t) for t in tokens] if body.return_token_strs else None,
        }
        return out

    def _render(self, body: TokenizeRequest) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages or []]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        try:
            return self.renderer.render(messages, tools=body.tools, reasoning_effort=body.reasoning_effort).token_ids
        except RenderError as e:
            raise APIError(400, str(e), e.param or "messages") from e

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.ctx.check_model(body.model)
        tok = self.ctx.tokenizer
        bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}
