"""The engine core in its own process (``--engine-process separate``): the wire schema, the same answers as the
in-process engine through the openai client, aborts, and the process lifecycle (core death -> the server exits
non-zero; SIGTERM drains; no orphan core)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import torch
from PIL import Image

from conftest import free_port, start_server, wait_healthy
from small4.core import messages as m
from small4.engine.async_engine import EngineStats
from small4.engine.multimodal import ImageInput
from small4.engine.outputs import RequestOutput
from small4.engine.sampler import TokenLogprobs
from small4.engine.sampling_params import SamplingParams
from small4.engine.token_mask import GrammarSpec
from small4.server.serve import CORE_DIED_EXIT_CODE

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
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


# ---- the wire schema --------------------------------------------------------------------------------------------
def test_messages_round_trip():
    params = SamplingParams(
        n=2, temperature=0.7, stop=("x", "yz"), stop_token_ids=(5,), logit_bias={3: -1.5}, seed=-(2**63),
        max_tokens=9, logprobs=2, kept_special_token_ids=(10, 11),
    )  # fmt: skip
    pixels = torch.randn(3, 28, 56)
    add = m.AddRequest("r1", [1, 2, 3], params, GrammarSpec("start: x", triggered=True), [None, b"h", None],
                       [ImageInput(pixels, b"hash")])  # fmt: skip
    back = m.decode(m.encode(add))
    assert isinstance(back, m.AddRequest) and back.params == params and back.grammar == add.grammar
    assert back.prompt_token_ids == [1, 2, 3] and back.block_hash_extras == [None, b"h", None]
    assert torch.equal(back.images[0].pixels, pixels) and back.images[0].content_hash == b"hash"
    out = RequestOutput("r1", 1, [4, 5], "ab", True, "stop", "yz", [TokenLogprobs(4, -0.5, 1, [(4, -0.5), (7, -2.0)])],
                        3, 2, 1)  # fmt: skip
    batch = m.StepBatch(["r1"], [m.Rejection("r2", "value", "no")], [out], [m.StepFailure(["r3"], "boom")],
                        EngineStats(1, 2, 0.5, 0.25, 3, 4, 5))  # fmt: skip
    assert m.decode(m.encode(batch)) == batch
    for msg in (m.Abort("r1"), m.AbortAll(), m.Stop(True), m.Ready(7, 64, 4, 1024), m.CoreExit("died"), m.CoreExit()):
        assert m.decode(m.encode(msg)) == msg


def _wire(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _add_map(**override) -> dict:
    raw = msgpack.unpackb(m.encode(m.AddRequest("r", [1, 2], SamplingParams())), strict_map_key=False)
    return {**raw, **override}


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\xc1garbage", "msgpack"),
        (msgpack.packb([1, 2]), "map"),
        (_wire(v=99, op="abort", request_id="r"), "version"),
        (_wire(v=m.WIRE_VERSION, op="exec", request_id="r"), "unknown op"),
        (_wire(v=m.WIRE_VERSION, op="abort"), "request_id"),
        (_wire(v=m.WIRE_VERSION, op="abort", request_id=3), "must be str"),
        (_wire(v=m.WIRE_VERSION, op="abort", request_id="r", extra=1), "unknown fields"),
        (msgpack.packb(_add_map(prompt_token_ids=["a"])), "must be int"),
        (msgpack.packb(_add_map(params={"temperature": -1.0})), "temperature"),
        (msgpack.packb(_add_map(params={"__class__": "os.system"})), "unknown fields"),
        (
            msgpack.packb(
                _add_map(images=[{"data": b"\0" * 7, "dtype": "float32", "shape": [3, 2, 2], "content_hash": b""}])
            ),
            "do not hold",
        ),
        (
            msgpack.packb(
                _add_map(images=[{"data": b"\0" * 8, "dtype": "object", "shape": [1, 1, 1], "content_hash": b""}])
            ),
            "dtype",
        ),
    ],
)
def test_malformed_messages_are_rejected(data, why):
    with pytest.raises(m.MessageError, match=why):
        m.decode(data)


# ---- through the server, against the in-process engine ----------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    inline = start_server(tiny_model_dir)
    # the core overlaps its steps (async scheduling): it must answer exactly as the inline synchronous engine
    separate = start_server(tiny_model_dir, "--engine-process", "separate", "--async-scheduling")
    yield inline, separate
    separate.stop()
    inline.stop()
    assert separate.ctx.engine.process.poll() == 0  # the core drained and exited by itself


def _png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 42), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REQUESTS = {
    "chat": dict(messages=[{"role": "user", "content": "Say hello."}], max_tokens=12),
    "n2_logprobs": dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=6, n=2, logprobs=True, top_logprobs=2),
    "image": dict(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What?"},
                    {"type": "image_url", "image_url": {"url": _png((255, 0, 0))}},
                ],
            }
        ],
        max_tokens=8,
    ),  # fmt: skip
    "json_schema": dict(
        messages=[{"role": "user", "content": "A person, as JSON."}],
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    ),
    "tools": dict(
        messages=[{"role": "user", "content": "Add 2 and 3"}], tools=[CALC], tool_choice="required", max_tokens=120
    ),
}


def _choices(response) -> list[dict]:
    """The choices with the random tool-call ids left out."""
    choices = [c.model_dump() for c in response.choices]
    for c in choices:
        for call in c["message"].get("tool_calls") or []:
            call.pop("id")
    return choices


@pytest.mark.parametrize("name", list(REQUESTS))
def test_separate_core_answers_as_the_inline_engine(servers, name):
    inline, separate = servers
    body = dict(model="tiny", temperature=0, **REQUESTS[name])
    want = inline.client().chat.completions.create(**body)
    got = separate.client().chat.completions.create(**body)
    assert _choices(got) == _choices(want)
    assert got.usage == want.usage
    if name == "json_schema":
        assert set(json.loads(got.choices[0].message.content)) == {"name", "age"}
    if name == "tools":
        assert got.choices[0].finish_reason == "tool_calls"
        assert set(json.loads(got.choices[0].message.tool_calls[0].function.arguments)) == {"a", "b"}


def test_separate_stream_equals_non_stream(servers):
    _, separate = servers
    body = dict(model="tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=10, temperature=0)
    client = separate.client()
    whole = client.chat.completions.create(**body).choices[0].message.content
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_disconnect_aborts_in_the_core(servers):
    _, separate = servers
    body = {"prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{separate.base_url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    engine = separate.ctx.engine
    assert engine.num_running == 1 or engine.generation_tokens_total > 0
    deadline = time.monotonic() + 20
    while engine.stats.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0.0
    assert engine.generation_tokens_total < 2000


# ---- the process lifecycle --------------------------------------------------------------------------------------
def _serve(model_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "small4.cli", "serve", str(model_dir), "--port", str(port), "--block-size", "4"]
    cmd += ["--kv-cache-memory", "8MiB", "--enforce-eager", "--engine-process", "separate", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _core_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    cores = [int(c) for c in children if b"small4.core.process" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, children
    return cores[0]


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by its parent
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_and_reaps_the_core(tiny_model_dir):
    port = free_port()
    proc = _serve(tiny_model_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout_s=180)
        core = _core_pid(proc.pid)
        body = {"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        assert _gone(core, 5)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_core_death_fails_streams_and_exits_non_zero(tiny_model_dir):
    port = free_port()
    proc = _serve(tiny_model_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout_s=180)
        body = {"prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 2:
                        killed = time.monotonic()
                        os.kill(_core_pid(proc.pid), signal.SIGKILL)
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert proc.wait(timeout=20) == CORE_DIED_EXIT_CODE
        assert time.monotonic() - killed < 15
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_server_leaves_no_orphan_core(tiny_model_dir):
    port = free_port()
    proc = _serve(tiny_model_dir, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=180)
        core = _core_pid(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        assert _gone(core, 5)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_separate_with_tensor_parallel_is_refused():
    from small4.cli import build_parser
    from small4.server.serve import build_from_args

    args = build_parser().parse_args(["serve", "unused", "-tp", "2", "--engine-process", "separate"])
    with pytest.raises(ValueError, match="--engine-process separate"):
        build_from_args(args)


# ---- the core's loop in this process (the same EngineCore the core process runs) ------------------------------
def _run_core(tiny_model_dir, inbox: list[list[m.Message]]) -> list[m.Message]:
    from small4.config import EngineConfig
    from small4.core.process import EngineCore
    from small4.engine.engine import Engine

    engine = Engine.from_model_dir(
        tiny_model_dir, EngineConfig(block_size=4, kv_cache_memory=8 << 20, enforce_eager=True)
    )
    sent: list[m.Message] = []

    def receive(timeout_ms):
        return [m.decode(m.encode(msg)) for msg in inbox.pop(0)] if inbox else [m.Stop()]

    assert EngineCore(engine, receive, lambda msg: sent.append(m.decode(m.encode(msg)))).run() == 0
    return sent


def test_core_rejects_bad_adds_and_aborts_a_request_whose_grammar_is_compiling(tiny_model_dir):
    from small4.chat.grammar import GrammarCompiler
    from small4.tokenizer import Tokenizer

    compiler = GrammarCompiler(Tokenizer.from_file(tiny_model_dir).mistral)
    grammar = compiler.grammar_for(_json_request())
    params = SamplingParams(max_tokens=4, n=2)
    sent = _run_core(
        tiny_model_dir,
        [
            [
                m.AddRequest("bad", [1, 10**6], params),  # outside the vocabulary: a ValueError, the server's 400
                m.AddRequest("g", [1, 5], params, GrammarSpec(grammar)),
                m.Abort("g"),  # while its grammar compiles: added, then aborted, so its stream ends as usual
                m.AddRequest("broken", [1, 5], params, GrammarSpec("start: ???")),
                m.AddRequest("ok", [1, 5], SamplingParams(max_tokens=3)),
            ]
        ],
    )
    batches = [b for b in sent if isinstance(b, m.StepBatch)]
    assert isinstance(sent[-1], m.CoreExit) and sent[-1].error is None
    rejected = {r.request_id: r for b in batches for r in b.rejected}
    assert rejected["bad"].error == "value" and "prompt token ids" in rejected["bad"].message
    assert "broken" in rejected and "grammar" in rejected["broken"].message
    accepted = [rid for b in batches for rid in b.accepted]
    assert sorted(accepted) == ["g", "ok"]
    finished = {(o.request_id, o.index): o.finish_reason for b in batches for o in b.outputs if o.finished}
    assert finished == {("g", 0): "abort", ("g", 1): "abort", ("ok", 0): "length"}
    assert batches[-1].stats.num_running == 0 and batches[-1].stats.generation_tokens_total == 3


def _json_request():
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest, ResponseFormat, ResponseFormats

    return ChatCompletionRequest(
        messages=[UserMessage(content="JSON")], response_format=ResponseFormat(type=ResponseFormats.json_object)
    )


def test_engine_and_core_modules_import_without_zmq_and_msgpack():
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("zmq", "msgpack"):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
import small4.engine.async_engine, small4.engine.engine, small4.bench.serving
import small4.core.messages, small4.core.client, small4.core.process
assert not [m for m in sys.modules if m.split(".")[0] in ("zmq", "msgpack")]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
