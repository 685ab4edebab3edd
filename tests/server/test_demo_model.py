"""The shipped trained demo model through the real server and the openai client.

The shipped model is the v2 one (issue 17); its held-out numbers are in the README and in
small4/demo_model/checkpoint/training_log.json (``heldout_v2``). These cases are the demo's own showcase (greetings,
capitals, the calculator / get_weather tools, colours, two-digit arithmetic, echo) with fresh seeds. The thresholds
sit well below what was measured on the cases here; the tests fail if the prompt rendering (the model would see a
format it was not trained on), the output parser (reasoning_content, tool_calls) or the image path is broken. Shapes
are not asserted: on some image sets they are near chance.
"""

from __future__ import annotations

import json
import random

import pytest

from conftest import start_server
from small4.demo_model.curriculum import CAPITALS, COLOURS, SHAPES, TOOLS, data_url, shape_image
from small4.weights.embedded import SHIPPED_DEMO_DIR, embedded_model_dir


@pytest.fixture(scope="module")
def demo():
    assert embedded_model_dir() == SHIPPED_DEMO_DIR
    s = start_server(SHIPPED_DEMO_DIR)
    yield s.client()
    s.stop()


def _ask(client, content, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=48, temperature=0, **kw
    )


def test_greetings_and_capitals(demo):
    assert _ask(demo, "Hello!").choices[0].message.content == "Hello! How can I help you today?"
    assert "small4" in _ask(demo, "Who are you?").choices[0].message.content
    right = sum(
        _ask(demo, f"What is the capital of {country}?").choices[0].message.content
        == f"The capital of {country} is {city}."
        for country, city in CAPITALS.items()
    )
    assert right >= 8, right


def test_reasoning_effort_controls_thinking(demo):
    high = _ask(demo, "What is 12 + 7?", reasoning_effort="high").choices[0].message
    none = _ask(demo, "What is 12 + 7?", reasoning_effort="none").choices[0].message
    assert getattr(high, "reasoning_content", None)
    assert not getattr(none, "reasoning_content", None) and none.content


def test_tool_call_round_trip(demo):
    calls_ok = 0
    for city in ("Paris", "Tokyo", "Oslo", "Lima", "Rome"):
        r = _ask(demo, f"What is the weather in {city}?", tools=TOOLS)
        calls = r.choices[0].message.tool_calls or []
        if calls:
            assert r.choices[0].finish_reason == "tool_calls"
            args = json.loads(calls[0].function.arguments)  # always valid JSON, even when the values are wrong
            calls_ok += calls[0].function.name == "get_weather" and args == {"city": city}
    assert calls_ok >= 4, calls_ok
    # the answer after the tool result reads the result: two different results give two different answers
    for city, condition, temp in (("Paris", "sunny", 21), ("Oslo", "snowy", -3)):
        call = {
            "id": "abcdefghi",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        history = [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": "abcdefghi",
                "content": json.dumps({"city": city, "condition": condition, "temperature_c": temp}),
            },
        ]
        final = demo.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=48, temperature=0)
        assert final.choices[0].finish_reason == "stop"
        assert final.choices[0].message.content == f"It is {condition} and {temp}°C in {city}."


def test_names_colours_of_unseen_images(demo):
    rng = random.Random(4242)  # not a training or evaluation seed
    cases = [(colour, rng.choice(SHAPES)) for colour in COLOURS for _ in range(2)]
    right = 0
    for colour, shape in cases:
        url = data_url(shape_image(colour, shape, rng))
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this image?"}]
        answer = _ask(demo, content).choices[0].message.content
        right += answer.startswith(f"A {colour} ")
    assert right >= 10, right  # measured 12 of 12


def test_arithmetic_and_copying(demo):
    """Two-digit sums and differences, with and without a [THINK] trace, and repeating values back: the skills that
    need the model to copy numbers from the prompt."""
    rng = random.Random(31337)  # not a training or evaluation seed
    right = {"none": 0, "high": 0}
    for i in range(16):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = "+" if i % 2 == 0 else "-"
        a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
        effort = "high" if i % 4 < 2 else "none"
        msg = _ask(demo, f"What is {a} {op} {b}?", reasoning_effort=effort).choices[0].message
        if effort == "high":
            assert (getattr(msg, "reasoning_content", None) or "").startswith("Units:")
        right[effort] += msg.content == f"{a} {op} {b} = {a + b if op == '+' else a - b}."
    echoed = 0
    for _ in range(8):
        phrase = f"{rng.randint(100, 999)} {rng.choice(SHAPES)}"
        echoed += _ask(demo, f"Repeat after me: {phrase}").choices[0].message.content == phrase
    assert right["none"] + right["high"] >= 3, right  # measured 6 of 16 on these unseen problems
    assert echoed >= 5, echoed  # measured 8 of 8
