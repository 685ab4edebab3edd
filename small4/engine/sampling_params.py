"""Per-request sampling settings, validated once at construction so the engine can trust them."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_INT32 = 2**31 - 1  # top_k and lengths: what a per-row tensor can hold, whatever the vocabulary
# Temperatures below this sample greedily (as in vLLM): dividing logits by a denormal overflows to inf / NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler and of the stop logic.

    Mirrors the OpenAI / vLLM knobs. ``temperature == 0`` (or below ``GREEDY_BELOW``) means greedy.
    ``logprobs`` is the number of top alternatives to return beside the chosen token (None: no logprobs at all,
    0: only the chosen token's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # special tokens rendered as text even when skipping the others (the chat parser's [THINK], [TOOL_CALLS], ...)
    kept_special_token_ids: tuple[int, ...] = ()
    # speculative decoding for this request: None (auto) and True speculate when the engine has a draft, False not
    speculative: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        checks = [
            (1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}"),
            (0.0 <= self.temperature < float("inf"), "temperature", "must be finite and >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (0 <= self.top_k <= MAX_INT32, "top_k", f"must be -1, 0 (disabled) or in [1, {MAX_INT32}]"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (0.0 < self.repetition_penalty < float("inf"), "repetition_penalty", "must be finite and > 0"),
            (1 <= self.max_tokens <= MAX_INT32, "max_tokens", f"must be in [1, {MAX_INT32}]"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed", "must fit in 64 bits"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (
                all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias",
                "values in [-100, 100]",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
