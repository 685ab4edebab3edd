"""The HTTP server's face: ``build_app`` (the FastAPI app over a ``ServerContext``) and ``serve`` (``small4
serve``). Names resolve on first use (``small4._face``), so ``small4 bench`` never imports FastAPI."""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it
_FACE = {
    "AppOptions": "app",
    "build_app": "app",
    "ServerContext": "context",
    "add_serve_arguments": "serve",
    "serve": "serve",
}

__all__ = sorted(_FACE)
__getattr__ = lazy_face(__name__, _FACE)
