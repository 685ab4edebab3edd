"""Structured output as token masks: mistral-common's grammars compiled by llguidance, one matcher per request.

A request needs a grammar when its output is constrained, and only then:

- ``response_format`` ``json_object`` or ``json_schema``: always (with tools and ``tool_choice`` "auto" the
  grammar is "the JSON answer or tool calls", as mistral-common renders it);
- ``tool_choice`` "required" (or the deprecated "any") or a named tool: a grammar that forces tool calls in
  the model's ``[TOOL_CALLS]name[ARGS]{json}`` format (a named choice pins the name);
- ``tool_choice`` "auto" with tools and a text response: a grammar triggered by the model's own ``[TOOL_CALLS]``
  (``tool_section_grammar`` + ``TriggeredMatcher``): the model chooses freely between text and tool calls and
  nothing is masked until it opens a call; from there the call must name an offered tool with arguments of its
  schema. "none" is honoured by the prompt and needs no grammar.

Deliberate departures from mistral-common's defaults, all stricter, never looser:

- ``json_object`` means a JSON *object* (OpenAI's JSON mode), not "an object or an array";
- reasoning off (``reasoning_effort`` None or "none", the v15 default) uses the grammar template without a
  ``[THINK]`` section, so a model that was asked not to think cannot open one; with reasoning on, the think
  template allows an optional ``[THINK]...[/THINK]`` before the answer;
- the server passes every request through ``enforce_schemas``: tools and the json_schema are enforced as if
  strict (as vLLM does; mistral-common's non-strict reading asks only for valid JSON), and a tool's parameter
  objects are closed to their declared keys (OpenAI's strict mode requires ``additionalProperties: false``).

Without ``enforce_schemas`` a non-strict ``json_schema`` or tool follows mistral-common: the schema goes to the
model in its settings, the grammar only asks for valid JSON.

Compilation (building llguidance's lexer and parser for a grammar) is cached in a bounded LRU keyed by the
grammar text; a request gets a cheap copy of the compiled matcher. Compile cost is bounded twice: llguidance's
``LLParserLimits`` cap the grammar size and the lexer work (compile time and per-token mask time), and the
compile runs on a worker thread (llguidance drops the GIL) that the caller waits on for at most ``timeout_s``
seconds. A compile that overruns makes the request fail with ``GrammarError``; the thread cannot be killed and
finishes in the background (bounded by the limits), its result is cached for later requests.

Masks are llguidance bitmasks (``bytes``: little-endian 32-bit words, bit ``t`` set when token ``t`` may come
next); ``small4/engine/token_mask.py`` turns them into tensors. This module never touches tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import llguidance as llg
from mistral_common.exceptions import InvalidRequestException
from mistral_common.guidance.grammar_factory import JINJA_PATHS, GrammarFactory
from mistral_common.protocol.instruct.request import (
    ChatCompletionRequest,
    JsonSchema,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormats,
)
from mistral_common.protocol.instruct.tool_calls import NamedToolChoice, ToolChoiceEnum
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

from small4.chat.render import MAX_JSON_DEPTH, json_depth

# fixed whitespace, as _compact gives the client's schemas: JSON mode must not pad forever either
_JSON_OBJECT = JsonSchema(
    name="json_object",
    schema={
        "type": "object",
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    },
    strict=True,
)
_OPENAI_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
_MAX_ERROR_CHARS = 500
# minItems / maxItems above this are refused: llguidance unrolls them (maxItems 1e5 overflows its symbol table,
# 2**31 compiles for minutes, holding a compile worker long after the request timed out). 4096 compiles in 0.1 s.
MAX_SCHEMA_ITEMS = 4096


class GrammarError(ValueError):
    """The request's structured-output constraint cannot be built: a bad schema, an inconsistent tool choice,
    or a grammar that fails to compile (or takes too long). The server answers 400 with the message."""


def response_format_from_openai(response_format: Mapping[str, Any] | None) -> ResponseFormat:
    """OpenAI ``response_format`` -> mistral-common ``ResponseFormat``; None means text.

    Accepts ``{"type": "text"}``, ``{"type": "json_object"}`` and ``{"type": "json_schema", "json_schema":
    {"name": str, "schema": {...}, "description"?: str, "strict"?: bool}}``. Anything else, unknown keys and
    schemas that are not valid Draft 7 JSON Schema raise ``GrammarError``.
    """
    if response_format is None:
        return ResponseFormat()
    if not isinstance(response_format, Mapping):
        raise GrammarError("response_format must be an object")
    kind = response_format.get("type")
    if kind not in _OPENAI_FORMAT_KEYS:
        raise GrammarError(f"response_format.type must be one of {sorted(_OPENAI_FORMAT_KEYS)}, got {kind!r}")
    _reject_unknown_keys(response_format, _OPENAI_FORMAT_KEYS[kind], "response_format")
    if kind != "json_schema":
        return ResponseFormat(type=ResponseFormats(kind))
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise GrammarError("response_format.json_schema must be an object")
    _reject_unknown_keys(spec, _JSON_SCHEMA_KEYS, "response_format.json_schema")
    name, schema = spec.get("name"), spec.get("schema")
    if not isinstance(name, str) or not name:
        raise GrammarError("response_format.json_schema.name must be a non-empty string")
    if not isinstance(schema, Mapping):
        raise GrammarError("response_format.json_schema.schema must be an object (a JSON Schema)")
    if json_depth(dict(schema)) > MAX_JSON_DEPTH:
        raise GrammarError(f"response_format.json_schema.schema is nested deeper than {MAX_JSON_DEPTH} levels")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError("response_format.json_schema.strict must be a boolean")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise GrammarError("response_format.json_schema.description must be a string")
    try:
        json_schema = JsonSchema(name=name, description=description, schema=dict(schema), strict=bool(strict))
    except (ValidationError, ValueError) as e:
        raise GrammarError(f"invalid JSON schema in response_format: {_first_error(e)}") from e
    return ResponseFormat(type=ResponseFormats.json_schema, json_schema=json_schema)


def _check_item_counts(schema: Any, where: str) -> None:
    """``GrammarError`` for an array bound the grammar compiler cannot afford (see ``MAX_SCHEMA_ITEMS``)."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in ("minItems", "maxItems"):
                value = item.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_ITEMS:
                    raise GrammarError(f"{where}: {key} above {MAX_SCHEMA_ITEMS} is not supported")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _reject_unknown_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise GrammarError(f"{where} has unsupported fields: {', '.join(unknown)}")


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError) and e.errors():
        return str(e.errors()[0].get("msg", e))
    return str(e)


def _short(message: str) -> str:
    """llguidance errors carry the whole grammar after the first line; the first line says what is wrong."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return first[:_MAX_ERROR_CHARS]


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled grammar: the lark text and a fresh llguidance matcher that is only ever copied."""

    text: str
    _template: llg.LLMatcher

    def new_matcher_state(self) -> llg.LLMatcher:
        return self._template.deep_copy()


class GrammarMatcher:
    """One request's position in its grammar, fed with the request's whole output each step.

    ``advance(output_token_ids)`` consumes only the tokens it has not seen (it keeps a count) and returns the
    bitmask of tokens allowed next. Where the grammar is complete, EOS is allowed (llguidance adds it). A token
    the grammar rejects, or any llguidance error, marks the matcher failed: from then on only EOS is allowed, so
    the request ends instead of crashing the engine. One matcher serves exactly one sequence.
    """

    def __init__(self, matcher: llg.LLMatcher, eos_id: int, mask_words: int) -> None:
        self._matcher = matcher
        self._eos_id = eos_id
        self._eos_only = _eos_only_bitmask(eos_id, mask_words)
        self._consumed: list[int] = []
        self.error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def num_consumed(self) -> int:
        return len(self._consumed)

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar (EOS may follow)."""
        return not self.failed and self._matcher.is_accepting()

    def advance(self, output_token_ids: Sequence[int]) -> bytes:
        """Consume the new suffix of ``output_token_ids``; return the allowed-next-token bitmask."""
        if not self.failed:
            self._sync(output_token_ids)
        if self.failed:
            return self._eos_only
        mask = self._matcher.compute_bitmask()
        if self._matcher.is_error():
            self._fail(self._matcher.get_error())
            return self._eos_only
        return mask

    def _sync(self, tokens: Sequence[int]) -> None:
        """Consume ``tokens`` past what was consumed. Output that is shorter or differs in its tail (speculative
        decoding: drafts checked, then rejected) rolls the matcher back to the common prefix first."""
        done = len(self._consumed)
        common = common_prefix(tokens, self._consumed)
        if common < done:
            if not self._matcher.rollback(done - common):
                self._fail(
                    f"cannot roll the grammar back by {done - common} tokens: {_short(self._matcher.get_error())}"
                )
                return
            del self._consumed[common:]
            done = common
        for token in tokens[done:]:
            token = int(token)
            if token == self._eos_id and (self._matcher.is_accepting() or self._matcher.is_stopped()):
                # EOS ends the output: it is never fed to llguidance (a stopped matcher's rollback then takes one
                # token too many: speculative drafts "}", EOS, EOS rejected left the matcher before the "}")
                return
            try:
                ok = self._matcher.consume_token(token)
            except Exception as e:  # API-level errors, e.g. a token id outside the grammar's vocabulary
                ok, why = False, str(e)
            else:
                why = self._matcher.get_error() if not ok else ""
            if not ok:
                self._fail(f"token {token} is not allowed by the grammar: {_short(why)}")
                return
            self._consumed.append(token)

    def _fail(self, why: str) -> None:
        self.error = _short(why)


class TriggeredMatcher:
    """A grammar that starts at a trigger token: llguidance's lazy grammar, for the tool-call section of a
    tool_choice "auto" answer.

    Until the output holds the trigger (``[TOOL_CALLS]``) ``advance`` returns None (no constraint, nothing
    computed). From the first trigger on, the inner matcher is fed the output from that token and its masks apply,
    so everything after it must be a sentence of the section grammar (and EOS is allowed only where the section is
    complete). Same one-sequence contract as ``GrammarMatcher``."""

    def __init__(self, inner: GrammarMatcher, trigger_id: int) -> None:
        self._inner = inner
        self._trigger_id = trigger_id
        self._seen: list[int] = []  # the output scanned for the trigger (up to and including it)
        self._start: int | None = None

    @property
    def triggered(self) -> bool:
        return self._start is not None

    @property
    def error(self) -> str | None:
        return self._inner.error

    @property
    def failed(self) -> bool:
        return self._inner.failed

    def advance(self, output_token_ids: Sequence[int]) -> bytes | None:
        out, seen = output_token_ids, self._seen
        common = common_prefix(out, seen)
        if common < len(seen):
            # the output was rolled back (speculative drafts rejected): keep what it still shares, rescan the rest
            del seen[common:]
            if self._start is not None and self._start >= common:
                self._start = None
        if self._start is None:
            for i in range(len(seen), len(out)):
                seen.append(int(out[i]))
                if seen[-1] == self._trigger_id:
                    self._start = i
                    break
            else:
                return None
        return self._inner.advance(output_token_ids[self._start :])


def common_prefix(tokens: Sequence[int], consumed: list[int]) -> int:
    """How many leading tokens ``tokens`` shares with ``consumed``. Every position counts: after speculative drafts
    are rejected, the new output can differ early and agree again at the end (a repeated quote or brace), which a
    look at the last token alone would take for no change (the matcher then kept a rejected token: a JSON object
    the model closed still wanted another "}")."""
    n = min(len(tokens), len(consumed))
    # The engine passes a list of ints: its slice compares at C speed (8k output tokens: ~30 us a step, where the
    # Python loop this replaced took ~600 us, every step of the sequence). Anything else is converted first.
    head = tokens[:n] if isinstance(tokens, list) else [int(t) for t in tokens[:n]]
    if head == consumed[:n]:
        return n
    return next(i for i in range(n) if head[i] != consumed[i])


def _eos_only_bitmask(eos_id: int, mask_words: int) -> bytes:
    mask = bytearray(4 * mask_words)
    mask[eos_id // 8] |= 1 << (eos_id % 8)
    return bytes(mask)


class GrammarCompiler:
    """Builds, compiles and caches grammars for mistral-common chat requests; hands out per-request matchers.

    Thread-safe: the cache is locked and concurrent compiles of the same grammar share one compile.
    ``num_compiles`` counts compiles started; ``num_cache_hits`` counts grammars served from the cache.
    """

    def __init__(
        self,
        tokenizer: MistralTokenizer,
        max_cache_entries: int = 128,
        timeout_s: float = 5.0,
        limits: llg.LLParserLimits | None = None,
        max_workers: int = 2,
    ) -> None:
        if max_cache_entries < 1:
            raise ValueError("max_cache_entries must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        try:
            self._factory = GrammarFactory(tokenizer)
        except ValueError as e:
            raise ValueError(f"structured output needs a tekken tokenizer >= v11: {e}") from e
        self._llg_tokenizer = self._factory.llg_tokenizer
        self.vocab_size: int = self._llg_tokenizer.vocab_size
        self.eos_id: int = self._llg_tokenizer.eos_token
        self.tool_calls_id: int = tokenizer.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
        self._mask_words = (self.vocab_size + 31) // 32
        self._think_template = self._factory.select_jinja_template()
        self._plain_template = JINJA_PATHS["base"].read_text(encoding="utf-8")
        self._limits = limits or llg.LLParserLimits(verbose_errors=False)
        self.max_cache_entries = max_cache_entries
        self.timeout_s = timeout_s
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._pending: dict[str, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="small4-grammar")
        self.num_compiles = 0
        self.num_cache_hits = 0

    # ---- which grammar -------------------------------------------------------------------------------------
    def grammar_for(self, request: ChatCompletionRequest, reasoning: bool | None = None) -> str | None:
        """The lark grammar constraining this request's output, or None when it needs none (see the module doc).

        ``reasoning`` says whether the model may open a ``[THINK]`` section; None derives it from
        ``request.reasoning_effort``. Inconsistent requests (tool_choice "required" without tools, a JSON
        response format with a forced tool) raise ``GrammarError``.
        """
        needs_grammar = request.response_format.type != ResponseFormats.text or isinstance(
            request.tool_choice, NamedToolChoice
        )
        needs_grammar = needs_grammar or request.tool_choice in (ToolChoiceEnum.required, ToolChoiceEnum.any)
        if not needs_grammar:
            return None
        if request.response_format.type == ResponseFormats.json_object:
            request = request.model_copy(
                update={"response_format": ResponseFormat(type=ResponseFormats.json_schema, json_schema=_JSON_OBJECT)}
            )
        for tool in request.tools or []:
            _check_item_counts(tool.function.parameters, "tools")
        if request.response_format.json_schema is not None:
            _check_item_counts(request.response_format.json_schema.custom_schema, "response_format")
        if reasoning is None:
            reasoning = request.reasoning_effort not in (None, ReasoningEffort.none)
        template = self._think_template if reasoning else self._plain_template
        try:
            return self._factory.get_grammar_for_chat_request(request, template)
        except (InvalidRequestException, ValueError) as e:
            raise GrammarError(str(e)) from e
        except RecursionError:  # a backstop: render and response_format_from_openai bound the nesting
            raise GrammarError("the schema is nested too deeply to build a grammar") from None

    def tool_section_grammar(self, request: ChatCompletionRequest) -> str | None:
        """``tool_choice`` "auto" with tools and a text answer: the grammar of the tool-call section alone
        (``[TOOL_CALLS]name[ARGS]{json}``, repeated unless ``parallel_tool_calls`` is false), for a
        ``TriggeredMatcher`` that applies it from the model's own ``[TOOL_CALLS]`` on. Before that the output is
        free (no mask, no cost); from there the name is one of the offered tools and the arguments follow its schema
        (pass the request through ``enforce_schemas``): without it a weak or confused model may name a tool that
        was never offered or write arguments of another tool. None when the request is not of that kind (no tools,
        another tool_choice, a JSON response format: ``grammar_for`` covers those)."""
        if not request.tools or request.tool_choice != ToolChoiceEnum.auto:
            return None
        if request.response_format.type != ResponseFormats.text:
            return None
        section = request.model_copy(update={"tool_choice": ToolChoiceEnum.required})
        try:
            return self._factory.get_grammar_for_chat_request(section, self._plain_template)
        except (InvalidRequestException, ValueError) as e:
            raise GrammarError(str(e)) from e

    def triggered_matcher(self, grammar: str | CompiledGrammar) -> TriggeredMatcher:
        """A fresh ``TriggeredMatcher`` for one sequence over a ``tool_section_grammar``."""
        return TriggeredMatcher(self.matcher(grammar), self.tool_calls_id)

    # ---- compiling ---------------------------------------------------------------------------------------
    def compile(self, grammar: str) -> CompiledGrammar:
        """Compile a lark grammar (cached by its text); ``GrammarError`` if it is invalid or too slow."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                self.num_cache_hits += 1
                return cached
            future = self._pending.get(grammar)
            if future is None:
                self.num_compiles += 1
                future = self._pool.submit(self._compile_and_store, grammar)
                self._pending[grammar] = future
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(f"grammar compilation took longer than {self.timeout_s:g} s") from None

    def _compile_and_store(self, grammar: str) -> CompiledGrammar:
        try:
            compiled = CompiledGrammar(grammar, self._build(grammar))
            with self._lock:
                self._cache[grammar] = compiled
                while len(self._cache) > self.max_cache_entries:
                    self._cache.popitem(last=False)
            return compiled
        finally:
            with self._lock:
                self._pending.pop(grammar, None)

    def _build(self, grammar: str) -> llg.LLMatcher:
        """The llguidance compile (drops the GIL). Never raises for bad grammars: the matcher is in error."""
        matcher = llg.LLMatcher(
            self._llg_tokenizer, llg.LLMatcher.grammar_from_lark(grammar), log_level=0, limits=self._limits
        )
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {_short(matcher.get_error())}")
        return matcher

    @property
    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)

    # ---- matching ----------------------------------------------------------------------------------------
    def matcher(self, grammar: str | CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher for one sequence; a grammar given as text is compiled (or taken from the cache)."""
        compiled = grammar if isinstance(grammar, CompiledGrammar) else self.compile(grammar)
        return GrammarMatcher(compiled.new_matcher_state(), self.eos_id, self._mask_words)

    def matcher_for(self, request: ChatCompletionRequest, reasoning: bool | None = None) -> GrammarMatcher | None:
        """``grammar_for`` + ``matcher``: None when the request is unconstrained."""
        grammar = self.grammar_for(request, reasoning)
        return None if grammar is None else self.matcher(grammar)

    def close(self) -> None:
        """Stop the compile workers (running compiles finish first)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """Fixed JSON whitespace (``", "`` and ``": "``, what ``json.dumps`` writes and so what the model saw for tool
    arguments in training) unless the client's schema already says otherwise: free whitespace lets a weak or
    confused model pad forever without ever closing the object."""
    return schema if "x-guidance" in schema else {**schema, "x-guidance": _COMPACT}


_KEEP_AS_WRITTEN = frozenset({"allOf", "not", "if", "const", "enum", "default", "examples"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})  # name -> schema


def _closed(schema: Any) -> Any:
    """``schema`` with every object that lists ``properties`` and says nothing of ``additionalProperties`` closed
    (``additionalProperties: false``, what OpenAI's strict function calling requires): a tool's parameters are
    the arguments it takes, and an open object lets a weak or confused model invent keys ("value" for a declared
    "destination"). Objects under ``allOf`` (closing them would make the conjunction refuse the other branch's
    keys), ``not`` and ``if`` (closing would loosen) stay as written; an explicit ``additionalProperties`` is the
    client's word and is kept."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed_value(k, v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema and "allOf" not in schema:
        out["additionalProperties"] = False
    return out


def _closed_value(keyword: str, value: Any) -> Any:
    if keyword in _KEEP_AS_WRITTEN:
        return value
    if keyword in _SCHEMA_MAPS and isinstance(value, dict):  # the keys are names, not keywords
        return {name: _closed(sub) for name, sub in value.items()}
    return _closed(value)


def enforce_schemas(request: ChatCompletionRequest) -> ChatCompletionRequest:
    """A copy of ``request`` for grammar building: every tool and the json_schema marked strict, so the grammar
    enforces the declared schemas (as vLLM does) instead of mistral-common's non-strict "any JSON" reading, with
    fixed JSON whitespace; a tool's parameter objects are closed to their declared keys (``_closed``). The
    json_schema is the client's own document and keeps its ``additionalProperties`` default. Stricter only,
    never looser."""
    update: dict[str, Any] = {}
    if request.tools:
        update["tools"] = [
            t.model_copy(
                update={
                    "function": t.function.model_copy(
                        update={"strict": True, "parameters": _compact(_closed(t.function.parameters))}
                    )
                }
            )
            for t in request.tools
        ]
    rf = request.response_format
    if rf is not None and rf.json_schema is not None:
        js = rf.json_schema.model_copy(update={"strict": True, "custom_schema": _compact(rf.json_schema.custom_schema)})
        update["response_format"] = rf.model_copy(update={"json_schema": js})
    return request.model_copy(update=update) if update else request
