"""Pure model math: the Mistral Small 4 decoder (``Mistral4Model``, with its vision tower) and the per-step
``AttentionMetadata`` the runner builds for it. Names resolve on first use (``small4._face``)."""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it
_FACE = {
    "Mistral4Model": "mistral4",
    "AttentionMetadata": "context",
    "AttnImpl": "attention",
}

__all__ = sorted(_FACE)
__getattr__ = lazy_face(__name__, _FACE)
