"""The engine's face: what code outside ``engine/`` (the server above all) imports, as ``from small4.engine import X``.

Requests go in (``AsyncEngine.add`` with ``SamplingParams``, images as ``ImageInput``, an optional per-sequence
token-mask factory), ``RequestOutput`` deltas come out, and failures are ``EngineDeadError`` /
``RequestFailedError``. ``LLM`` and ``Engine`` are the offline API. The modules behind these names stay private to
the package. Names resolve on first use (``small4._face``): ``import small4.engine`` alone imports nothing heavy, so the
pure-Python block manager and scheduler still import without torch, and nothing here pulls in the server's
libraries.
"""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it
_FACE = {
    "AsyncEngine": "async_engine",
    "EngineDeadError": "async_engine",
    "EngineStats": "async_engine",
    "MAX_CONSECUTIVE_STEP_FAILURES": "async_engine",
    "RequestFailedError": "async_engine",
    "RequestStream": "async_engine",
    "LLM": "engine",
    "Engine": "engine",
    "StepFailedError": "engine",
    "TokenMaskFactory": "engine",
    "ImageInput": "multimodal",
    "CompletionOutput": "outputs",
    "RequestOutput": "outputs",
    "TokenLogprobs": "sampler",
    "MAX_N": "sampling_params",
    "MAX_TOP_LOGPROBS": "sampling_params",
    "SamplingParams": "sampling_params",
    "token_mask_provider": "token_mask",
    "GrammarMaskFactory": "token_mask",
    "GrammarSpec": "token_mask",
}

__all__ = sorted(_FACE)


__getattr__ = lazy_face(__name__, _FACE)
