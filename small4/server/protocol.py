"""OpenAI-shaped request models and the error body, validated once at the edge.

Unknown fields are rejected (never accepted and silently ignored); ranges follow the OpenAI API, with the vLLM
sampling extensions users rely on (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids).

Every number has both bounds here, so nothing the engine thread computes from a request can overflow (a top_k of
2**63 once reached a tensor constructor): NaN and infinities are refused, integers are capped at ``MAX_INT32``
(lengths) or the seed's 64-bit range, and what depends on the model (top_k, token ids: the vocabulary; max_tokens:
max_model_len) is checked by ``ServerContext`` before any rendering. A value out of range is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from small4.engine import MAX_N, MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_INT32 = 2**31 - 1  # upper bound of every length-like field (the model's own limits are checked later)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # and <= the vocabulary (ServerContext)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)  # below 0.01 logits / penalty overflow
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # ids checked by ServerContext
    include_stop_str_in_output: bool = False
    # small4: speculative decoding for this request (with a draft model); "auto" (default) is off for structured
    # output, where drafts are rarely accepted, and on otherwise
    speculative: bool | Literal["auto"] = "auto"

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_STRING_LEN for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_STRING_LEN} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for key, value in (v or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    def model_bounded_fields(self) -> dict[str, list[int]]:
        """The token ids and top_k, which only the model can bound (by its vocabulary size)."""
        return {
            "top_k": [self.top_k] if self.top_k is not None and self.top_k > 0 else [],
            "logit_bias": [int(k) for k in self.logit_bias or {}],
            "stop_token_ids": list(self.stop_token_ids or ()),
        }

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        kept_special_token_ids: tuple[int, ...] = (),
        defaults: Mapping[str, float] | None = None,
    ) -> SamplingParams:
        """``defaults``: the model's generation_config.json values, for the fields this request left unset."""
        d = defaults or {}

        def pick(value: float | None, name: str, fallback: float) -> float:
            return value if value is not None else d.get(name, fallback)

        return SamplingParams(
            n=self.n,
            temperature=pick(self.temperature, "temperature", 1.0),
            top_p=pick(self.top_p, "top_p", 1.0),
            top_k=int(pick(self.top_k, "top_k", 0)),
            min_p=pick(self.min_p, "min_p", 0.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick(self.repetition_penalty, "repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            logprobs=logprobs,
            skip_special_tokens=True,
            kept_special_token_ids=kept_special_token_ids,
            speculative=self.speculative_choice(),
        )

    def speculative_choice(self) -> bool | None:
        """The engine's ``SamplingParams.speculative``: False when asked (or by ``auto`` for structured output),
        None (the engine's default: speculate when it can) otherwise."""
        if self.speculative == "auto":
            return False if self.structured_output() else None
        return self.speculative

    def structured_output(self) -> bool:
        return False


class ChatMessage(BaseModel):
    """Kept loose on purpose (``extra="allow"``): message shapes are validated by mistral-common when rendering,
    which knows the model's own rules; here only the role is checked."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Mistral dialect (chat/dialect.py): random_seed is Mistral's name for seed; safe_prompt prepends Mistral's
    # guardrail system prompt; prompt_mode has no value Small 4 supports beyond null (reasoning_effort instead)
    random_seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    safe_prompt: bool = False
    prompt_mode: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice is set but no tools are given")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required", "any"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' (Mistral: 'any') or a named function")
        if self.store:
            raise ValueError("store=true is not supported")
        if self.random_seed is not None and self.seed is not None and self.random_seed != self.seed:
            raise ValueError("seed and random_seed (its Mistral name) are both set and differ")
        if self.seed is None:
            self.seed = self.random_seed
        if self.prompt_mode is not None:
            raise ValueError(
                f"prompt_mode {self.prompt_mode!r} is not supported by this model: Small 4 has no reasoning system "
                "prompt; use reasoning_effort ('none' or 'high') to turn reasoning on or off"
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def structured_output(self) -> bool:
        """JSON output or a forced tool call: a grammar constrains every token (tool_choice auto does not)."""
        fmt = (self.response_format or {}).get("type", "text")
        forced = self.tool_choice in ("required", "any") or isinstance(self.tool_choice, dict)
        return fmt in ("json_schema", "json_object") or (forced and bool(self.tools))


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _few_prompts(cls, v: str | list[Any]) -> str | list[Any]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (server-side reranking is not supported)")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
