"""`small4 demo`: the README's main job. Starts `small4 serve` on the embedded tiny model, talks to it with the
official openai client (chat, streaming, a tool call, JSON output, a text completion), then stops it with SIGTERM.

The embedded model has random weights, so the words are gibberish; what the demo shows is the whole path working:
mistral-common rendering, the engine, grammar-constrained tool calls and JSON, parsing, streaming, shutdown.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy in time")


def _talk(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    r = client.chat.completions.create(model="small4-tiny", messages=messages, max_tokens=24, temperature=0)
    print(f"chat:       {r.choices[0].message.content!r}  usage={r.usage.model_dump()}")
    stream = client.chat.completions.create(
        model="small4-tiny", messages=messages, max_tokens=24, stream=True, reasoning_effort="high", seed=1
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(f"streamed:   {text!r}")
    r = client.chat.completions.create(
        model="small4-tiny",
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=128,
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        temperature=0,
    )
    call = r.choices[0].message.tool_calls[0]
    print(f"tool call:  {call.function.name}({call.function.arguments})  finish_reason={r.choices[0].finish_reason}")
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 24}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="small4-tiny",
        max_tokens=64,
        temperature=0,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    print(f"json:       {json.loads(r.choices[0].message.content)}")
    r = client.completions.create(model="small4-tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    print(f"completion: {r.choices[0].text!r}")


def main() -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "small4.cli", "serve", "--port", str(port)])
    try:
        _wait_healthy(base, proc)
        print(f"small4 is serving the embedded tiny model on {base}")
        _talk(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"server stopped with exit code {code}")
    return code
