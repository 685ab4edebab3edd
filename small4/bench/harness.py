"""``Bench``: the model under test of ``small4 bench full``, its runner and the shapes its estimates need.

Its own module so that each measurement (``fullscale``'s decode and prefill, ``serving``'s closed loop) imports it
without importing the others. It drives the runner only through its public operations (``allocate_cache``,
``release_cache``, ``execute``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from small4.bench.synthetic import WeightDtype
from small4.bench.timing import free_bytes, gib, time_device
from small4.engine.model_runner import ModelRunner
from small4.engine.request import Request
from small4.engine.scheduler import ScheduledRequest, SchedulerOutput
from small4.kernels.backend import kernel_backend
from small4.parallel.spmd import agree_any
from small4.parallel.state import Dist
from small4.weights.tiny import TinySpec

FIRST_REGULAR_TOKEN = 1000
HEADROOM_BYTES = 1 << 30  # left free besides every estimate (allocator fragmentation, Triton scratch)


@dataclass
class Bench:
    """The random model, its runner and the shapes the estimates need."""

    runner: ModelRunner
    spec: TinySpec
    full_layers: int
    weights: WeightDtype
    device: torch.device
    max_cache_memory: int | None
    seed: int
    cuda_graph: bool = False
    filled: tuple[int, list[torch.Tensor]] | None = None  # (context, first sequence's latent blocks per layer)
    dist: Dist | None = None  # this rank's process group when the model is split (every rank runs the bench)
    async_scheduling: bool = False  # the serving measurement's engine overlaps its steps (engine/overlap.py)

    @property
    def model(self):
        return self.runner.model

    @property
    def graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs: asked for, on CUDA, and with the Triton kernels (the
        reference kernels read lengths on the host, which a capture cannot do), as the engine decides it."""
        return self.cuda_graph and self.device.type == "cuda" and kernel_backend(self.device) == "triton"

    @property
    def text(self):
        return self.runner.config.text

    @property
    def layers(self) -> int:
        return self.text.num_layers

    def cache_bytes(self, num_blocks: int) -> int:
        itemsize = torch.empty((), dtype=self.runner.cache_dtype).element_size()
        layers = self.layers + self.runner.draft_layers  # a draft's latent caches share the blocks
        return layers * num_blocks * self.runner.block_size * self.text.latent_dim * itemsize

    def allocate_cache(self, num_blocks: int) -> None:
        self.release_cache()  # the old cache is gone before the new one is allocated
        self.runner.allocate_cache(num_blocks)

    def release_cache(self) -> None:
        self.runner.release_cache()
        free_bytes(self.device)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.runner.block_size)

    def chunk_activation_bytes(self, chunk: int, context: int) -> int:
        """Rough peak activations of a ``chunk``-token forward against a ``context``-token cache: the reference
        attention's [H, chunk, context] scores (bf16 product, float32 masked copy and softmax, bf16 probs) plus
        the MoE and projection intermediates, and the float32 logits of the sampled rows."""
        t = self.text
        # CPU SDPA materialises scores; a GPU runs flash attention over expanded K/V (3 x 128 wide per head)
        scores = 0 if self.device.type == "cuda" else t.num_heads * chunk * context * 12
        scores += context * t.num_heads * (2 * t.qk_head_dim + t.v_head_dim) * 2 if chunk > 1 else 0
        moe = chunk * t.num_experts_per_tok * 3 * t.moe_intermediate_size * 4 * 2
        proj = chunk * (16 * t.hidden_size + 4 * t.num_heads * (t.kv_lora_rank + t.qk_head_dim + t.v_head_dim))
        return scores + moe + proj + 8 * t.vocab_size

    def why_not_fit(self, cache_bytes: int, activation_bytes: int) -> str | None:
        """Why a run needing this much does not fit (None: it fits); split over ranks, it fits only on all."""
        why = self._why_not_fit_here(cache_bytes, activation_bytes)
        if agree_any(why is not None, self.dist):
            return why or "does not fit on another rank"
        return None

    def _why_not_fit_here(self, cache_bytes: int, activation_bytes: int) -> str | None:
        if self.max_cache_memory is not None and cache_bytes > self.max_cache_memory:
            return f"latent cache needs {gib(cache_bytes)}, over --max-cache-memory {gib(self.max_cache_memory)}"
        free = free_bytes(self.device)
        if free is not None and cache_bytes + activation_bytes + HEADROOM_BYTES > free:
            return (
                f"needs {gib(cache_bytes)} of latent cache + ~{gib(activation_bytes)} of activations "
                f"+ {gib(HEADROOM_BYTES)} headroom, {gib(free)} free"
            )
        return None

    def random_tokens(self, n: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(FIRST_REGULAR_TOKEN, self.text.vocab_size, (n,), generator=g).tolist()

    def run_chunks(self, req: Request, start: int, end: int, chunk: int) -> None:
        """Prefills tokens [start, end) of ``req`` through ``ModelRunner.execute``, ``chunk`` tokens a step."""
        for s in range(start, end, chunk):
            n = min(chunk, end - s)
            self.runner.execute(SchedulerOutput([ScheduledRequest(req, n, s, samples=s + n == end)]))

    def head_time(self, num_tokens: int, repeats: int, warmup: int) -> list[float]:
        """Device time of the parts outside the layers: embedding, final norm, lm_head of ``num_tokens`` rows."""
        ids = torch.randint(FIRST_REGULAR_TOKEN, self.text.vocab_size, (num_tokens,), device=self.device)
        m = self.model

        @torch.inference_mode()
        def head() -> torch.Tensor:
            return m.compute_logits(m.norm(m.embed_tokens(ids)))

        return time_device(head, self.device, repeats, warmup)

    def scale(self, total_ms: float, head_ms: float) -> dict[str, float]:
        per_layer = max(total_ms - head_ms, 0.0) / self.layers
        return {"head_ms": head_ms, "per_layer_ms": per_layer, "ms": head_ms + per_layer * self.full_layers}
