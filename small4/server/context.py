"""What every route handler shares: the async engine, tokenizer, limits and metrics, plus the checks they all
make (model name, queue capacity, token budget), so each handler stays about its own endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from small4.chat.media import MediaPolicy
from small4.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from small4.engine.engine import TokenMaskFactory
from small4.engine.multimodal import ImageInput
from small4.engine.sampling_params import SamplingParams
from small4.server.errors import APIError
from small4.server.metrics import ServerMetrics
from small4.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServerLimits:
    max_model_len: int
    max_queue: int = 256  # waiting sequences beyond which new requests get 503 + Retry-After
    max_body_bytes: int = 32 * 1024 * 1024
    retry_after_s: int = 1


class ServerContext:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_name: str,
        limits: ServerLimits,
        media_policy: MediaPolicy | None = None,
        sampling_defaults: dict[str, float] | None = None,
    ) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        # generation_config.json's sampling values for fields a request leaves unset (--generation-config auto)
        self.sampling_defaults = dict(sampling_defaults or {})
        self.media_policy = media_policy or MediaPolicy()
        self.metrics = ServerMetrics(lambda: engine.stats)
        self.vocab_size = engine.engine.runner.config.text.vocab_size

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def check_capacity(self) -> None:
        if not self.engine.healthy:
            raise APIError(503, "the engine is not able to serve requests", code="engine_unhealthy")
        if self.engine.stats.num_waiting >= self.limits.max_queue:
            raise APIError(
                503,
                "the server is busy; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )

    def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        room = self.limits.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {self.limits.max_model_len} tokens; the "
                f"prompt has {prompt_len} tokens",
                "messages",
                "context_length_exceeded",
            )
        if requested is None:
            return room
        if requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {self.limits.max_model_len} tokens; you "
                f"requested {prompt_len + requested} ({prompt_len} in the prompt, {requested} to "
                "generate)",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested

    async def add(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        token_mask_factory: TokenMaskFactory | None = None,
        images: list[ImageInput] | None = None,
    ) -> RequestStream:
        try:
            stream = await self.engine.add(
                request_id, token_ids, params, token_mask_factory=token_mask_factory, images=images
            )
        except EngineDeadError as e:
            raise APIError(503, "the engine is not able to serve requests", code="engine_unhealthy") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        self.metrics.prompt_tokens.inc(len(token_ids))
        return stream

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
