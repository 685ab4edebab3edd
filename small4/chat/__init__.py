"""The conversation protocol's face: rendering OpenAI / Mistral requests to tokens, parsing the output stream,
structured-output grammars, image fetching. Never touches tensors. Names resolve on first use (``small4._face``),
so importing the package does not import mistral-common or llguidance."""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it
_FACE = {
    "ChatRenderer": "render",
    "RenderError": "render",
    "RenderedPrompt": "render",
    "MARKERS": "parse",
    "OutputParser": "parse",
    "ParsedDelta": "parse",
    "Dialect": "dialect",
    "CompiledGrammar": "grammar",
    "GrammarCompiler": "grammar",
    "GrammarError": "grammar",
    "enforce_schemas": "grammar",
    "response_format_from_openai": "grammar",
    "MediaError": "media",
    "MediaPolicy": "media",
    "parse_allowed_domains": "media",
}

__all__ = sorted(_FACE)
__getattr__ = lazy_face(__name__, _FACE)
