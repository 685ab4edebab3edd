"""The official openai client against a real small4 server on loopback: chat, streaming, n, logprobs,
reasoning_effort, tools, structured output, completions, and usage equal to mistral-common's own count."""

from __future__ import annotations

import json

import openai
import pytest
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest

from small4.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


def _mistral_count(model_dir, effort: str | None = None) -> int:
    tok = Tokenizer.from_file(model_dir).mistral
    req = MistralRequest(
        messages=[SystemMessage(content="You are terse."), UserMessage(content="Say hello.")], reasoning_effort=effort
    )
    return len(tok.encode_chat_completion(req).tokens)


def test_chat_non_streaming_usage_matches_mistral_common(server, tiny_model_dir):
    r = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens == _mistral_count(tiny_model_dir)
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(server):
    client = server.client()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (full.choices[0].message.content or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_and_logprobs(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, n=3, seed=5, temperature=1.0, logprobs=True, top_logprobs=4
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        entries = c.logprobs.content
        assert 1 <= len(entries) <= 6
        for e in entries:
            assert e.logprob <= 0 and len(e.top_logprobs) == 4
            assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_reasoning_effort(server, tiny_model_dir):
    client = server.client()
    high = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, reasoning_effort="high")
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, reasoning_effort="none")
    assert high.usage.prompt_tokens == _mistral_count(tiny_model_dir, "high")
    assert none.usage.prompt_tokens == _mistral_count(tiny_model_dir, "none")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, reasoning_effort="medium")
    body = err.value.response.json()["error"]
    assert "none" in body["message"] and "high" in body["message"]


def test_tool_choice_required_gives_valid_calls(server):
    r = server.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Add 2 and 3"}],
        tools=[WEATHER, CALC],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "add")
        if call.function.name == "add":
            assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
        else:
            assert set(args) == {"city"} and isinstance(args["city"], str)
        assert len(call.id) == 9


def test_tool_choice_named_and_round_trip(server):
    client = server.client()
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CALC],
        max_tokens=120,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": calls[0].function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21C"},
    ]
    follow = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], max_tokens=5, tool_choice="none"
    )
    assert follow.choices[0].message.tool_calls is None


def test_tool_choice_none_and_auto(server):
    client = server.client()
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=10, temperature=0
    )
    assert r.choices[0].message.tool_calls is None
    auto = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="auto", max_tokens=10, temperature=0
    )
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_calls_stream(server):
    chunks = list(
        server.client().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Add 2 and 3"}],
            tools=[CALC],
            tool_choice="required",
            max_tokens=120,
            temperature=0,
            stream=True,
        )
    )
    calls: dict[int, dict] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = t.id or entry["id"]
            entry["name"] += t.function.name or ""
            entry["arguments"] += t.function.arguments or ""
    assert calls and all(v["name"] == "add" and v["id"] for v in calls.values())
    for v in calls.values():
        assert set(json.loads(v["arguments"])) == {"a", "b"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_json_schema_output_validates(server):
    # bounded values: a random-weight model would otherwise write one endless string or number
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = server.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A person, as JSON."}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"name", "age"} and isinstance(data["name"], str) and isinstance(data["age"], int)
    assert r.choices[0].finish_reason == "stop"


def test_json_object_output_parses(server, tiny_model_dir):
    # a random model never closes an unconstrained object by itself: favour "}" so the grammar's end is reached
    close = Tokenizer.from_file(tiny_model_dir).encode("}", bos=False)[0]
    r = server.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Anything, as JSON."}],
        max_tokens=200,
        temperature=0.7,
        seed=3,
        response_format={"type": "json_object"},
        logit_bias={str(close): 30},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_invalid_schema_is_400(server):
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )


def test_completions_text_and_token_ids(server, tiny_model_dir):
    client = server.client()
    tok = Tokenizer.from_file(tiny_model_dir)
    ids = tok.encode("The quick brown fox", bos=True)
    by_text = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    lp = by_ids.choices[0].logprobs
    assert len(lp.tokens) == by_ids.usage.completion_tokens and all(len(t) == 2 for t in lp.top_logprobs)
    echoed = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith("The quick brown fox")
    several = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_completions_stream(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text


def test_stop_strings_through_the_server(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, temperature=0).choices[0]
    stop = full.text[5:8]
    cut = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_vllm_extensions(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(
        model="tiny",
        prompt="Hi",
        max_tokens=5,
        temperature=0.8,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "min_tokens": 5,
            "ignore_eos": True,
            "stop_token_ids": [2],
        },
    )
    assert r.usage.completion_tokens == 5


def test_no_special_token_text_leaks_into_content(server):
    """The random model often samples special tokens; only the parser's control tokens may reach it as text."""
    r = server.client().chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=64,
        temperature=1.0,
        seed=4,
        n=4,
        reasoning_effort="high",
        tools=[WEATHER],
    )
    for c in r.choices:
        text = (c.message.content or "") + (getattr(c.message, "reasoning_content", None) or "")
        assert "<SPECIAL_" not in text and "</s>" not in text and "[INST]" not in text
