"""The FastAPI app: routes, middleware, lifespan. Routes stay thin; the work is in the handlers.

`server/` only talks to `async_engine` and `chat/` (DESIGN.md): the app owns one AsyncEngine for its lifetime,
starts it with the app and drains it on shutdown (SIGTERM: uvicorn stops accepting, in-flight requests finish,
those still running at --shutdown-timeout end with finish_reason "abort" (serve.GracefulServer), then the engine
thread is joined and the process exits 0).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from small4.server.chat import ChatHandler
from small4.server.completions import CompletionHandler
from small4.server.context import ServerContext
from small4.server.errors import install_error_handlers
from small4.server.middleware import OPEN_PATHS, APIKeyMiddleware, SizeLimitMiddleware
from small4.server.models import model_card
from small4.server.protocol import ChatCompletionRequest, CompletionRequest
from small4.server.responses import ResponsesHandler, ResponsesRequest
from small4.server.tokenize import DetokenizeRequest, TokenizeHandler, TokenizeRequest
from small4.server.webui_routes import WEBUI_PATHS, add_webui_routes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppOptions:
    api_key: str | None = None
    shutdown_timeout_s: float = 30.0
    web_ui: bool = True  # GET / serves the chat page (server/webui_routes.py); --no-web-ui turns it off


def build_app(ctx: ServerContext, options: AppOptions) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            await ctx.engine.shutdown(timeout=options.shutdown_timeout_s)
            ctx.close()

    # redirect_slashes off: Starlette's redirect for "/v1/models/" is built from the client's Host header
    app = FastAPI(title="small4", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    install_error_handlers(app)
    chat, completions = ChatHandler(ctx), CompletionHandler(ctx)

    @app.get("/health")
    async def health() -> Response:
        status = 200 if ctx.engine.healthy else 503
        return JSONResponse({"status": "ok" if status == 200 else "unhealthy"}, status_code=status)

    version_body = {"version": _package_version()}  # read once: the metadata lookup scans sys.path

    @app.get("/version")
    async def version() -> JSONResponse:  # vLLM's probe: open like /health
        return JSONResponse(version_body)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = model_card(ctx, chat.renderer.reasoning_efforts)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat(body, request)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return await completions(body, request)

    responses = ResponsesHandler(chat)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await responses(body, request)

    tokens = TokenizeHandler(ctx, chat.renderer)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokens.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokens.detokenize(body))

    open_paths = OPEN_PATHS
    if options.web_ui:
        add_webui_routes(app)
        open_paths = OPEN_PATHS | WEBUI_PATHS  # the static page only: every API call from it sends the key

    # outermost first: the size cap runs before auth reads nothing but headers anyway
    app.add_middleware(APIKeyMiddleware, api_key=options.api_key, open_paths=open_paths)
    app.add_middleware(
        SizeLimitMiddleware, max_bytes=ctx.limits.max_body_bytes, max_header_bytes=ctx.limits.max_header_bytes
    )
    return app


def _package_version() -> str:
    """The installed small4's version; "unknown" when it runs from a source tree on PYTHONPATH (the GPU image)."""
    try:
        return importlib.metadata.version("small4")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
