"""Incremental parser of Mistral Small 4 output text: reasoning, content and tool calls.

The engine hands over, step by step, the text of the generated tokens with control tokens kept as
their literal strings. The v13+/v15 output grammar (mistral-common ``InstructTokenizerV13`` encodes
assistant turns this way, and its guidance grammar ``think? (content | content? fcall+)`` allows it) is::

    [THINK] reasoning [/THINK]  content  [TOOL_CALLS]name[ARGS]{json}  [TOOL_CALLS]name[ARGS]{json} ...

Tool call ids are not part of the v13+ format; ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`` (the v11
variant) is accepted too, and its id is dropped: the server names every call itself (``id_factory``).

Which markers are control markers depends on the request: ``[THINK]``/``[/THINK]`` only when
``reasoning`` is on, the tool-call markers only when ``tools`` is on. A marker the request did not
enable is ordinary text. A reasoning block may appear anywhere before the tool calls; an unclosed one
runs to the end; a ``[TOOL_CALLS]`` inside an unclosed block ends it. Everything after the first
``[TOOL_CALLS]`` is the tool-call section: nothing but calls may follow.

Markers split across deltas ("[TOO" + "L_CALLS]") are handled by holding back the longest tail that
is a proper prefix of a marker (at most 11 characters), so each character is scanned a bounded number
of times: the parser is linear in the output length (``scanned_chars`` counts the work).

Malformed tool calls never raise. Two views are kept:

* Streaming (the ``ParsedDelta`` values of ``feed``/``finish``): a call's first delta (index, id, name)
  is sent when its ``[ARGS]`` arrives with a valid name (``[a-zA-Z0-9_-]{1,64}``); its arguments are
  then streamed as they come. A call that is structurally broken before that point (no name, a bad
  name, a stray marker, no ``[ARGS]`` before the end) is never sent as a tool call: its raw text, and
  everything after it, is sent as content. Arguments that turn out not to be a JSON object when the
  call ends cannot be taken back: the call stays as streamed (OpenAI semantics: ``arguments`` is a
  string the client must validate) and ``tool_calls_valid`` becomes False.
* Final (``content``, ``reasoning_content``, ``tool_calls`` after ``finish``), for non-streaming
  responses: the tool-call section is all or nothing. If every call is well formed with JSON-object
  arguments, they are the tool calls; otherwise there are none and the whole section, markers
  included, is appended verbatim to ``content``.

So control strings never reach ``content`` for well-formed output; malformed output keeps its raw
text. Text-level parsing cannot tell a control token from the same characters spelled by ordinary
tokens; that ambiguity is inherent to the text interface.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from small4.chat.render import new_tool_call_id

THINK = "[THINK]"
END_THINK = "[/THINK]"
TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
MARKERS = (THINK, END_THINK, TOOL_CALLS, ARGS, CALL_ID)

_NAME_CHAR = re.compile(r"[a-zA-Z0-9_\-\s]*")  # mistral-common's grammar allows whitespace around the name
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MAX_NAME = 64
_MAX_CALL_ID = 64


@dataclass(frozen=True)
class ToolCallDelta:
    """One OpenAI streaming tool-call fragment: the first one of a call carries id and name."""

    index: int
    id: str | None
    name: str | None
    arguments_delta: str


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


class _State(Enum):
    CONTENT = "content"
    THINK = "think"
    NAME = "name"  # after [TOOL_CALLS], before [ARGS] / [CALL_ID]
    CALL_ID = "call_id"  # after [CALL_ID], before [ARGS]
    ARGS = "args"  # after [ARGS]
    RAW = "raw"  # after a malformed call: everything is content


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    valid: bool | None = None  # set when the call ends


class _Matcher:
    """Finds the markers of one state in text, and the tail that could still grow into one."""

    def __init__(self, markers: tuple[str, ...]) -> None:
        self.markers = markers
        self.pattern = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
        self.longest = max((len(m) for m in markers), default=0)

    def holdback_start(self, text: str, start: int) -> int:
        """Index from which ``text`` may be the beginning of a marker (``len(text)`` if nowhere)."""
        for i in range(max(start, len(text) - self.longest + 1), len(text)):
            if text[i] == "[":
                tail = text[i:]
                if any(m.startswith(tail) for m in self.markers):
                    return i
        return len(text)


class OutputParser:
    """Turns the text of generated tokens into content, reasoning_content and tool-call deltas."""

    def __init__(self, reasoning: bool, tools: bool, id_factory: Callable[[], str] = new_tool_call_id) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self._id_factory = id_factory
        tool_markers = (TOOL_CALLS,) if tools else ()
        self._matchers = {
            _State.CONTENT: _Matcher(((THINK,) if reasoning else ()) + tool_markers),
            _State.THINK: _Matcher((END_THINK,) + tool_markers),
            _State.NAME: _Matcher(MARKERS),
            _State.CALL_ID: _Matcher(MARKERS),
            _State.ARGS: _Matcher((TOOL_CALLS,)),
            _State.RAW: _Matcher(()),
        }
        self._state = _State.CONTENT
        self._pending = ""  # held-back text that may start a marker
        self._content: list[str] = []  # content before the tool-call section
        self._reasoning: list[str] = []
        self._section: list[str] | None = None  # raw text of the tool-call section, markers included
        self._call_raw: list[str] = []  # raw text of the call being read (for the streaming fallback)
        self._name: list[str] = []
        self._name_len = 0
        self._call_id_len = 0
        self._calls: list[_Call] = []
        self._malformed = False
        self._finished = False
        self._truncated = False
        # What the current feed()/finish() call will return, gathered as parts (no quadratic +=).
        self._out_content: list[str] = []
        self._out_reasoning: list[str] = []
        self._out_tools: list[ToolCallDelta] = []
        self.scanned_chars = 0  # characters examined by the marker scan, for complexity checks

    # -- public -------------------------------------------------------------------------------------

    def feed(self, text_delta: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        text = self._pending + text_delta
        self._pending = ""
        self.scanned_chars += len(text)
        pos = 0
        while pos < len(text):
            matcher = self._matchers[self._state]
            match = matcher.pattern.search(text, pos) if matcher.pattern is not None else None
            if match is None:
                hold = matcher.holdback_start(text, pos)
                self._text(text[pos:hold])
                self._pending = text[hold:]
                break
            self._text(text[pos : match.start()])
            self._marker(match.group())
            pos = match.end()
        return self._take()

    def finish(self, truncated: bool = False) -> ParsedDelta:
        """Flush held-back text and close the output; after this the totals are final.

        ``truncated``: the output was cut (max_tokens), not ended by the model. A tool call cut before its
        ``[ARGS]`` is then dropped (never sent as content), and the calls of the section are kept as they were
        streamed, the last one with partial arguments: ``tool_calls`` returns them and ``content`` leaves the
        section out, so control strings never reach the content of a cut answer."""
        if self._finished:
            return ParsedDelta()
        pending, self._pending = self._pending, ""
        self._text(pending)
        self._truncated = truncated and self._section is not None and not self._malformed
        if self._state in (_State.NAME, _State.CALL_ID):
            if self._truncated:
                self._call_raw = []  # a name cut short: not a call, and not content either
            else:
                self._malformed_call()  # a call that never reached [ARGS]
        elif self._state is _State.ARGS:
            self._end_call()
        self._finished = True
        return self._take()

    @property
    def content(self) -> str:
        """Final content: text outside reasoning, plus the raw tool-call section if it was malformed."""
        text = "".join(self._content)
        if self._section is not None and not self.tool_calls_valid and not self._truncated:
            text += "".join(self._section)
        return text

    @property
    def reasoning_content(self) -> str:
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Final tool calls: all of the section's calls if every one is well formed, else none; of a truncated
        output, the calls as streamed (the last one's arguments may be cut)."""
        if self._truncated:
            return self.streamed_tool_calls
        if not self.tool_calls_valid:
            return []
        return [ToolCall(c.id, c.name, "".join(c.arguments).strip()) for c in self._calls]

    @property
    def streamed_tool_calls(self) -> list[ToolCall]:
        """Every call sent as streaming deltas, with its arguments as sent (valid or not)."""
        return [ToolCall(c.id, c.name, "".join(c.arguments).strip()) for c in self._calls]

    @property
    def tool_calls_valid(self) -> bool:
        """False once the tool-call section is known to be malformed (no section counts as valid)."""
        return not self._malformed and all(c.valid is not False for c in self._calls)

    # -- state machine ------------------------------------------------------------------------------

    def _text(self, text: str) -> None:
        if not text:
            return
        state = self._state
        if state is _State.CONTENT:
            self._content.append(text)
            self._out_content.append(text)
        elif state is _State.THINK:
            self._reasoning.append(text)
            self._out_reasoning.append(text)
        elif state is _State.RAW:
            self._raw(text)
            self._out_content.append(text)
        elif state is _State.ARGS:
            self._raw(text)
            call = self._calls[-1]
            call.arguments.append(text)
            self._tool_delta(len(self._calls) - 1, None, None, text)
        elif state is _State.NAME:
            self._raw(text)
            self._name.append(text)
            self._name_len += len(text)
            if self._name_len > _MAX_NAME or _NAME_CHAR.fullmatch(text) is None:
                self._malformed_call()
        else:  # CALL_ID: the model's id is read and dropped
            self._raw(text)
            self._call_id_len += len(text)
            if self._call_id_len > _MAX_CALL_ID:
                self._malformed_call()

    def _marker(self, marker: str) -> None:
        state = self._state
        if state is _State.CONTENT:
            if marker == THINK:
                self._state = _State.THINK
            else:
                self._start_section(marker)
        elif state is _State.THINK:
            if marker == END_THINK:
                self._state = _State.CONTENT
            else:
                self._start_section(marker)
        elif state is _State.ARGS:  # only [TOOL_CALLS] is a marker here
            self._end_call()
            self._start_call(marker)
        elif state is _State.RAW:
            self._text(marker)
        elif marker == ARGS and _NAME.fullmatch("".join(self._name).strip()):  # NAME or CALL_ID
            self._raw(marker)
            self._open_call()
        elif marker == CALL_ID and state is _State.NAME and self._name_len > 0:
            self._raw(marker)
            self._state = _State.CALL_ID
        else:
            self._malformed_call()
            self._text(marker)

    def _start_section(self, marker: str) -> None:
        self._section = []
        self._start_call(marker)

    def _start_call(self, marker: str) -> None:
        self._state = _State.NAME
        self._call_raw = []
        self._name = []
        self._name_len = 0
        self._call_id_len = 0
        self._raw(marker)

    def _open_call(self) -> None:
        call = _Call(id=self._id_factory(), name="".join(self._name).strip())
        self._calls.append(call)
        self._state = _State.ARGS
        self._tool_delta(len(self._calls) - 1, call.id, call.name, "")

    def _end_call(self) -> None:
        call = self._calls[-1]
        try:
            call.valid = isinstance(json.loads("".join(call.arguments)), dict)
        except (ValueError, RecursionError):
            call.valid = False

    def _malformed_call(self) -> None:
        """The call being read is broken before any delta of it was sent: stream its raw text as content."""
        self._malformed = True
        self._state = _State.RAW
        self._out_content.extend(self._call_raw)
        self._call_raw = []

    def _raw(self, text: str) -> None:
        """Record text of the tool-call section (for the final fallback) and of an unopened call."""
        if self._section is not None:
            self._section.append(text)
        if self._state in (_State.NAME, _State.CALL_ID):
            self._call_raw.append(text)

    def _tool_delta(self, index: int, call_id: str | None, name: str | None, arguments: str) -> None:
        deltas = self._out_tools
        if deltas and deltas[-1].index == index:
            last = deltas[-1]
            deltas[-1] = ToolCallDelta(index, last.id, last.name, last.arguments_delta + arguments)
        else:
            deltas.append(ToolCallDelta(index, call_id, name, arguments))

    def _take(self) -> ParsedDelta:
        out = ParsedDelta("".join(self._out_content), "".join(self._out_reasoning), self._out_tools)
        self._out_content, self._out_reasoning, self._out_tools = [], [], []
        return out
