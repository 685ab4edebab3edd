"""`small4 demo`: the README's main job. Starts `small4 serve` on the embedded tiny model, talks to it with the
official openai client (chat, streaming, a tool call, JSON output, a text completion), then stops it with SIGTERM.
It serves with ``--profile latency``, so the answers come through speculative decoding with the demo model's own
EAGLE draft (greedy answers are those of plain decoding); the last line is what the draft achieved.

The embedded model is the tiny trained demo model (2M parameters): it greets, knows a few capitals, thinks when
asked, calls tools and uses their results, and names the colour of shapes in images; it has not learned arithmetic
(see small4/demo_model/checkpoint/training_log.json).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import openai

from small4.server.health import wait_healthy

DEMO_MODEL = "small4-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(client: openai.OpenAI, content, **kw):
    return client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": content}], max_tokens=64, temperature=0, **kw
    )


def _talk(client: openai.OpenAI) -> None:
    from small4.demo_model.curriculum import TOOLS, data_url, shape_image

    print(f"chat:        {_ask(client, 'Hello!').choices[0].message.content!r}")
    print(f"chat:        {_ask(client, 'What is the capital of Japan?').choices[0].message.content!r}")
    msg = _ask(client, "What is 34 + 25?", reasoning_effort="high").choices[0].message
    print(f"reasoning:   [THINK] {getattr(msg, 'reasoning_content', None)!r} -> {msg.content!r}")
    stream = client.chat.completions.create(
        model=DEMO_MODEL,
        max_tokens=32,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "Who are you?"}],
    )
    print(f"streamed:    {''.join(c.choices[0].delta.content or '' for c in stream if c.choices)!r}")
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=DEMO_MODEL, messages=question, tools=TOOLS, max_tokens=64, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    print(f"tool call:   {call.function.name}({call.function.arguments})  finish_reason={r.choices[0].finish_reason}")
    result = json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})
    history = question + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    r = client.chat.completions.create(model=DEMO_MODEL, messages=history, tools=TOOLS, max_tokens=64, temperature=0)
    print(f"tool result: {result} -> {r.choices[0].message.content!r}")
    import random

    url = data_url(shape_image("blue", "circle", random.Random(7)))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this image?"}]
    print(f"image:       (a blue circle) -> {_ask(client, content).choices[0].message.content!r}")
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 24}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = _ask(
        client,
        "Answer in JSON.",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    print(f"json schema: {json.loads(r.choices[0].message.content)}")


def _speculation(base: str) -> str:
    """What the draft did over the demo's requests, read from the server's /metrics."""
    wanted = ("small4_spec_verify_steps_total", "small4_spec_acceptance_rate", "small4_spec_mean_accepted_length")
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    if not values.get("small4_spec_verify_steps_total"):
        return "off"
    return (
        f"{values['small4_spec_verify_steps_total']:.0f} verify steps, acceptance "
        f"{values['small4_spec_acceptance_rate']:.2f}, {values['small4_spec_mean_accepted_length']:.2f} tokens per step"
    )


def main() -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # the latency profile: the embedded model speculates with its shipped EAGLE draft (greedy answers unchanged)
    proc = subprocess.Popen([sys.executable, "-m", "small4.cli", "serve", "--port", str(port), "--profile", "latency"])
    try:
        wait_healthy(base, alive=lambda: proc.poll() is None)
        print(f"small4 is serving the embedded tiny model on {base}")
        _talk(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0))
        print(f"speculative: {_speculation(base)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"server stopped with exit code {code}")
    return code
