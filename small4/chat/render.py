"""OpenAI chat request -> mistral-common ``ChatCompletionRequest`` -> prompt token ids (+ images).

No prompt string is ever built here: messages, tools, tool choice, reasoning effort and images are
converted into mistral-common objects, validated by mistral-common (in *serving* mode, whatever mode
the tokenizer was loaded in) and encoded by ``MistralTokenizer.encode_chat_completion``. This module
only adds what mistral-common leaves to the server:

* strict shape checks of the OpenAI dicts, so an unknown or unsupported field is refused (house rule 9)
  instead of being dropped, with the offending ``param`` path in the error;
* images: loaded by ``chat.media.load_image`` under the renderer's ``MediaPolicy`` (``data:`` URLs, and
  http(s) URLs of allowed hosts only), counted against ``max_images``, and handed over as decoded PIL
  images in ``ImageChunk``; mistral-common never gets a string it could resolve (it would fetch http(s)
  URLs and open ``file://`` paths on its own). Loading may fetch over the network: ``render`` is
  synchronous and blocking, so the server calls it in a worker thread;
* tool call ids: clients may send back any id; ids that are not 9 alphanumeric characters are mapped,
  consistently within the request, to 9-character ids (v13+ does not tokenize ids, so this never
  changes the prompt, but it keeps mistral-common's id checks happy);
* every mistral-common / pydantic failure becomes a ``RenderError`` (a ``ValueError``) with a message.

Continuing an assistant message is supported the Mistral way: a final assistant message with
``"prefix": true`` is encoded without its end-of-sequence token; any other final assistant message is
refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mistral_common.exceptions import (
    InvalidRequestException,
    InvalidToolException,
    InvalidToolSchemaException,
    MistralCommonException,
)
from mistral_common.protocol.instruct.chunk import ContentChunk, ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ChatMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest, ResponseFormat
from mistral_common.protocol.instruct.tool_calls import (
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolChoice,
    ToolChoiceEnum,
)
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from pydantic import ValidationError

from small4.chat.media import MediaError, MediaPolicy, load_image

TOOL_CALL_ID_LENGTH = 9
_TOOL_CALL_ID_ALPHABET = string.ascii_letters + string.digits
_TOOL_CALL_ID_RE = re.compile(r"[a-zA-Z0-9]{9}")

# The OpenAI fields accepted per role. Anything else is refused rather than silently dropped.
_MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content"}),
    "developer": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_calls", "reasoning_content", "reasoning", "prefix"}),
    "tool": frozenset({"role", "content", "tool_call_id", "name"}),
}
_IMAGE_ROLES = frozenset({"user", "tool"})
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_TOOL_CALL_KEYS = frozenset({"id", "type", "function", "index"})  # index: the mistralai SDK echoes it back
_FUNCTION_CALL_KEYS = frozenset({"name", "arguments"})
# Deepest JSON (tool parameters, response_format) accepted: mistral-common and the grammar builder recurse per
# level and hit Python's recursion limit near 250; real schemas stay far below this.
MAX_JSON_DEPTH = 64
_TOOL_CHOICES = ("auto", "none", "required", "any")  # "any" is Mistral's name for "required"
DEFAULT_MEDIA_POLICY = MediaPolicy()  # data: URLs only (frozen, so safe to share)


class RenderError(ValueError):
    """A chat request that cannot be rendered; the server answers 400 with ``message`` and ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def new_tool_call_id() -> str:
    """A fresh tool call id: 9 random characters from [a-zA-Z0-9], as mistral-common expects."""
    return "".join(secrets.choice(_TOOL_CALL_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def is_valid_tool_call_id(value: str) -> bool:
    return _TOOL_CALL_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class RenderedPrompt:
    """The encoded prompt of one chat request.

    ``images`` are the arrays mistral-common's image encoder returns (one float array ``[C, H, W]`` per
    image, in prompt order); their ``[IMG]`` slots are in ``token_ids``. ``image_hashes`` are the SHA-256
    digests of the images' encoded bytes, one per image in the same order (prefix-cache keys).
    ``reasoning`` says whether the model is expected to open a ``[THINK]`` block (reasoning effort other
    than "none").
    """

    token_ids: list[int]
    images: list[Any]
    request: ChatCompletionRequest
    reasoning: bool
    reasoning_effort: str | None
    image_hashes: list[bytes]

    @property
    def num_tokens(self) -> int:
        """Prompt tokens, the usage count; equal to mistral-common's own encoding length."""
        return len(self.token_ids)


class ChatRenderer:
    """Renders OpenAI-shaped chat requests into prompt token ids with mistral-common."""

    def __init__(
        self, tokenizer: MistralTokenizer, model_name: str = "small4", media_policy: MediaPolicy = DEFAULT_MEDIA_POLICY
    ) -> None:
        if tokenizer.instruct_tokenizer.tokenizer.version < TokenizerVersion.v13:
            raise ValueError(
                f"tokenizer {tokenizer.instruct_tokenizer.tokenizer.version} is too old: small4 parses the "
                "v13+ tool-call format"
            )
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.media_policy = media_policy
        encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
        # images are shrunk to this while still 8-bit PIL, never handed to mistral-common at full size
        self._max_image_side: int | None = encoder.image_config.max_image_size if encoder is not None else None
        # Serving-mode validation is stricter than the default "test" mode of MistralTokenizer.from_file
        # (e.g. every tool call must be answered); run it explicitly before encoding.
        self._validator = get_validator(tokenizer.instruct_tokenizer.tokenizer.version, mode=ValidationMode.serving)
        builder = tokenizer.instruct_tokenizer.tokenizer.model_settings_builder
        effort = builder.reasoning_effort if builder is not None else None
        self.reasoning_efforts: tuple[str, ...] = tuple(_enum_str(v) for v in effort.values) if effort else ()
        self.default_reasoning_effort: str | None = (
            _enum_str(effort.default) if effort is not None and effort.default is not None else None
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        response_format: dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
    ) -> RenderedPrompt:
        """Validate and encode one chat request; raise ``RenderError`` for anything unsupported."""
        effort = self._check_reasoning_effort(reasoning_effort)
        if not isinstance(messages, list) or not messages:
            raise RenderError("messages must be a non-empty list", "messages")
        ids = _ToolCallIds(messages)
        images = _Images(self.media_policy, self._max_image_side)
        converted = [self._message(m, i, ids, images) for i, m in enumerate(messages)]
        last = converted[-1]
        if not (isinstance(last, (UserMessage, ToolMessage)) or (isinstance(last, AssistantMessage) and last.prefix)):
            raise RenderError(
                f"the last message must be from the user or a tool, got role {_enum_str(last.role)!r} "
                '(an assistant message can only come last with "prefix": true, to be continued)',
                f"messages[{len(messages) - 1}].role",
            )
        for value, param in ((tools, "tools"), (response_format, "response_format")):
            if json_depth(value) > MAX_JSON_DEPTH:
                raise RenderError(f"{param} is nested deeper than {MAX_JSON_DEPTH} levels", param)
        mc_tools = self._tools(tools)
        choice = self._tool_choice(tool_choice, mc_tools)
        fields: dict[str, Any] = {
            "model": self.model_name,
            "messages": converted,
            "tools": mc_tools,
            "tool_choice": choice,
            "parallel_tool_calls": parallel_tool_calls,
            "reasoning_effort": reasoning_effort,
        }
        if response_format is not None:
            try:
                fields["response_format"] = ResponseFormat.model_validate(response_format)
            except (ValidationError, ValueError) as e:
                raise RenderError(_describe(e), "response_format") from None
        try:
            request = ChatCompletionRequest(**fields)
            self._validator.validate_request(request)
            tokenized = self.tokenizer.encode_chat_completion(request)
        except (MistralCommonException, ValueError, AssertionError) as e:
            raise RenderError(ids.unmap(_describe(e)), _error_param(e)) from None
        except RecursionError:  # a backstop: nesting is bounded above
            raise RenderError("the request is nested too deeply to render") from None
        continuing = isinstance(last, AssistantMessage) and last.prefix
        if len(tokenized.images) != len(images.hashes):
            raise AssertionError(f"{len(tokenized.images)} encoded images for {len(images.hashes)} loaded ones")
        return RenderedPrompt(
            token_ids=list(tokenized.tokens),
            images=list(tokenized.images),
            request=request,
            # A continued assistant message is already past its reasoning: the model continues content.
            reasoning=effort is not None and effort != "none" and not continuing,
            reasoning_effort=effort,
            image_hashes=images.hashes,
        )

    # -- fields -------------------------------------------------------------------------------------

    def _check_reasoning_effort(self, value: str | None) -> str | None:
        if value is None:
            return self.default_reasoning_effort
        if not self.reasoning_efforts:
            raise RenderError("reasoning_effort is not supported by this model", "reasoning_effort")
        if value not in self.reasoning_efforts:
            allowed = ", ".join(repr(v) for v in self.reasoning_efforts)
            raise RenderError(f"reasoning_effort must be one of {allowed}, got {value!r}", "reasoning_effort")
        return value

    def _message(self, message: Any, index: int, ids: _ToolCallIds, images: _Images) -> ChatMessage:
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RenderError("each message must be an object", param)
        role = message.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_KEYS:
            allowed = ", ".join(repr(r) for r in _MESSAGE_KEYS)
            raise RenderError(f"unknown role {role!r}; expected one of {allowed}", f"{param}.role")
        _check_keys(message, _MESSAGE_KEYS[role], param, f"{role} messages")
        content = message.get("content")
        try:
            if role in ("system", "developer"):
                return SystemMessage(content=_content(content, role, f"{param}.content", images))
            if role == "user":
                return UserMessage(content=_content(content, role, f"{param}.content", images))
            if role == "tool":
                return self._tool_message(message, param, ids, images)
            return self._assistant_message(message, param, ids, images)
        except ValidationError as e:
            raise RenderError(_describe(e), param) from None

    def _tool_message(self, message: dict[str, Any], param: str, ids: _ToolCallIds, images: _Images) -> ToolMessage:
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise RenderError("tool messages need a string tool_call_id", f"{param}.tool_call_id")
        return ToolMessage(
            content=_content(message.get("content"), "tool", f"{param}.content", images),
            tool_call_id=ids.map(call_id),
            name=message.get("name"),
        )

    def _assistant_message(
        self, message: dict[str, Any], param: str, ids: _ToolCallIds, images: _Images
    ) -> AssistantMessage:
        content, thinking = _split_thinking(message.get("content"), f"{param}.content")
        if content is not None:
            _content(content, "assistant", f"{param}.content", images)  # shape check only: text parts
        tool_calls = message.get("tool_calls")
        openai: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking is not None:
            if "reasoning_content" in message or "reasoning" in message:
                raise RenderError("give the reasoning once: thinking chunks or reasoning_content", param)
            openai["reasoning_content"] = thinking
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise RenderError("tool_calls must be a list", f"{param}.tool_calls")
            openai["tool_calls"] = [
                _tool_call(call, f"{param}.tool_calls[{j}]", ids) for j, call in enumerate(tool_calls)
            ]
        given = [key for key in ("reasoning_content", "reasoning") if key in message]
        if len(given) == 2 and message["reasoning_content"] != message["reasoning"]:
            raise RenderError("reasoning and reasoning_content (its alias) differ", f"{param}.reasoning")
        for key in given[:1]:
            if not isinstance(message[key], str):
                raise RenderError(f"{key} must be a string", f"{param}.{key}")
            openai["reasoning_content"] = message[key]
        prefix = message.get("prefix", False)
        if not isinstance(prefix, bool):
            raise RenderError("prefix must be a boolean", f"{param}.prefix")
        try:
            # mistral-common's own OpenAI mapping: reasoning_content -> a closed ThinkChunk before the text.
            converted = AssistantMessage.from_openai(openai)
        except (MistralCommonException, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise RenderError(_describe(e), param) from None
        return converted.model_copy(update={"prefix": True}) if prefix else converted

    def _tools(self, tools: list[dict[str, Any]] | None) -> list[Tool] | None:
        if tools is None:
            return None
        if not isinstance(tools, list):
            raise RenderError("tools must be a list", "tools")
        converted: list[Tool] = []
        seen: set[str] = set()
        for i, tool in enumerate(tools):
            param = f"tools[{i}]"
            if not isinstance(tool, dict):
                raise RenderError("each tool must be an object", param)
            _check_keys(tool, _TOOL_KEYS, param, "tools")
            if tool.get("type") != "function":
                raise RenderError(f"unsupported tool type {tool.get('type')!r}; only 'function'", f"{param}.type")
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RenderError("a function tool needs a function object with a name", f"{param}.function")
            _check_keys(function, _FUNCTION_KEYS, f"{param}.function", "functions")
            if function["name"] in seen:
                raise RenderError(f"duplicate tool name {function['name']!r}", f"{param}.function.name")
            seen.add(function["name"])
            try:
                converted.append(Tool.from_openai(tool))
            except ValidationError as e:
                raise RenderError(_describe(e), param) from None
        return converted

    def _tool_choice(self, choice: str | dict[str, Any] | None, tools: list[Tool] | None) -> ToolChoice:
        if choice is None:
            return ToolChoiceEnum.auto
        names = [t.function.name for t in tools or []]
        if isinstance(choice, str):
            if choice not in _TOOL_CHOICES:
                allowed = ", ".join(repr(c) for c in _TOOL_CHOICES)
                raise RenderError(
                    f"tool_choice must be one of {allowed} or a named function, got {choice!r}", "tool_choice"
                )
            if choice in ("required", "any") and not names:
                raise RenderError(f"tool_choice {choice!r} needs tools", "tool_choice")
            return ToolChoiceEnum(choice)
        if isinstance(choice, dict):
            _check_keys(choice, frozenset({"type", "function"}), "tool_choice", "tool_choice")
            function = choice.get("function")
            if choice.get("type") != "function" or not isinstance(function, dict):
                raise RenderError(
                    'a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice"
                )
            _check_keys(function, frozenset({"name"}), "tool_choice.function", "tool_choice.function")
            name = function.get("name")
            if name not in names:
                raise RenderError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
            return NamedToolChoice(function=FunctionName(name=name))
        raise RenderError("tool_choice must be a string or an object", "tool_choice")


# -- helpers ----------------------------------------------------------------------------------------


def json_depth(value: Any) -> int:
    """Nesting depth of JSON-like data (a scalar is 0, ``{}`` 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class _Images:
    """The images of one request: counted against the policy's ``max_images``, loaded, hashed in prompt order."""

    def __init__(self, policy: MediaPolicy, max_side: int | None = None) -> None:
        self.policy, self.max_side = policy, max_side
        self.hashes: list[bytes] = []
        self.pixels_left = policy.max_total_pixels  # counted on the header sizes, before decoding

    def load(self, url: Any, param: str) -> Image.Image:
        if len(self.hashes) >= self.policy.max_images:
            raise RenderError(f"too many images: at most {self.policy.max_images} per request", param)
        try:
            loaded = load_image(url, self.policy, self.max_side, self.pixels_left)
        except MediaError as e:
            raise RenderError(e.message, e.param or param) from None
        self.pixels_left -= loaded.source_pixels
        self.hashes.append(loaded.sha256)
        return loaded.image


class _ToolCallIds:
    """Maps the tool call ids of one request to ids mistral-common accepts, consistently.

    Valid ids (9 characters [a-zA-Z0-9]) are kept; any other id is replaced by one derived from its
    hash, avoiding every id used in the request, so an assistant call and its tool result still pair up.
    """

    def __init__(self, messages: list[Any]) -> None:
        self._used: set[str] = set()
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, dict):
                continue
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    self._used.add(call["id"])
            if isinstance(message.get("tool_call_id"), str):
                self._used.add(message["tool_call_id"])
        self._mapped: dict[str, str] = {}

    def map(self, call_id: str) -> str:
        if is_valid_tool_call_id(call_id):
            return call_id
        if call_id not in self._mapped:
            salt = 0
            while True:
                digest = hashlib.sha256(f"{salt}:{call_id}".encode()).digest()
                candidate = "".join(_TOOL_CALL_ID_ALPHABET[b % len(_TOOL_CALL_ID_ALPHABET)] for b in digest[:9])
                if candidate not in self._used:
                    break
                salt += 1
            self._used.add(candidate)
            self._mapped[call_id] = candidate
        return self._mapped[call_id]

    def unmap(self, text: str) -> str:
        """Put the client's ids back into an error message."""
        for original, mapped in self._mapped.items():
            text = text.replace(mapped, repr(original))
        return text


def _tool_call(call: Any, param: str, ids: _ToolCallIds) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise RenderError("each tool call must be an object", param)
    _check_keys(call, _TOOL_CALL_KEYS, param, "tool calls")
    if call.get("type", "function") != "function":
        raise RenderError(f"unsupported tool call type {call.get('type')!r}", f"{param}.type")
    if not isinstance(call.get("id"), str):
        raise RenderError("a tool call needs a string id", f"{param}.id")
    function = call.get("function")
    if not isinstance(function, dict):
        raise RenderError("a tool call needs a function object", f"{param}.function")
    _check_keys(function, _FUNCTION_CALL_KEYS, f"{param}.function", "tool call functions")
    arguments = function.get("arguments")
    if isinstance(arguments, dict):  # the Mistral API also takes the arguments as an object
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(function.get("name"), str) or not isinstance(arguments, str):
        raise RenderError("a tool call function needs a string name and string arguments", f"{param}.function")
    named = {"name": function["name"], "arguments": arguments}
    return {"id": ids.map(call["id"]), "type": "function", "function": named}


def _split_thinking(content: Any, param: str) -> tuple[Any, str | None]:
    """Mistral's ``thinking`` content chunks (``{"type": "thinking", "thinking": [text chunks] | str}``) of an
    assistant history message -> (the other parts, the reasoning text); content without them is returned as is.
    Only one leading thinking block is rendered (the v15 format has one reasoning block before the answer)."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "thinking" for p in content):
        return content, None
    texts: list[str] = []
    rest: list[Any] = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "thinking"):
            rest.append(part)
            continue
        if rest:
            raise RenderError("thinking chunks must come before the answer's text", f"{param}[{i}]")
        _check_keys(part, frozenset({"type", "thinking", "closed", "signature"}), f"{param}[{i}]", "thinking chunks")
        if part.get("signature") is not None:
            raise RenderError("signed thinking chunks are not supported", f"{param}[{i}].signature")
        texts.append(_thinking_text(part.get("thinking"), f"{param}[{i}].thinking"))
    return (rest or None), "".join(texts)


def _thinking_text(thinking: Any, param: str) -> str:
    if isinstance(thinking, str):
        return thinking
    if not isinstance(thinking, list):
        raise RenderError("thinking must be a string or a list of text chunks", param)
    out = []
    for j, chunk in enumerate(thinking):
        if not isinstance(chunk, dict) or chunk.get("type") != "text" or not isinstance(chunk.get("text"), str):
            raise RenderError("thinking chunks hold text chunks only", f"{param}[{j}]")
        _check_keys(chunk, frozenset({"type", "text"}), f"{param}[{j}]", "text chunks")
        out.append(chunk["text"])
    return "".join(out)


def _content(content: Any, role: str, param: str, images: _Images) -> str | list[ContentChunk]:
    """OpenAI content (a string or a list of parts) -> mistral-common content; images loaded here."""
    if isinstance(content, str):
        return content
    if content is None:
        raise RenderError(f"{role} messages need content", param)
    if not isinstance(content, list) or not content:
        raise RenderError("content must be a string or a non-empty list of parts", param)
    chunks: list[ContentChunk] = []
    for i, part in enumerate(content):
        part_param = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _check_keys(part, frozenset({"type", "text"}), part_param, "text parts")
            if not isinstance(part.get("text"), str):
                raise RenderError("a text part needs a string text", f"{part_param}.text")
            chunks.append(TextChunk(text=part["text"]))
        elif kind == "image_url":
            if role not in _IMAGE_ROLES:
                raise RenderError(f"images are not supported in {role} messages", part_param)
            _check_keys(part, frozenset({"type", "image_url"}), part_param, "image parts")
            chunks.append(ImageChunk(image=_image(part.get("image_url"), f"{part_param}.image_url", images)))
        else:
            raise RenderError(f"unsupported content part type {kind!r}", f"{part_param}.type")
    return chunks


def _image(image_url: Any, param: str, images: _Images) -> Image.Image:
    if isinstance(image_url, dict):
        _check_keys(image_url, frozenset({"url", "detail"}), param, "image_url")
        if image_url.get("detail", "auto") != "auto":
            raise RenderError("image detail levels are not supported; omit detail or use 'auto'", f"{param}.detail")
        url = image_url.get("url")
    else:
        url = image_url
    if not isinstance(url, str):
        raise RenderError("image_url needs a url string", param)
    return images.load(url, param)


def _enum_str(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], param: str, what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RenderError(f"unsupported field {unknown[0]!r} in {what}", f"{param}.{unknown[0]}")


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(error) or type(error).__name__


def _error_param(error: Exception) -> str | None:
    """The request field a mistral-common error is about, as far as its class tells."""
    if isinstance(error, (InvalidToolException, InvalidToolSchemaException)):
        return "tools"
    if isinstance(error, ValidationError):
        return None
    if isinstance(error, MistralCommonException) and not isinstance(error, InvalidRequestException):
        return "messages"
    return None
