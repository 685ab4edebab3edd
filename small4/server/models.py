"""GET /v1/models: the served model's card, readable by both dialects' clients.

OpenAI's fields (id, object, created, owned_by) and vLLM's ``max_model_len`` beside Mistral's: ``type: "base"``
(the mistralai SDK picks its card class by it), ``max_context_length`` and ``capabilities`` (chat, tools, vision,
reasoning), derived from what this server can actually do with the loaded checkpoint."""

from __future__ import annotations

from typing import Any

from small4.server.context import ServerContext


def model_card(ctx: ServerContext, reasoning_efforts: tuple[str, ...]) -> dict[str, Any]:
    vision = ctx.engine.engine.runner.config.vision is not None
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "small4",
        "max_model_len": ctx.limits.max_model_len,
        "type": "base",
        "max_context_length": ctx.limits.max_model_len,
        "aliases": [],
        "capabilities": {
            "completion_chat": True,
            "completion_fim": False,
            "function_calling": True,
            "vision": vision,
            "reasoning": any(e != "none" for e in reasoning_efforts),
            "fine_tuning": False,
            "classification": False,
        },
    }
