"""OpenAI Responses API request parts -> the chat-completions shapes ``chat/render.py`` already renders.

The Responses API says the same things as a chat request in other words: ``instructions`` is the system prompt,
``input`` a string (one user message) or a list of items (messages with ``input_text`` / ``input_image`` /
``output_text`` parts, ``reasoning`` items, ``function_call`` and ``function_call_output`` items), tools are flat
(``{"type": "function", "name": ...}``), a named ``tool_choice`` is ``{"type": "function", "name": ...}``,
``text.format`` is ``response_format`` and ``reasoning.effort`` is ``reasoning_effort``. Converting here keeps one
renderer, one grammar builder and one output parser for both APIs. Everything the conversion cannot express is a
``RenderError`` (a 400), never dropped: other tool types, ``allowed_tools``, refusals, reasoning summaries.

A ``reasoning`` item belongs to the assistant turn after it (the v15 format has one reasoning block per turn);
consecutive ``function_call`` items are one assistant message with several tool calls, joined to the assistant
text before them.
"""

from __future__ import annotations

from typing import Any

from small4.chat.render import RenderError

_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
_FUNCTION_CALL_KEYS = frozenset({"type", "call_id", "name", "arguments", "id", "status"})
_FUNCTION_OUTPUT_KEYS = frozenset({"type", "call_id", "output", "id", "status"})
_REASONING_KEYS = frozenset({"type", "id", "summary", "content", "status", "encrypted_content"})
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})


def _check(obj: Any, allowed: frozenset[str], param: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RenderError("must be an object", param)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RenderError(f"unsupported field {unknown[0]!r}", f"{param}.{unknown[0]}")
    return obj


def chat_messages(instructions: str | None, items: str | list[Any]) -> list[dict[str, Any]]:
    """``instructions`` + ``input`` -> chat messages (OpenAI chat shapes, ``reasoning_content`` on assistants)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RenderError("input must be a string or a non-empty list of items", "input")
    reasoning: str | None = None
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            message = _message(item, param)
            if message["role"] == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "reasoning":
            reasoning = (reasoning or "") + _reasoning(item, param)
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            messages.append(_function_output(item, param))
        else:
            raise RenderError(f"unsupported input item type {kind!r}", f"{param}.type")
    if reasoning is not None:
        raise RenderError("a reasoning item must be followed by the assistant turn it belongs to", "input")
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    _check(item, _MESSAGE_KEYS, param)
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise RenderError(f"unsupported role {role!r}", f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not content:
        raise RenderError("content must be a string or a non-empty list of parts", f"{param}.content")
    return {"role": role, "content": [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]}


def _part(part: Any, param: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        _check(part, frozenset({"type", "text", "annotations", "logprobs"}), param)
        if not isinstance(part.get("text"), str):
            raise RenderError("a text part needs a string text", f"{param}.text")
        if part.get("annotations"):
            raise RenderError("annotations are not supported", f"{param}.annotations")
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        _check(part, frozenset({"type", "image_url", "detail", "file_id"}), param)
        if part.get("file_id") is not None or not isinstance(part.get("image_url"), str):
            raise RenderError("an input_image needs an image_url (files are not supported)", param)
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail") or "auto"}}
    raise RenderError(f"unsupported content part type {kind!r}", f"{param}.type")


def _reasoning(item: dict[str, Any], param: str) -> str:
    _check(item, _REASONING_KEYS, param)
    if item.get("encrypted_content"):
        raise RenderError("encrypted reasoning is not supported (this server never encrypts it)", param)
    texts = []
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        for j, part in enumerate(item.get(key) or []):
            _check(part, frozenset({"type", "text"}), f"{param}.{key}[{j}]")
            if part.get("type") != kind or not isinstance(part.get("text"), str):
                raise RenderError(f"{key} holds {kind} parts", f"{param}.{key}[{j}]")
            texts.append(part["text"])
        if texts:  # the full reasoning text, when given, wins over a summary of it
            break
    return "".join(texts)


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    _check(item, _FUNCTION_CALL_KEYS, param)
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise RenderError(f"a function_call needs a string {key}", f"{param}.{key}")
    function = {"name": item["name"], "arguments": item["arguments"]}
    return {"id": item["call_id"], "type": "function", "function": function}


def _function_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    _check(item, _FUNCTION_OUTPUT_KEYS, param)
    if not isinstance(item.get("call_id"), str):
        raise RenderError("a function_call_output needs a string call_id", f"{param}.call_id")
    output = item.get("output")
    if isinstance(output, list):
        output = [_part(p, f"{param}.output[{j}]") for j, p in enumerate(output)]
    elif not isinstance(output, str):
        raise RenderError("output must be a string or a list of parts", f"{param}.output")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": output}


def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Flat Responses function tools -> chat tools; any other tool type is refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise RenderError(f"unsupported tool type {kind!r}; only 'function'", f"{param}.type")
        _check(tool, _TOOL_KEYS, param)
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}})
    return out


def chat_tool_choice(choice: Any) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    _check(choice, frozenset({"type", "name"}), "tool_choice")
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise RenderError(
            'tool_choice is "auto", "none", "required" or {"type": "function", "name": ...}', "tool_choice"
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text`` -> ``response_format``; ``text.verbosity`` other than the default is refused."""
    if text is None:
        return None
    _check(text, frozenset({"format", "verbosity"}), "text")
    if text.get("verbosity") not in (None, "medium"):
        raise RenderError("text.verbosity is not supported", "text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        _check(fmt, frozenset({"type"}), "text.format")
        return {"type": kind}
    if kind == "json_schema":
        _check(fmt, frozenset({"type", "name", "schema", "strict", "description"}), "text.format")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise RenderError(f"unsupported text.format type {kind!r}", "text.format.type")


def reasoning_effort(reasoning: dict[str, Any] | None) -> str | None:
    """``reasoning.effort`` -> ``reasoning_effort``. The model's reasoning comes back whole (reasoning_text), never
    summarised: ``summary`` may be null or "auto" (whatever the server can give), not "concise" / "detailed"."""
    if reasoning is None:
        return None
    _check(reasoning, frozenset({"effort", "summary", "generate_summary"}), "reasoning")
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) not in (None, "auto"):
            raise RenderError(
                f"reasoning.{key} {reasoning[key]!r} is not supported: reasoning is returned whole", f"reasoning.{key}"
            )
    return reasoning.get("effort")
