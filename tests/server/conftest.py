"""A real small4 server on loopback (uvicorn in a thread) over a tiny checkpoint, for the openai client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from small4.cli import build_parser
from small4.server import health as server_health
from small4.server.serve import build_from_args, make_server
from small4.weights.tiny import make_tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    ctx: object
    server: uvicorn.Server
    thread: threading.Thread
    api_key: str | None

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=60, **kwargs
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_healthy(base: str, timeout_s: float = 60) -> None:
    server_health.wait_healthy(base, timeout_s=timeout_s)


def start_server(model_dir, *extra: str, api_key: str | None = None) -> RunningServer:
    port = free_port()
    argv = [
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--block-size",
        "4",
        "--kv-cache-memory",
        "8MiB",
        "--served-model-name",
        "tiny",
        *extra,
    ]
    if api_key:
        argv += ["--api-key", api_key]
    args = build_parser().parse_args(argv)
    app, ctx = build_from_args(args)
    server = make_server(app, ctx, "127.0.0.1", port, args.shutdown_timeout)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    return RunningServer(base, ctx, server, thread, api_key)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-server"), layout="hf", seed=7)


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[RunningServer]:
    s = start_server(tiny_model_dir, api_key="test-key")
    yield s
    s.stop()
