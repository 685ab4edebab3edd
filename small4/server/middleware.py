"""Raw ASGI middleware: API-key check and header / body size caps, before FastAPI parses anything.

They sit on the ASGI path (not as FastAPI dependencies) so that every route, including unknown ones, is covered
and an oversized or unauthenticated body is refused without being read into memory.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from small4.server.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/version"})


async def _send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route but /health (and the static chat page's fixed paths, when
    it is on), compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app, self.open_paths = app, open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            await _send_error(
                send,
                401,
                "invalid or missing API key",
                "authentication_error",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class SizeLimitMiddleware:
    """Refuses oversized requests before FastAPI sees them: headers over ``max_header_bytes`` in all with 431, a
    body over ``max_bytes`` with 413, by Content-Length up front and by counting while reading (a chunked body
    has no length). The body is read here, at most ``max_bytes`` of it, and replayed to the app: FastAPI would
    buffer it whole anyway, and a cap hit inside FastAPI's own body reading would turn into its generic 400."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int = 32 * 1024) -> None:
        self.app, self.max_bytes, self.max_header_bytes = app, max_bytes, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            await _send_error(
                send, 431, f"request headers larger than {self.max_header_bytes} bytes", "invalid_request_error"
            )
            return
        length = dict(headers).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(send)
            return
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()  # later calls: disconnect detection

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"request body larger than {self.max_bytes} bytes", "invalid_request_error")
