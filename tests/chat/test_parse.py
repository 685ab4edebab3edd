"""chat/parse.py: incremental parsing of [THINK] / content / [TOOL_CALLS] output text."""

from __future__ import annotations

import codecs
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from small4.chat.parse import MARKERS, THINK, TOOL_CALLS, OutputParser, ParsedDelta, ToolCall, ToolCallDelta
from small4.tokenizer import Tokenizer
from small4.weights.tekken_tiny import write_tiny_tekken


def counter_ids():
    c = itertools.count()
    return lambda: f"call{next(c):05d}"


@dataclass
class Result:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    valid: bool
    # what the streaming deltas add up to
    stream_content: str
    stream_reasoning: str
    stream_calls: list[ToolCall]


def parse(pieces: list[str], reasoning: bool = True, tools: bool = True) -> Result:
    parser = OutputParser(reasoning=reasoning, tools=tools, id_factory=counter_ids())
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    calls: dict[int, list] = {}
    for d in deltas:
        assert isinstance(d, ParsedDelta)
        for tc in d.tool_calls:
            assert isinstance(tc, ToolCallDelta)
            if tc.index not in calls:
                assert tc.id is not None and tc.name is not None, "the first delta of a call names it"
                assert tc.index == len(calls), "calls are numbered in order"
                calls[tc.index] = [tc.id, tc.name, ""]
            else:
                assert tc.id is None and tc.name is None, "only the first delta of a call names it"
            calls[tc.index][2] += tc.arguments_delta
    return Result(
        content=parser.content,
        reasoning=parser.reasoning_content,
        tool_calls=parser.tool_calls,
        valid=parser.tool_calls_valid,
        stream_content="".join(d.content for d in deltas),
        stream_reasoning="".join(d.reasoning_content for d in deltas),
        stream_calls=[ToolCall(*calls[i]) for i in sorted(calls)],
    )


def final(r: Result) -> tuple:
    return r.content, r.reasoning, r.tool_calls, r.valid


def assert_stream_matches_final(r: Result) -> None:
    assert r.stream_content == r.content
    assert r.stream_reasoning == r.reasoning
    assert r.stream_calls == r.tool_calls


# -- well-formed output -----------------------------------------------------------------------------


def test_think_then_content() -> None:
    r = parse(["[THINK]Let me see.[/THINK]The answer is 4."])
    assert (r.reasoning, r.content, r.tool_calls) == ("Let me see.", "The answer is 4.", [])
    assert_stream_matches_final(r)


def test_content_only() -> None:
    for reasoning in (True, False):
        r = parse(["Just ", "an ", "answer [with brackets] and [THINKING] words."], reasoning=reasoning)
        assert (r.content, r.reasoning, r.tool_calls) == (
            "Just an answer [with brackets] and [THINKING] words.",
            "",
            [],
        )
        assert_stream_matches_final(r)


def test_unclosed_think_is_reasoning() -> None:
    r = parse(["[THINK]still ", "thinking"])
    assert (r.reasoning, r.content) == ("still thinking", "")


def test_think_markers_are_text_without_reasoning() -> None:
    r = parse(["[THINK]hm[/THINK]ok"], reasoning=False)
    assert (r.content, r.reasoning) == ("[THINK]hm[/THINK]ok", "")


def test_single_tool_call() -> None:
    r = parse(['[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'])
    assert r.tool_calls == [ToolCall("call00000", "get_weather", '{"city": "Paris"}')]
    assert (r.content, r.valid) == ("", True)
    assert_stream_matches_final(r)


def test_think_content_and_parallel_tool_calls() -> None:
    text = '[THINK]two calls[/THINK]Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'
    r = parse([text])
    assert (r.reasoning, r.content) == ("two calls", "Checking.")
    assert r.tool_calls == [
        ToolCall("call00000", "get_weather", '{"city": "Paris"}'),
        ToolCall("call00001", "get_time", "{}"),
    ]
    assert_stream_matches_final(r)


def test_tool_calls_end_unclosed_reasoning() -> None:
    r = parse(['[THINK]forgot to close[TOOL_CALLS]f[ARGS]{"a": [1, "[x]"]}'])
    assert r.reasoning == "forgot to close"
    assert r.tool_calls == [ToolCall("call00000", "f", '{"a": [1, "[x]"]}')]


def test_call_id_variant() -> None:
    r = parse(['[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}'])
    assert r.tool_calls == [ToolCall("call00000", "f", '{"x": 1}'), ToolCall("call00001", "g", "{}")]
    assert_stream_matches_final(r)


def test_first_delta_names_the_call_then_arguments_stream() -> None:
    parser = OutputParser(reasoning=False, tools=True, id_factory=counter_ids())
    assert parser.feed("Sure.") == ParsedDelta(content="Sure.")
    assert parser.feed("[TOOL_CALLS]get_weather") == ParsedDelta()
    assert parser.feed("[ARGS]") == ParsedDelta(tool_calls=[ToolCallDelta(0, "call00000", "get_weather", "")])
    assert parser.feed('{"city"') == ParsedDelta(tool_calls=[ToolCallDelta(0, None, None, '{"city"')])
    assert parser.feed(': "Rome"}[TOOL_') == ParsedDelta(tool_calls=[ToolCallDelta(0, None, None, ': "Rome"}')])
    assert parser.feed("CALLS]g[ARGS]{") == ParsedDelta(tool_calls=[ToolCallDelta(1, "call00001", "g", "{")])
    assert parser.feed("}") == ParsedDelta(tool_calls=[ToolCallDelta(1, None, None, "}")])
    assert not parser.finish()
    assert parser.tool_calls == [
        ToolCall("call00000", "get_weather", '{"city": "Rome"}'),
        ToolCall("call00001", "g", "{}"),
    ]


def test_default_ids_are_nine_alphanumerics() -> None:
    parser = OutputParser(reasoning=False, tools=True)
    parser.feed("[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]f[ARGS]{}")
    parser.finish()
    ids = [c.id for c in parser.tool_calls]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in ids)


# -- the exact format mistral-common encodes --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    write_tiny_tekken(path)
    return Tokenizer.from_file(path)


def test_parses_what_mistral_common_encodes(tokenizer: Tokenizer) -> None:
    """Encode an assistant turn with mistral-common, decode it keeping control tokens, parse it back."""
    arguments = {"city": "Paris [FR]", "days": [1, 2], "note": "é ü"}
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "abcdefgh1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(arguments)},
                },
                {"id": "abcdefgh2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "abcdefgh1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "abcdefgh2", "content": "noon"},
    ]
    ids = tokenizer.mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages=messages)).tokens
    start = ids.index(tokenizer.special_id("[/INST]")) + 1
    end = ids.index(tokenizer.eos_id, start)
    # the engine's view: per-token text (complete UTF-8 only) with control tokens as their literal strings
    utf8 = codecs.getincrementaldecoder("utf-8")()
    pieces = [utf8.decode(tokenizer.token_bytes(t)) for t in ids[start:end]]
    r = parse(pieces)
    assert (r.reasoning, r.content) == ("Use the tool.", "Let me check.")
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("get_weather", arguments), ("get_time", {})]
    assert_stream_matches_final(r)


# -- malformed output falls back to content, never raises -------------------------------------------

MALFORMED = [
    "[TOOL_CALLS][ARGS]{}",  # no name
    "[TOOL_CALLS]get weather[ARGS]{}",  # bad name
    "[TOOL_CALLS]" + "f" * 65 + "[ARGS]{}",  # name too long
    "[TOOL_CALLS]f",  # no [ARGS]
    "[TOOL_CALLS]f[CALL_ID]abc",  # no [ARGS] after the call id
    "[TOOL_CALLS]f[THINK]x[ARGS]{}",  # stray marker in the name
    "[TOOL_CALLS]f[TOOL_CALLS]g[ARGS]{}",  # a call without arguments
    "[TOOL_CALLS]f[CALL_ID]a[CALL_ID]b[ARGS]{}",  # two call ids
    '[TOOL_CALLS]f[ARGS]{"a": 1',  # arguments cut short
    "[TOOL_CALLS]f[ARGS]",  # empty arguments
    "[TOOL_CALLS]f[ARGS][1, 2]",  # arguments not an object
    '[TOOL_CALLS]f[ARGS]{"a": 1} trailing words',  # content after a call
    '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]nope',  # the second of two calls is broken
    '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS][ARGS]{}',  # ... structurally
    "[TOOL_CALLS]f[ARGS]" + "[" * 50,  # unclosed nesting
]


@pytest.mark.parametrize("section", MALFORMED)
@pytest.mark.parametrize("prefix", ["", "Some content. ", "[THINK]why[/THINK]Answer: "])
def test_malformed_tool_calls_fall_back_to_raw_content(prefix: str, section: str) -> None:
    for pieces in ([prefix + section], list(prefix + section)):
        r = parse(pieces)
        assert r.tool_calls == [] and r.valid is False
        expected_content = prefix.replace("[THINK]why[/THINK]", "") + section
        assert r.content == expected_content
        assert r.reasoning == ("why" if "[THINK]" in prefix else "")


def test_arguments_too_deep_for_json_fall_back() -> None:
    depth = 100_000
    r = parse(['[TOOL_CALLS]f[ARGS]{"a": ' + "[" * depth + "]" * depth + "}"])  # json.loads: RecursionError
    assert r.tool_calls == [] and r.valid is False and r.content.startswith("[TOOL_CALLS]f[ARGS]")


def test_structural_fallback_streams_raw_text_as_content() -> None:
    r = parse(list("Hi [TOOL_CALLS]bad name[ARGS]{}"))
    assert r.stream_calls == []
    assert_stream_matches_final(r)
    assert r.content == "Hi [TOOL_CALLS]bad name[ARGS]{}"


def test_invalid_arguments_after_streaming_are_reported() -> None:
    r = parse(['[TOOL_CALLS]f[ARGS]{"a": ', "oops"])
    assert r.stream_calls == [ToolCall("call00000", "f", '{"a": oops')]  # already sent, cannot be taken back
    assert r.valid is False and r.tool_calls == []
    assert r.content == '[TOOL_CALLS]f[ARGS]{"a": oops'  # the non-streaming view falls back


def test_tool_markers_are_text_when_tools_are_off() -> None:
    text = 'Calling [TOOL_CALLS]f[ARGS]{"a": 1} now'
    r = parse(list(text), tools=False)
    assert (r.content, r.tool_calls, r.valid) == (text, [], True)
    assert_stream_matches_final(r)


def test_markers_outside_their_place_are_text() -> None:
    r = parse(["a[/THINK]b[ARGS]c[CALL_ID]d"])
    assert r.content == "a[/THINK]b[ARGS]c[CALL_ID]d" and r.reasoning == ""


def test_partial_marker_at_the_end_is_flushed() -> None:
    for tail in ("[", "[TOOL_CALL", "[THI", "[/THINK"):
        r = parse(["text", tail])
        assert r.content == "text" + tail
    r = parse(["[THINK]abc[/THI"])
    assert r.reasoning == "abc[/THI"


def test_feed_after_finish_raises_and_finish_is_idempotent() -> None:
    parser = OutputParser(reasoning=True, tools=True)
    parser.feed("x")
    parser.finish()
    assert parser.finish() == ParsedDelta()
    with pytest.raises(RuntimeError):
        parser.feed("y")


# -- splitting never changes the result -------------------------------------------------------------

SAMPLES = [
    "[THINK]Let me think [about] it.[/THINK]The answer is [4].",
    '[THINK]r[/THINK]c[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}',
    '[TOOL_CALLS]f[ARGS]{"list": ["[TOOL", "CALLS]"]}',
    "plain [TOOL_ text [THINK with [ partial [/THINKING] markers [",
    *MALFORMED,
]


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize("text", SAMPLES)
def test_every_single_split_point(text: str) -> None:
    for reasoning, tools in itertools.product((True, False), repeat=2):
        whole = parse([text], reasoning, tools)
        for i in range(len(text) + 1):
            assert final(parse([text[:i], text[i:]], reasoning, tools)) == final(whole), i


@settings(max_examples=300, deadline=None)
@given(
    text=st.sampled_from(SAMPLES),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=40),
    reasoning=st.booleans(),
    tools=st.booleans(),
)
def test_random_splits_give_the_same_result(text: str, cuts: list[int], reasoning: bool, tools: bool) -> None:
    whole = parse([text], reasoning, tools)
    pieces = parse(split(text, cuts), reasoning, tools)
    assert final(pieces) == final(whole)
    if whole.valid:
        assert_stream_matches_final(pieces)


# Well-formed outputs built from random parts parse back into exactly those parts, with no control
# string in content, however they are split.
plain = st.text(alphabet=st.sampled_from('ab [],{}"é\n/THINKTOOL_CALS'), max_size=30).filter(
    lambda s: not any(m in s for m in MARKERS)
)
names = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)
arguments = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), plain, st.lists(st.booleans())), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    reasoning_text=st.one_of(st.none(), plain),
    content=plain,
    calls=st.lists(st.tuples(names, arguments), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
def test_well_formed_outputs_round_trip(reasoning_text, content, calls, cuts) -> None:
    # Content that could close with a marker prefix at the very end is ambiguous only while streaming.
    text = "" if reasoning_text is None else f"[THINK]{reasoning_text}[/THINK]"
    text += content
    text += "".join(f"[TOOL_CALLS]{name}[ARGS]{json.dumps(args, ensure_ascii=False)}" for name, args in calls)
    r = parse(split(text, cuts))
    assert r.reasoning == (reasoning_text or "")
    assert r.content == content
    assert not any(m in r.content for m in MARKERS)
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [(n, a) for n, a in calls]
    assert r.valid
    assert_stream_matches_final(r)


# -- linear in the output length --------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit",
    ["word ", "[TOOL_CALL", "[[[[[[[[", "[THINK]x[/THINK]", '[TOOL_CALLS]f[ARGS]{"k": "[TOOL_CALLS"}'],
)
def test_linear_in_output_length(unit: str) -> None:
    n = 200_000
    text = (unit * (n // len(unit) + 1))[:n]
    parser = OutputParser(reasoning=True, tools=True)
    for ch in text:
        parser.feed(ch)
    parser.finish()
    longest = max(len(m) for m in MARKERS)
    # each feed scans its own character plus at most (longest marker - 1) held-back ones
    assert parser.scanned_chars <= n * longest
    total = len(parser.content) + len(parser.reasoning_content) + sum(len(c.arguments) for c in parser.tool_calls)
    assert total <= n

    big = OutputParser(reasoning=True, tools=True)
    big.feed(text)
    big.finish()
    assert big.scanned_chars == n  # one feed: every character scanned once


marker_soup = st.lists(
    st.sampled_from([*MARKERS, "[", "]", "f", "get_x", "{", "}", '"a"', ":", "1", " ", "[TOOL_", "CALLS]", "é", "\n"]),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(
    text=marker_soup,
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=30),
    reasoning=st.booleans(),
    tools=st.booleans(),
)
def test_any_output_parses_without_error_and_splits_agree(text, cuts, reasoning, tools) -> None:
    whole = parse([text], reasoning, tools)
    pieces = parse(split(text, cuts), reasoning, tools)
    assert final(pieces) == final(whole)
    # nothing is lost: every character of the output is in exactly one of the final fields (or a marker)
    kept = whole.content + whole.reasoning + "".join(c.name + c.arguments for c in whole.tool_calls)
    assert len(kept) <= len(text)
    if whole.valid:
        assert_stream_matches_final(pieces)
        # an enabled opening marker always opens its block, so it never stays in content
        assert not (tools and TOOL_CALLS in whole.content)
        assert not (reasoning and THINK in whole.content)


# -- output cut by max_tokens -----------------------------------------------------------------------


def _cut(pieces: list[str]) -> tuple[OutputParser, list[ParsedDelta]]:
    parser = OutputParser(reasoning=True, tools=True, id_factory=counter_ids())
    deltas = [parser.feed(p) for p in pieces]
    return parser, [*deltas, parser.finish(truncated=True)]


def test_call_cut_in_its_arguments_stays_a_tool_call() -> None:
    parser, deltas = _cut(["Sure.", TOOL_CALLS, "get_weather[ARGS]", '{"city": "Pa'])
    assert parser.content == "Sure." and "".join(d.content for d in deltas) == "Sure."
    assert parser.tool_calls == [ToolCall("call00000", "get_weather", '{"city": "Pa')]
    assert not parser.tool_calls_valid  # the arguments are not JSON: the client is told by finish_reason "length"


def test_call_cut_in_its_name_is_dropped_not_sent_as_content() -> None:
    parser, deltas = _cut(['[TOOL_CALLS]a[ARGS]{"x": 1}', TOOL_CALLS, "get_wea"])
    assert parser.content == "" and all("[TOOL" not in d.content for d in deltas)
    assert parser.tool_calls == [ToolCall("call00000", "a", '{"x": 1}')]


def test_untruncated_malformed_section_still_falls_back_to_content() -> None:
    parser = OutputParser(reasoning=True, tools=True, id_factory=counter_ids())
    parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa')
    parser.finish()
    assert parser.tool_calls == [] and parser.content.startswith(TOOL_CALLS)
