"""The two chat dialects on the same routes: OpenAI's and Mistral's, and how an answer is shaped for each.

Requests of both dialects parse into the same model (the Mistral-only fields ``random_seed``, ``safe_prompt``,
``prompt_mode`` and ``tool_choice: "any"`` are accepted beside the OpenAI ones). What differs is how the answer
carries the reasoning, and which ``finish_reason`` values a client can read:

* OpenAI dialect: the message (or delta) has ``content`` as a string, the reasoning in ``reasoning_content`` and,
  for clients that follow vLLM's rename, the same text in ``reasoning``.
* Mistral dialect: ``content`` is a list of chunks, ``{"type": "thinking", "thinking": [{"type": "text", ...}]}``
  before ``{"type": "text", ...}``, which is how Mistral's API returns reasoning and the only place the mistralai
  SDK reads it (it drops unknown fields); content without reasoning stays a plain string, as Mistral sends it.
  A continued (``prefix: true``) assistant message comes back whole, prefix included, as Mistral's API does.
  ``finish_reason`` is one of stop / length / tool_calls / error; usage is always in the last stream chunk.

The dialect is chosen per request (``choose_dialect``): an explicit ``X-Small4-Dialect: openai|mistral`` header
wins; otherwise Mistral when the client is the mistralai SDK (its User-Agent starts ``mistral-client-``) or the
request uses a field only Mistral's API has; OpenAI in every other case.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

MISTRAL_USER_AGENT_PREFIX = "mistral-client-"
DIALECT_HEADER = "x-small4-dialect"
# Mistral's documented guardrail prompt, prepended to the system prompt when a request sets safe_prompt
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
_MISTRAL_FINISH = frozenset({"stop", "length", "tool_calls", "error"})


class Dialect(str, Enum):
    OPENAI = "openai"
    MISTRAL = "mistral"


def choose_dialect(header: str | None, user_agent: str | None, uses_mistral_fields: bool) -> Dialect:
    """The answer's dialect (module doc); an unknown header value raises ``ValueError``."""
    if header:
        try:
            return Dialect(header.strip().lower())
        except ValueError:
            raise ValueError(f"{DIALECT_HEADER} must be 'openai' or 'mistral', got {header!r}") from None
    if (user_agent or "").lower().startswith(MISTRAL_USER_AGENT_PREFIX) or uses_mistral_fields:
        return Dialect.MISTRAL
    return Dialect.OPENAI


def with_safe_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``safe_prompt: true``: Mistral's guardrail text goes first in the system prompt (a new system message when
    the conversation has none, else joined to the first one's text)."""
    first = messages[0] if messages else None
    if first is not None and first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
        return [{**first, "content": f"{SAFE_PROMPT}\n\n{first['content']}"}, *messages[1:]]
    return [{"role": "system", "content": SAFE_PROMPT}, *messages]


def finish_reason(dialect: Dialect, engine_reason: str | None, has_tool_calls: bool) -> str | None:
    """The engine's stop / length / abort plus whether tool calls were parsed -> a value the dialect defines."""
    if engine_reason is None:
        return None
    reason = "tool_calls" if has_tool_calls and engine_reason == "stop" else engine_reason
    if dialect is Dialect.MISTRAL and reason not in _MISTRAL_FINISH:
        return "error"
    return reason


def _thinking_chunk(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def content_and_reasoning(dialect: Dialect, content: str | None, reasoning: str) -> dict[str, Any]:
    """The message (or delta) fields that carry the answer's text and its reasoning, in the dialect's shape.
    ``content`` None means "no content" (a tool-call answer); "" is kept as empty content."""
    if dialect is Dialect.MISTRAL:
        if not reasoning:
            return {} if content is None else {"content": content}
        chunks = [_thinking_chunk(reasoning)]
        if content:
            chunks.append({"type": "text", "text": content})
        return {"content": chunks}
    out: dict[str, Any] = {} if content is None else {"content": content}
    if reasoning:
        out["reasoning_content"] = reasoning
        out["reasoning"] = reasoning
    return out


def tool_calls_body(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """Final tool calls (objects with id, name, arguments) in the shape both dialects read (``index`` is Mistral's,
    ignored by OpenAI clients)."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}, "index": i}
        for i, c in enumerate(calls)
    ]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict:
    """OpenAI usage with its details (Mistral clients keep the extra fields in their ``UsageInfo`` extras)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
