"""`GET /` and its two assets: the built-in chat page (small4/server/webui/), read once from the package.

The page is open without the API key (it holds no data: it asks for the key and sends it as a bearer token on
every API call), so only these three fixed paths are exempt from the key check; nothing is looked up by a name the
client chose. Every response carries a strict Content-Security-Policy: scripts, styles and fetches from this
origin only, images also as data:/blob: URLs (attachments), no frames, no plugins, no form posts elsewhere.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# route path -> (file in the package, media type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/webui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/webui/style.css": ("style.css", "text/css; charset=utf-8"),
}
WEBUI_PATHS = frozenset(ASSETS)


def _read(name: str) -> bytes:
    return resources.files("small4.server.webui").joinpath(name).read_bytes()


def add_webui_routes(app: FastAPI) -> None:
    """Registers the page's routes; the files are read now, so a broken install fails at startup."""
    for path, (name, media_type) in ASSETS.items():
        app.add_api_route(path, _endpoint(_read(name), media_type), methods=["GET"], include_in_schema=False)


def _endpoint(body: bytes, media_type: str):
    # a closure, not default arguments: FastAPI would read those as query parameters
    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return asset
