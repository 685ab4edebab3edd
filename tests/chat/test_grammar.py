"""Structured output: grammars from mistral-common requests, compiled by llguidance, enforced through the real
engine on a random tiny model. The outputs must parse and validate whatever the (random) model prefers.

Test schemas bound their outputs (compact whitespace via llguidance's ``x-guidance``, maxLength, maximum,
one tool call) so a random model must finish well within max_tokens: finish_reason "stop" then proves the
grammar allowed EOS exactly when the output was complete.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest, ResponseFormat, ResponseFormats
from mistral_common.protocol.instruct.tool_calls import Function, Tool

from small4.chat.grammar import GrammarCompiler, GrammarError, GrammarMatcher, response_format_from_openai
from small4.config import EngineConfig
from small4.engine.engine import LLM
from small4.engine.sampling_params import SamplingParams
from small4.engine.token_mask import token_mask_provider
from small4.weights.tiny import make_tiny

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
PERSON = {
    **COMPACT,
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["age", "name"],
    "additionalProperties": False,
}
WEATHER = {
    **COMPACT,
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    **COMPACT,
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    Tool(function=Function(name="get_weather", parameters=WEATHER, strict=True)),
    Tool(function=Function(name="get_time", parameters=TIME, strict=True)),
]
TOOL_CALL = re.compile(r"\[TOOL_CALLS\]\s*(?P<name>[\w-]+)\[ARGS\]\s*(?P<args>\{.*\})\s*", re.DOTALL)
SEEDS = [None, 0, 1]  # greedy and two sampled runs, batched together


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=7), EngineConfig(block_size=4))


@pytest.fixture(scope="module")
def compiler(llm):
    return GrammarCompiler(llm.tokenizer.mistral)


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Answer, please."}], **kw)


def _generate(llm, compiler, request, logit_bias=None) -> list[tuple[str, str]]:
    """Runs the request once per seed (one matcher each) through the engine; returns (text, finish_reason)."""
    engine = llm.engine
    prompt = llm.tokenizer.mistral.encode_chat_completion(request).tokens
    vocab = engine.runner.config.text.vocab_size
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for i, seed in enumerate(SEEDS):
        params = SamplingParams(
            temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=200, logit_bias=logit_bias or {}
        )
        matcher = compiler.matcher_for(request)
        assert matcher is not None
        engine.add_request(f"g{i}", prompt, params, token_mask_factory=lambda m=matcher: token_mask_provider(m, vocab))
        tokens[f"g{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    results = []
    for rid in sorted(tokens):
        ids = tokens[rid]
        if finish[rid] == "stop":  # the EOS that ended the sequence is in its token ids, not in its text
            assert ids[-1] == llm.tokenizer.eos_id
            ids = ids[:-1]
        results.append((llm.tokenizer.decode(ids, skip_special_tokens=False), finish[rid]))
    return results


def test_json_schema_output_parses_and_validates(llm, compiler):
    fmt = response_format_from_openai(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    )
    for text, finish in _generate(llm, compiler, _request(response_format=fmt)):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_is_an_object(llm, compiler):
    # The bias makes "}" the model's favourite token; the grammar must still produce an object, then EOS.
    close = llm.tokenizer.encode("}", bos=False)
    assert len(close) == 1
    request = _request(response_format=response_format_from_openai({"type": "json_object"}))
    for text, finish in _generate(llm, compiler, request, logit_bias={close[0]: 30.0}):
        assert finish == "stop", text
        assert isinstance(json.loads(text), dict)


def test_tool_choice_required_yields_a_valid_tool_call(llm, compiler):
    request = _request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schemas = {t.function.name: t.function.parameters for t in TOOLS}
    for text, finish in _generate(llm, compiler, request):
        assert finish == "stop", text
        call = TOOL_CALL.fullmatch(text)
        assert call is not None, text
        jsonschema.validate(json.loads(call["args"]), schemas[call["name"]])


def test_named_tool_choice_pins_the_tool(llm, compiler):
    choice = {"type": "function", "function": {"name": "get_time"}}
    request = _request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    for text, finish in _generate(llm, compiler, request):
        assert finish == "stop", text
        call = TOOL_CALL.fullmatch(text)
        assert call is not None and call["name"] == "get_time", text
        jsonschema.validate(json.loads(call["args"]), TIME)


# ---- which requests get a grammar ---------------------------------------------------------------------------
def test_auto_and_none_tool_choice_need_no_grammar(compiler):
    assert compiler.grammar_for(_request()) is None
    assert compiler.grammar_for(_request(tools=TOOLS, tool_choice="auto")) is None
    assert compiler.grammar_for(_request(tools=TOOLS, tool_choice="none")) is None
    json_and_tools = compiler.grammar_for(_request(tools=TOOLS, response_format=ResponseFormat(type="json_object")))
    assert json_and_tools is not None and "get_weather" in json_and_tools


def test_forced_tool_without_tools_or_with_json_is_rejected(compiler):
    with pytest.raises(GrammarError, match="No tools"):
        compiler.grammar_for(_request(tool_choice="required"))
    with pytest.raises(GrammarError, match="tool_choice"):
        compiler.grammar_for(
            _request(tools=TOOLS, tool_choice="required", response_format=ResponseFormat(type="json_object"))
        )


def test_think_section_only_with_reasoning(llm, compiler):
    think, end_think = llm.tokenizer.special_id("[THINK]"), llm.tokenizer.special_id("[/THINK]")
    fmt = response_format_from_openai({"type": "json_object"})

    def allowed_first(matcher: GrammarMatcher) -> set[int]:
        return _allowed(matcher.advance([]))

    assert think not in allowed_first(compiler.matcher_for(_request(response_format=fmt)))
    reasoning = _request(response_format=fmt, reasoning_effort="high")
    assert think in allowed_first(compiler.matcher_for(reasoning))
    matcher = compiler.matcher_for(reasoning)
    output = [think, *llm.tokenizer.encode("hmm", bos=False), end_think, *llm.tokenizer.encode("{}", bos=False)]
    mask = matcher.advance(output)
    assert not matcher.failed and matcher.is_accepting() and _allowed(mask) == {llm.tokenizer.eos_id}


def test_non_strict_schema_only_asks_for_json(compiler):
    fmt = response_format_from_openai({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert fmt.json_schema is not None and not fmt.json_schema.strict
    grammar = compiler.grammar_for(_request(response_format=fmt))
    assert grammar is not None and "maxLength" not in grammar and '"array"' in grammar


# ---- response_format from OpenAI shapes ---------------------------------------------------------------------
def test_response_format_from_openai_shapes():
    assert response_format_from_openai(None).type == ResponseFormats.text
    assert response_format_from_openai({"type": "text"}).type == ResponseFormats.text
    assert response_format_from_openai({"type": "json_object"}).type == ResponseFormats.json_object
    fmt = response_format_from_openai(
        {"type": "json_schema", "json_schema": {"name": "p", "description": "d", "schema": PERSON, "strict": True}}
    )
    assert fmt.type == ResponseFormats.json_schema and fmt.json_schema.strict
    assert fmt.json_schema.custom_schema == PERSON and fmt.json_schema.description == "d"


@pytest.mark.parametrize(
    "bad",
    [
        "json_object",
        {"type": "nonsense"},
        {"type": "text", "json_schema": {}},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "p"}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": "yes"}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "extra": 1}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}},
    ],
)
def test_bad_response_formats_raise_grammar_error(bad):
    with pytest.raises(GrammarError):
        response_format_from_openai(bad)
    assert issubclass(GrammarError, ValueError)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},  # tools' schemas are not checked by mistral-common: llguidance refuses them
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "string", "pattern": "(?<=a)b"},
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_uncompilable_schemas_raise_grammar_error(compiler, schema):
    tool = Tool(function=Function(name="f", parameters=schema, strict=True))
    grammar = compiler.grammar_for(_request(tools=[tool], tool_choice="required"))
    with pytest.raises(GrammarError, match="invalid grammar"):
        compiler.matcher(grammar)


@pytest.mark.parametrize("where", ["tools", "response_format"])
def test_array_bounds_the_compiler_cannot_afford_are_refused_before_compiling(compiler, where):
    """maxItems 2**31 once compiled for minutes, holding a compile worker: refused at once; 4096 still compiles."""

    def request(count: int) -> ChatCompletionRequest:
        schema = {"type": "object", "properties": {"a": {"type": "array", "maxItems": count}}, "required": ["a"]}
        if where == "tools":
            return _request(tools=[Tool(function=Function(name="f", parameters=schema))], tool_choice="required")
        rf = response_format_from_openai({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        return _request(response_format=rf)

    start = time.monotonic()
    with pytest.raises(GrammarError, match="maxItems above 4096"):
        compiler.grammar_for(request(2**31))
    assert time.monotonic() - start < 1
    compiler.matcher(compiler.grammar_for(request(4096)))


# ---- compiling and caching ----------------------------------------------------------------------------------
def _schema_grammar(compiler, n: int) -> str:
    schema = {"type": "object", "properties": {f"k{n}": {"type": "integer"}}, "required": [f"k{n}"]}
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    )
    return compiler.grammar_for(_request(response_format=fmt))


def test_cache_is_bounded_and_reused(llm):
    compiler = GrammarCompiler(llm.tokenizer.mistral, max_cache_entries=2)
    g1, g2, g3 = (_schema_grammar(compiler, n) for n in range(3))
    first = compiler.compile(g1)
    assert compiler.compile(g1) is first
    assert (compiler.num_compiles, compiler.num_cache_hits) == (1, 1)
    compiler.matcher(g2)
    compiler.matcher(g3)  # evicts g1, the least recently used
    assert compiler.cache_size == 2 and compiler.num_compiles == 3
    compiler.matcher(g3)
    assert compiler.num_compiles == 3
    assert compiler.compile(g1) is not first
    assert compiler.num_compiles == 4 and compiler.cache_size == 2


def test_matchers_from_one_compiled_grammar_are_independent(llm, compiler):
    compiled = compiler.compile(_schema_grammar(compiler, 7))
    a, b = compiler.matcher(compiled), compiler.matcher(compiled)
    a.advance(llm.tokenizer.encode('{"k7":', bos=False))
    assert a.num_consumed > 0 and b.num_consumed == 0
    assert _allowed(b.advance([])) == _allowed(compiler.matcher(compiled).advance([]))


def test_compile_timeout_raises_grammar_error(llm, monkeypatch):
    compiler = GrammarCompiler(llm.tokenizer.mistral, timeout_s=0.05)
    real_build = compiler._build

    def slow_build(grammar):
        time.sleep(0.3)
        return real_build(grammar)

    monkeypatch.setattr(compiler, "_build", slow_build)
    with pytest.raises(GrammarError, match="longer than"):
        compiler.compile(_schema_grammar(compiler, 1))
    compiler.close()


# ---- matching -----------------------------------------------------------------------------------------------
def _person_matcher(compiler) -> GrammarMatcher:
    fmt = response_format_from_openai(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    )
    return compiler.matcher_for(_request(response_format=fmt))


def _allowed(bitmask: bytes) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bitmask) for b in range(8) if byte >> b & 1}


def test_matcher_consumes_only_the_new_suffix_and_allows_eos_at_the_end(llm, compiler):
    matcher = _person_matcher(compiler)
    tokens = llm.tokenizer.encode('{"age":42,"name":"Ada"}', bos=False)
    assert llm.tokenizer.eos_id not in _allowed(matcher.advance([]))
    for n in range(1, len(tokens) + 1):
        mask = matcher.advance(tokens[:n])  # the engine hands over the whole output every step
        assert matcher.num_consumed == n and not matcher.failed
    assert matcher.is_accepting()
    assert _allowed(mask) == {llm.tokenizer.eos_id}


@pytest.mark.parametrize("bad", ["x", "[", 10**6])
def test_rejected_token_fails_the_matcher_and_allows_only_eos(llm, compiler, bad):
    matcher = _person_matcher(compiler)
    tokens = llm.tokenizer.encode('{"age":', bos=False)
    tokens += llm.tokenizer.encode(bad, bos=False) if isinstance(bad, str) else [bad]
    mask = matcher.advance(tokens)
    assert matcher.failed and "not allowed" in matcher.error
    assert _allowed(mask) == {llm.tokenizer.eos_id}
    assert _allowed(matcher.advance([*tokens, 1500])) == {llm.tokenizer.eos_id}


def test_output_shorter_or_different_rolls_the_matcher_back(llm, compiler):
    """Speculative decoding checks drafts, then rejects some: the matcher rolls back to the common prefix and
    gives exactly the masks of a matcher that never saw the rejected tokens."""
    matcher = _person_matcher(compiler)
    tokens = llm.tokenizer.encode('{"age":4', bos=False)
    other = llm.tokenizer.encode('{"age":7', bos=False)
    matcher.advance(tokens)
    assert matcher.advance(tokens[:-1]) == _person_matcher(compiler).advance(tokens[:-1])
    assert matcher.advance(other) == _person_matcher(compiler).advance(other)
    assert not matcher.failed and matcher.num_consumed == len(other)


def test_output_that_differs_early_but_ends_alike_rolls_back(llm, compiler):
    """Rejected drafts can leave an output that differs in the middle and agrees on its last token (a repeated
    quote): the matcher still rolls back to the real common prefix, for the plain and the triggered matcher."""
    from small4.chat.grammar import common_prefix

    tok = llm.tokenizer
    head, quote = tok.encode('{"age":1,"name":"', bos=False), tok.encode('"', bos=False)
    drafted = head + tok.encode("a", bos=False) + quote  # the string closed: "," or "}" next
    kept = head + tok.encode("\\", bos=False) + quote  # an escaped quote: the string still open
    assert len(drafted) == len(kept) and drafted[-1] == kept[-1] and drafted != kept
    assert _person_matcher(compiler).advance(drafted) != _person_matcher(compiler).advance(kept)
    matcher = _person_matcher(compiler)
    matcher.advance(drafted)
    assert matcher.advance(kept) == _person_matcher(compiler).advance(kept)
    assert common_prefix(kept, drafted) == len(head) and common_prefix(kept, kept) == len(kept)
    assert common_prefix(kept[:2], drafted) == 2 and common_prefix([], drafted) == 0


def test_rejected_eos_drafts_leave_the_closing_token_consumed(llm, compiler):
    """Speculative drafts of EOS after a complete object, then rejected: the matcher is back right after the "}"
    (EOS allowed), not one token earlier (llguidance's rollback of a stopped matcher takes one token too many,
    so EOS is never fed to it); the served model then wrote '}}' and a second call into the arguments."""
    tok = llm.tokenizer
    done = tok.encode('{"age":1,"name":"a"}', bos=False)
    complete = _person_matcher(compiler)
    fresh = complete.advance(done)
    assert not complete.failed and tok.eos_id in _allowed(fresh)
    matcher = _person_matcher(compiler)
    matcher.advance([*done, tok.eos_id, tok.eos_id])
    assert matcher.advance(done) == fresh and not matcher.failed


def _tool_name_start_ids(llm, allowed: set[int]) -> set[str]:
    """The first characters of the tokens the mask allows (mistral-common's grammar allows up to 8 whitespace
    characters around a name)."""
    tok = llm.tokenizer
    return {tok.token_bytes(t).decode("utf-8", "replace")[:1] for t in allowed if not tok.is_special(t)}


def test_triggered_tool_grammar_is_free_until_tool_calls_then_holds_names_and_arguments(llm, compiler):
    """tool_choice auto: no mask before the model's own [TOOL_CALLS]; from it on, a name outside the offered tools
    is impossible (every token that would start or continue one is masked) and the arguments follow the schema."""
    from mistral_common.protocol.instruct.tool_calls import ToolChoiceEnum

    from small4.chat.grammar import enforce_schemas

    request = enforce_schemas(_request(tools=TOOLS, tool_choice=ToolChoiceEnum.auto))
    grammar = compiler.tool_section_grammar(request)
    assert grammar is not None and compiler.grammar_for(request) is None
    matcher = compiler.triggered_matcher(grammar)
    tok = llm.tokenizer
    text = tok.encode("Let me check.", bos=False)
    assert matcher.advance(text) is None and not matcher.triggered  # free text: nothing computed
    trigger = compiler.tool_calls_id
    after = matcher.advance([*text, trigger])
    assert matcher.triggered and _tool_name_start_ids(llm, _allowed(after)) - set(" \t\r\n") == {
        "g"
    }  # get_weather | get_time
    assert tok.eos_id not in _allowed(after)
    wrong = tok.encode("culator", bos=False)
    mask = matcher.advance([*text, trigger, *wrong])
    assert matcher.failed and _allowed(mask) == {tok.eos_id}  # a wrong name is refused, not followed
    ok = compiler.triggered_matcher(grammar)
    call = [
        trigger,
        *tok.encode("get_time", bos=False),
        tok.special_id("[ARGS]"),
        *tok.encode('{"zone":"utc"}', bos=False),
    ]
    end = ok.advance([*text, *call])
    assert not ok.failed, ok.error
    assert tok.eos_id in _allowed(end) and trigger in _allowed(end)  # parallel calls allowed


def test_triggered_tool_grammar_through_the_engine_never_names_an_unoffered_tool(llm, compiler):
    """The logits pushed toward [TOOL_CALLS] and toward letters no offered name starts with: every sampled answer is
    still well-formed calls of offered tools with schema-valid arguments."""
    from mistral_common.protocol.instruct.tool_calls import ToolChoiceEnum

    from small4.chat.grammar import enforce_schemas

    request = enforce_schemas(_request(tools=TOOLS, tool_choice=ToolChoiceEnum.auto, parallel_tool_calls=False))
    compiled = compiler.compile(compiler.tool_section_grammar(request))
    tok = llm.tokenizer
    bias = {compiler.tool_calls_id: 100.0, **{t: 20.0 for t in tok.encode("culator xyz", bos=False)}}
    engine, vocab = llm.engine, engine_vocab(llm)
    prompt = tok.mistral.encode_chat_completion(request).tokens
    for i, seed in enumerate(SEEDS):
        params = SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=60, logit_bias=bias)
        engine.add_request(
            f"t{i}", prompt, params, lambda: token_mask_provider(compiler.triggered_matcher(compiled), vocab)
        )
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for ids in outputs.values():
        text = tok.decode([t for t in ids if t != tok.eos_id], skip_special_tokens=False)
        match = TOOL_CALL.fullmatch(text)
        assert match is not None, text
        schema = {"get_weather": WEATHER, "get_time": TIME}[match["name"]]
        jsonschema.validate(json.loads(match["args"]), schema)


def engine_vocab(llm) -> int:
    return llm.engine.runner.config.text.vocab_size


def test_enforce_schemas_closes_tool_parameter_objects_and_keeps_the_clients_word():
    from small4.chat.grammar import _closed

    open_schema = {
        "type": "object",
        "properties": {
            "trip": {"type": "object", "properties": {"origin": {"type": "string"}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
            "either": {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "null"}]},
            "both": {"allOf": [{"type": "object", "properties": {"x": {"type": "integer"}}}]},
            "never": {"not": {"type": "object", "properties": {"y": {"type": "integer"}}}},
        },
    }
    closed = _closed(open_schema)
    props = closed["properties"]
    assert closed["additionalProperties"] is False
    assert props["trip"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["extra"]["additionalProperties"] is True  # said explicitly: kept
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert props["both"] == open_schema["properties"]["both"]  # closing would refuse the other branches' keys
    assert props["never"] == open_schema["properties"]["never"]  # closing would loosen
    assert "additionalProperties" not in open_schema  # a copy: the request's own schema is untouched
    named = _closed({"type": "object", "properties": {"properties": {"type": "string"}}, "$defs": {"x": {}}})
    assert named["properties"] == {"properties": {"type": "string"}}  # a parameter named "properties" is a name
    assert named["$defs"] == {"x": {}} and named["additionalProperties"] is False


def test_an_undeclared_argument_key_is_refused_for_a_non_strict_tool(llm, compiler):
    """A non-strict tool whose schema leaves additionalProperties unsaid: through ``enforce_schemas`` the
    arguments hold only declared keys (the held-out demo answered search_flights with a made-up "value" key)."""
    from mistral_common.protocol.instruct.tool_calls import ToolChoiceEnum

    from small4.chat.grammar import enforce_schemas

    params = {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}}}
    tools = [Tool(function=Function(name="search_flights", parameters=params))]
    request = enforce_schemas(_request(tools=tools, tool_choice=ToolChoiceEnum.required))
    grammar = compiler.compile(compiler.grammar_for(request, reasoning=False))
    tok = llm.tokenizer

    def accepts(arguments: str) -> bool:
        m = compiler.matcher(grammar)
        ids = [
            tok.special_id("[TOOL_CALLS]"),
            *tok.encode("search_flights", bos=False),
            tok.special_id("[ARGS]"),
            *tok.encode(arguments, bos=False),
        ]
        end = m.advance(ids)
        return not m.failed and tok.eos_id in _allowed(end)

    assert accepts('{"origin": "Perth", "destination": "Zagreb"}')
    assert accepts('{"origin": "Perth"}')  # nothing is required: optional keys may be left out
    assert not accepts('{"origin": "Perth", "value": "Zagreb"}')
    assert "additionalProperties" not in tools[0].function.parameters  # the client's tool is not modified
