"""EngineConfig: the engine's knobs and the ``latency`` / ``throughput`` profiles that fill them in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from small4.config.model import AttentionScaleMode, require

PROFILES: dict[str, dict[str, int]] = {
    # small batches and small chunks: each step is short, so time to first token and per-token latency stay low
    # with a draft model, 3 speculative tokens per step
    "latency": {
        "max_num_seqs": 16,
        "max_num_batched_tokens": 512,
        "long_prefill_token_threshold": 256,
        "num_speculative_tokens": 3,
    },
    # big steps: many sequences and a large token budget, for aggregate tokens/s (no speculation unless asked)
    "throughput": {
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "long_prefill_token_threshold": 0,
        "num_speculative_tokens": 0,
    },
}


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. A profile fills in the batch limits the caller left as None; every knob can be set by hand.

    ``kv_cache_memory`` is the latent-cache budget in bytes; None means: on a GPU, ``gpu_memory_utilization`` of
    total memory minus what the model and activations take; on the CPU, 1 GiB.
    """

    profile: Literal["latency", "throughput"] = "throughput"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: Literal["auto", "bfloat16", "float32", "fp8"] = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    device: str = "auto"
    attn_impl: Literal["auto", "absorb", "naive"] = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode steps (they are captured only on a GPU anyway)
    seed: int = 0
    attention_scale_mscale: AttentionScaleMode = "auto"  # see decide_attention_scale
    # speculative decoding: the EAGLE draft's directory, and drafts per step (0: off; None: the profile's)
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    # async scheduling: the host plans and launches the next step while the device runs this one (engine/overlap.py
    # says which requests fall back to the synchronous step)
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        require(self.profile in PROFILES, "profile", f"must be one of {sorted(PROFILES)}")
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        require(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size", "must be a power of two"
        )
        require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        require(0 <= self.num_speculative_tokens <= 16, "num_speculative_tokens", "must be in [0, 16]")
        require(
            self.attention_scale_mscale in ("auto", "on", "off"), "attention_scale_mscale", "must be auto, on or off"
        )


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes (for --kv-cache-memory)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))
