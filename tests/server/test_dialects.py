"""Both chat dialects (chat/dialect.py) with the official clients, unmodified, against a real small4 server (the
shipped demo model) on loopback. The mistralai SDK: complete, stream, random_seed, tool_choice "any", reasoning as
thinking chunks, prefix continuation, safe_prompt and prompt_mode, /v1/models capabilities. The openai SDK:
reasoning_content with its reasoning alias, usage details, max_completion_tokens, parallel_tool_calls, tool names
held to the offered tools under tool_choice auto, streaming in every mode."""

from __future__ import annotations

import json

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from conftest import start_server
from small4.demo_model.curriculum import TOOLS
from small4.weights.embedded import SHIPPED_DEMO_DIR


@pytest.fixture(scope="module")
def demo():
    s = start_server(SHIPPED_DEMO_DIR)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(demo) -> Mistral:
    return Mistral(api_key="unused", server_url=demo.base_url)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _thinking_and_text(content) -> tuple[str, str]:
    """The SDK's view of a Mistral answer: (thinking text, answer text)."""
    if isinstance(content, str):
        return "", content
    thinking = "".join(t.text for c in content if c.type == "thinking" for t in c.thinking)
    text = "".join(c.text for c in content if c.type == "text")
    return thinking, text


def test_complete_and_stream_agree(client):
    r = client.chat.complete(model="tiny", messages=_user("Hello!"), max_tokens=32, temperature=0)
    assert r.choices[0].message.content == "Hello! How can I help you today?"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    events = list(client.chat.stream(model="tiny", messages=_user("Hello!"), max_tokens=32, temperature=0))
    text = "".join(e.data.choices[0].delta.content or "" for e in events if e.data.choices)
    assert text == r.choices[0].message.content
    assert events[-1].data.usage.completion_tokens == r.usage.completion_tokens  # usage always in the last chunk
    assert [e.data.choices[0].finish_reason for e in events if e.data.choices][-1] == "stop"


def test_random_seed_reproduces(client):
    def ask(seed: int) -> str:
        r = client.chat.complete(
            model="tiny", messages=_user("Tell me something."), max_tokens=16, temperature=1.5, random_seed=seed
        )
        return r.choices[0].message.content

    first = ask(1234)
    assert ask(1234) == first
    assert len({ask(s) for s in range(5)}) > 1  # the seed is used: different seeds sample differently


def test_tool_choice_any_forces_a_call(client):
    """The demo model answers "Hello!" with text; "any" forces a call of an offered tool. A call the model closes
    ends with finish_reason tool_calls and JSON arguments; one that max_tokens cuts (v1's ran on) still comes back
    as a tool call, never as control text in content."""
    names = {t["function"]["name"] for t in TOOLS}
    free = client.chat.complete(model="tiny", messages=_user("Hello!"), tools=TOOLS, max_tokens=48, temperature=0)
    assert free.choices[0].message.content == "Hello! How can I help you today?"
    r = client.chat.complete(
        model="tiny", messages=_user("Hello!"), tools=TOOLS, tool_choice="any", max_tokens=24, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "tool_calls") and choice.message.content is None
    assert [c.function.name in names for c in choice.message.tool_calls] == [True]
    arguments = choice.message.tool_calls[0].function.arguments
    assert arguments.startswith('{"')
    if choice.finish_reason == "tool_calls":
        assert isinstance(json.loads(arguments), dict)


def test_tool_call_streams_whole_calls(client):
    events = list(
        client.chat.stream(
            model="tiny", messages=_user("What is the weather in Paris?"), tools=TOOLS, max_tokens=48, temperature=0
        )
    )
    calls = [t for e in events if e.data.choices for t in (e.data.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [e.data.choices[0].finish_reason for e in events if e.data.choices][-1] == "tool_calls"


def test_reasoning_comes_as_thinking_chunks(client):
    r = client.chat.complete(
        model="tiny", messages=_user("What is 12 + 7?"), reasoning_effort="high", max_tokens=64, temperature=0
    )
    thinking, text = _thinking_and_text(r.choices[0].message.content)
    assert thinking.startswith("Units:") and text
    assert r.usage.completion_tokens_details["reasoning_tokens"] > 0  # extras the SDK keeps
    events = client.chat.stream(
        model="tiny", messages=_user("What is 12 + 7?"), reasoning_effort="high", max_tokens=64, temperature=0
    )
    streamed = [_thinking_and_text(e.data.choices[0].delta.content or "") for e in events if e.data.choices]
    assert "".join(t for t, _ in streamed) == thinking and "".join(x for _, x in streamed) == text


def test_history_with_thinking_chunks_renders_like_reasoning_content(demo, client):
    thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": "Units: 2 + 7 = 9."}]}]
    history = [
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": [*thinking, {"type": "text", "text": "12 + 7 = 19."}]},
        {"role": "user", "content": "Hello!"},
    ]
    as_openai = [history[0], {**history[1], "content": "12 + 7 = 19.", "reasoning_content": "Units: 2 + 7 = 9."}]
    r = client.chat.complete(model="tiny", messages=history, max_tokens=8, temperature=0)
    o = demo.client().chat.completions.create(
        model="tiny", messages=[*as_openai, history[2]], max_tokens=8, temperature=0
    )
    assert r.usage.prompt_tokens == o.usage.prompt_tokens
    assert r.choices[0].message.content == o.choices[0].message.content


def test_prefix_continues_the_answer(client):
    messages = [*_user("What is the capital of France?"), {"role": "assistant", "content": "The", "prefix": True}]
    r = client.chat.complete(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."  # the prefix comes back too
    events = client.chat.stream(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert (
        "".join(e.data.choices[0].delta.content or "" for e in events if e.data.choices) == r.choices[0].message.content
    )


def test_safe_prompt_and_prompt_mode(client):
    plain = client.chat.complete(model="tiny", messages=_user("Hello!"), max_tokens=4, temperature=0)
    safe = client.chat.complete(model="tiny", messages=_user("Hello!"), max_tokens=4, temperature=0, safe_prompt=True)
    assert safe.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the guardrail text is in the prompt
    with pytest.raises(SDKError) as info:
        client.chat.complete(model="tiny", messages=_user("Hello!"), max_tokens=4, prompt_mode="reasoning")
    assert info.value.status_code == 400 and "reasoning_effort" in info.value.body


def test_models_list_capabilities(demo, client):
    card = client.models.list().data[0]
    assert card.id == "tiny"
    assert card.capabilities.completion_chat and card.capabilities.function_calling
    assert card.capabilities.vision and card.capabilities.reasoning
    assert card.max_context_length == demo.ctx.limits.max_model_len
    raw = httpx.get(f"{demo.base_url}/v1/models").json()["data"][0]
    assert raw["object"] == "model" and raw["max_model_len"] == card.max_context_length  # OpenAI/vLLM fields too


# ---- the OpenAI dialect -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(demo):
    return demo.client()


def _ask(client, text: str, **kw):
    return client.chat.completions.create(model="tiny", messages=_user(text), temperature=0, **kw)


def test_openai_reasoning_fields_and_usage_details(openai_client):
    high = _ask(openai_client, "What is 12 + 7?", reasoning_effort="high", max_tokens=64)
    message = high.choices[0].message
    assert message.reasoning_content.startswith("Units:") and message.reasoning == message.reasoning_content
    assert 0 < high.usage.completion_tokens_details.reasoning_tokens < high.usage.completion_tokens
    none = _ask(openai_client, "What is 12 + 7?", reasoning_effort="none", max_tokens=64)
    assert none.usage.completion_tokens_details.reasoning_tokens == 0
    # the same prompt again: its full blocks come from the prefix cache
    again = _ask(openai_client, "What is 12 + 7?", reasoning_effort="none", max_tokens=64)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    assert again.choices[0].message.content == none.choices[0].message.content


def test_max_completion_tokens(openai_client):
    r = _ask(openai_client, "What is 12 + 7?", reasoning_effort="high", max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def _tool_calls_bias(demo, extra: dict[int, float] | None = None) -> dict[str, float]:
    """A logit bias that makes the model open tool calls wherever the grammar lets it."""
    tool_calls = demo.ctx.tokenizer.special_id("[TOOL_CALLS]")
    return {str(tool_calls): 100.0, **{str(t): v for t, v in (extra or {}).items()}}


def test_parallel_tool_calls_false_allows_one_call(demo, openai_client):
    kw = {"tools": TOOLS, "max_tokens": 40, "logit_bias": _tool_calls_bias(demo)}
    many = _ask(openai_client, "What is the weather in Paris?", **kw)
    one = _ask(openai_client, "What is the weather in Paris?", parallel_tool_calls=False, **kw)
    assert len(many.choices[0].message.tool_calls) >= 2  # the bias opens call after call ...
    assert one.choices[0].finish_reason == "tool_calls"  # ... unless only one is allowed
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_auto_tool_names_are_held_to_the_offered_tools(demo, openai_client):
    """The logits pushed toward [TOOL_CALLS] and toward the pieces of names that were never offered: the call that
    comes back still names an offered tool, with arguments of its schema (the triggered grammar)."""
    tok = demo.ctx.tokenizer
    wrong = {t: 30.0 for word in ("culator", "city", "weather_now", "xyz") for t in tok.encode(word, bos=False)}
    r = _ask(openai_client, "Hello!", tools=TOOLS, max_tokens=48, logit_bias=_tool_calls_bias(demo, wrong))
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].message.content is None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.function.name in schemas
        if r.choices[0].finish_reason == "tool_calls":
            assert set(json.loads(call.function.arguments)) <= set(schemas[call.function.name]["properties"])


def _collect_stream(client, text: str, **kw):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=_user(text),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(t.index, {"name": "", "arguments": ""})
            entry["name"] += t.function.name or ""
            entry["arguments"] += t.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return content, reasoning, list(calls.values()), finish, chunks[-1].usage


@pytest.mark.parametrize(
    ("text", "kw"),
    [
        ("What is 12 + 7?", {"reasoning_effort": "high"}),
        ("What is the weather in Paris?", {"tools": TOOLS}),
        ("Hello!", {"tools": TOOLS, "tool_choice": "required"}),
        (
            "What is the weather in Oslo?",
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        ("Hello!", {"tools": TOOLS, "tool_choice": "none"}),
        ("Hello!", {"response_format": {"type": "json_object"}}),
    ],
)
def test_streaming_equals_non_streaming_in_every_mode(openai_client, text, kw):
    full = _ask(openai_client, text, max_tokens=40, **kw)
    content, reasoning, calls, finish, usage = _collect_stream(openai_client, text, max_tokens=40, **kw)
    message = full.choices[0].message
    assert content == (message.content or "")
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
    assert finish == [full.choices[0].finish_reason]
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == full.usage.completion_tokens_details.reasoning_tokens


def test_min_tokens_defers_stop_strings(openai_client):
    stopped = _ask(openai_client, "Hello!", max_tokens=32, stop=["!"])
    assert stopped.choices[0].message.content == "Hello" and stopped.choices[0].finish_reason == "stop"
    # the token that completes "!" (the 4th with v1's tokenizer: "H", "ell", "o", "!"), from the reply's own tokens
    tokens = [t.token for t in _ask(openai_client, "Hello!", max_tokens=32, logprobs=True).choices[0].logprobs.content]
    bang = next(i for i in range(1, len(tokens) + 1) if "!" in "".join(tokens[:i]))
    # a stop string ending at the min_tokens-th token counts (vLLM)
    at = _ask(openai_client, "Hello!", max_tokens=32, stop=["!"], extra_body={"min_tokens": bang})
    assert at.choices[0].message.content == "Hello"
    deferred = _ask(openai_client, "Hello!", max_tokens=32, stop=["!"], extra_body={"min_tokens": bang + 1})
    assert deferred.choices[0].message.content == "Hello! How can I help you today?"
