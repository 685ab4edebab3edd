"""/v1/responses with the openai SDK's ``responses`` API and the OpenAI Agents SDK, unmodified, against the shipped
demo model on loopback: text, instructions, reasoning items, images, structured output, the streaming event
sequence, a function-call round trip, one agent turn, and the store / previous_response_id refusals."""

from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest

from conftest import start_server
from small4.demo_model.curriculum import TOOLS, data_url, shape_image
from small4.weights.embedded import SHIPPED_DEMO_DIR

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def demo():
    s = start_server(SHIPPED_DEMO_DIR)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(demo) -> openai.OpenAI:
    return demo.client()


def _create(client, input, **kw):
    kw.setdefault("max_output_tokens", 48)
    return client.responses.create(model="tiny", input=input, temperature=0, **kw)


def test_text_and_usage(client):
    r = _create(client, "Hello!")
    assert r.object == "response" and r.status == "completed" and not r.store
    assert r.output_text == "Hello! How can I help you today?"
    assert [item.type for item in r.output] == ["message"]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=48, temperature=0
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    again = _create(client, "Hello!")  # the same prompt: its full blocks come from the prefix cache
    assert 0 < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens


def test_message_items_and_instructions(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}]
    assert _create(client, items).output_text == "The capital of France is Paris."
    with_instructions = _create(client, items, instructions="You are terse.")
    assert with_instructions.usage.input_tokens > _create(client, items).usage.input_tokens


def test_reasoning_effort_gives_a_reasoning_item(client):
    r = _create(client, "What is 12 + 7?", reasoning={"effort": "high"}, max_output_tokens=64)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text.startswith("Units:")
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    plain = _create(client, "What is 12 + 7?", reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]
    assert plain.usage.output_tokens_details.reasoning_tokens == 0
    # the reasoning item sent back as input renders like reasoning_content does
    history = [{"role": "user", "content": "What is 12 + 7?"}, *[i.model_dump(exclude_unset=True) for i in r.output]]
    follow = _create(client, [*history, {"role": "user", "content": "Hello!"}])
    assert follow.status == "completed"


def test_image_input(client):
    url = data_url(shape_image("red", "circle", random.Random(7)))
    content = [
        {"type": "input_image", "image_url": url, "detail": "auto"},
        {"type": "input_text", "text": "What is in this image?"},
    ]
    assert _create(client, [{"role": "user", "content": content}]).output_text.startswith("A red ")


def test_structured_text_format(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}}
    r = _create(client, "What is 12 + 7?", text=fmt)
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"answer"}


def test_stream_event_sequence(client):
    events = list(
        client.responses.create(
            model="tiny",
            input="What is 12 + 7?",
            reasoning={"effort": "high"},
            temperature=0,
            max_output_tokens=128,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    per_item = [
        "response.output_item.added",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert [k for k in kinds if k in per_item] == per_item * 2  # a reasoning item, then a message item
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output[0].content[0].text == reasoning and final.output_text == text
    full = _create(client, "What is 12 + 7?", reasoning={"effort": "high"}, max_output_tokens=128)
    assert full.output_text == text and full.usage.output_tokens == final.usage.output_tokens


def test_stream_cut_by_max_output_tokens_is_incomplete(client):
    events = list(
        client.responses.create(model="tiny", input="Hello!", temperature=0, max_output_tokens=3, stream=True)
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_function_call_round_trip(client):
    r = _create(client, "What is the weather in Paris?", tools=FLAT_TOOLS)
    calls = [item for item in r.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    streamed = list(
        client.responses.create(
            model="tiny",
            input="What is the weather in Paris?",
            tools=FLAT_TOOLS,
            temperature=0,
            max_output_tokens=48,
            stream=True,
        )
    )
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    result = json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})
    follow = [
        {"role": "user", "content": "What is the weather in Paris?"},
        *[item.model_dump(exclude_unset=True) for item in r.output],
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": result},
    ]
    assert _create(client, follow, tools=FLAT_TOOLS).output_text == "It is sunny and 21°C in Paris."


def test_tool_choice(client):
    forced = _create(client, "Hello!", tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "calculator"})
    assert [item.type for item in forced.output] == ["function_call"] and forced.output[0].name == "calculator"
    assert forced.status == "completed" and list(json.loads(forced.output[0].arguments)) == ["expression"]
    free = _create(client, "Hello!", tools=FLAT_TOOLS, tool_choice="none")
    assert free.output_text == "Hello! How can I help you today?"


def test_agents_sdk_runs_one_turn(demo):
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city"""
        seen.append(city)
        return json.dumps({"city": city, "condition": "snowy", "temperature_c": -3})

    client = openai.AsyncOpenAI(base_url=f"{demo.base_url}/v1", api_key="unused", max_retries=0)
    model = OpenAIResponsesModel(model="tiny", openai_client=client)
    agent = Agent(name="weather", model=model, tools=[get_weather])

    async def both():
        result = await Runner.run(agent, "What is the weather in Oslo?", max_turns=3)
        run = Runner.run_streamed(agent, "What is the weather in Lima?", max_turns=3)  # over the event stream
        kinds = [event.type async for event in run.stream_events()]
        return result.final_output, run.final_output, kinds

    final, streamed, kinds = asyncio.run(both())  # one loop: the async client's connections belong to it
    assert seen == ["Oslo", "Lima"] and "raw_response_event" in kinds
    assert final == "It is snowy and -3°C in Oslo." and streamed == "It is snowy and -3°C in Lima."


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"store": True}, "never stored"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "only 'function'"),
        ({"reasoning": {"effort": "high", "summary": "detailed"}}, "returned whole"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
    ],
)
def test_unsupported_requests_are_400s(client, kw, match):
    with pytest.raises(openai.BadRequestError, match=match):
        _create(client, "Hello!", **kw)
