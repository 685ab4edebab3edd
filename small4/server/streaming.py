"""Between the engine's output stream and HTTP: timing for metrics, SSE framing, and client disconnects.

A client that goes away must stop its request within one engine step: streaming responses are cancelled by the
ASGI server when the socket closes (our generators close the engine stream, which aborts), and non-streaming
requests are raced against a disconnect watcher.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from small4.engine import EngineDeadError, RequestFailedError, RequestOutput, RequestStream
from small4.server.context import Ticket
from small4.server.errors import APIError
from small4.server.metrics import ServerMetrics

T = TypeVar("T")
DISCONNECT_POLL_S = 0.05


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n"


async def sse_response_body(
    chunks: AsyncIterator[str], metrics: ServerMetrics, endpoint: str, ticket: Ticket | None = None
) -> AsyncIterator[str]:
    """Frames a handler's SSE chunks: ``[DONE]`` at the end, and an error event (then ``[DONE]``) if the engine
    fails mid-stream, since the 200 status line has already gone out. Gives the admission ticket back at the end
    (however the body ends: finished, failed, or the client gone)."""
    try:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            metrics.requests.labels(endpoint, str(e.status)).inc()
            yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.status}})
        else:
            metrics.requests.labels(endpoint, "200").inc()
        yield sse("[DONE]")
    finally:
        if ticket is not None:
            ticket.release()


async def timed_outputs(stream: RequestStream, metrics: ServerMetrics, endpoint: str) -> AsyncIterator[RequestOutput]:
    """Yields the engine's outputs, recording TTFT, inter-token latency, end-to-end latency and token counts;
    closing this generator closes (and so aborts) the engine stream. An engine failure becomes a 500."""
    start = last = time.monotonic()
    first = True
    try:
        async for out in _engine_errors_as_api_errors(stream):
            now = time.monotonic()
            if out.new_token_ids:
                metrics.generation_tokens.inc(len(out.new_token_ids))
                if first:
                    metrics.ttft.labels(endpoint).observe(now - start)
                    first = False
                else:
                    metrics.itl.labels(endpoint).observe(now - last)
                last = now
            metrics.observe_speculation(out)
            yield out
    finally:
        await stream.aclose()
        metrics.e2e.labels(endpoint).observe(time.monotonic() - start)


async def _engine_errors_as_api_errors(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    try:
        async for out in stream:
            yield out
    except (EngineDeadError, RequestFailedError) as e:
        raise APIError(500, "the engine failed while generating this response", code="engine_error") from e


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Runs ``work`` unless the client disconnects first; then cancels it (which aborts its engine request)
    and returns None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None
