"""The model runner owns device memory: the weights, the paged latent cache, and turning a scheduler plan into
one flat forward pass. The model owns the math; the scheduler only counts blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from small4.config import EngineConfig, ModelConfig
from small4.engine.cuda_graphs import DecodeGraphs, _padded_table
from small4.engine.multimodal import MultiModalInputs
from small4.engine.request import Request
from small4.engine.scheduler import ScheduledRequest, SchedulerOutput
from small4.engine.step_inputs import StepInputs, token_slice, upload
from small4.kernels.backend import kernel_backend
from small4.kernels.registry import apply_backend
from small4.model.context import AttentionMetadata
from small4.model.mistral4 import Mistral4Model
from small4.weights.loader import load_model

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def cache_dtype(engine_cfg: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    if engine_cfg.kv_cache_dtype == "auto":
        return model_dtype
    if engine_cfg.kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    return _DTYPES[engine_cfg.kv_cache_dtype]


@dataclass
class StepBatch:
    """What one forward pass consumed: which requests sample, and the rows of their last tokens."""

    request_ids: list[str]  # requests that sample a token this step, in order
    logits: torch.Tensor  # [len(request_ids), vocab] float32; [sum(drafts + 1)] rows when drafts are verified
    # with a draft model attached: every row's hidden state (what the draft takes) and the step's layout
    hidden: torch.Tensor | None = None  # [T, hidden]
    input_ids: torch.Tensor | None = None  # [T]
    positions: torch.Tensor | None = None  # [T]
    meta: AttentionMetadata | None = None
    images: tuple[torch.Tensor, torch.Tensor] | None = None
    item_starts: list[int] | None = None  # each item's first row, when not ``meta.query_start_loc`` (graph verify)


@dataclass(frozen=True)
class InputPatch:
    """Decode rows whose input token is still on the device (async scheduling): item ``items[j]`` of the plan takes
    ``source[source_rows[j]]``, the token the previous step sampled for it, written into the staged input ids on
    the device, so the step launches without the host having read that token."""

    items: list[int]
    source: torch.Tensor  # int64 [S] on the runner's device: the previous step's sampled tokens
    source_rows: list[int]


def _encode_images(model: Mistral4Model, mm: MultiModalInputs, device: torch.device, dtype: torch.dtype) -> None:
    """Runs the vision tower over all of a request's images once; the embeddings stay with the request."""
    if mm.embeddings is None:
        pixels = [torch.as_tensor(img.pixels).to(device=device, dtype=dtype) for img in mm.images]
        mm.embeddings = torch.cat(model.vision(pixels))  # [num_slots, hidden]


def _has_image_slot(item: ScheduledRequest) -> bool:
    mm = item.request.mm_inputs
    if mm is None:
        return False
    lo, hi = mm.slots_in(item.start, item.start + item.num_new_tokens)
    return hi > lo


class ModelRunner:
    def __init__(
        self, model: Mistral4Model, engine_cfg: EngineConfig, num_blocks: int | None = None, draft=None
    ) -> None:
        """A runner around a built model, on the model's device and in its dtype. ``num_blocks`` overrides the cache
        size that the memory budget would give (benchmarks); ``from_model_dir`` loads a checkpoint first. ``draft``
        is a ``small4.spec.eagle.EagleDraft`` for speculative decoding (else ``engine_cfg.speculative_model`` loads
        one)."""
        if isinstance(model, (str, Path)):
            raise TypeError("ModelRunner(model, engine_cfg) takes a built model; use ModelRunner.from_model_dir")
        self.engine_cfg = engine_cfg
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.model = model
        self.draft = draft
        self.num_graph_verify_steps = 0  # speculative verify steps that replayed the decode graphs
        self._setup(num_blocks)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, engine_cfg: EngineConfig) -> ModelRunner:
        """Loads the checkpoint onto the configured device, in the configured dtype, and runs it."""
        device = resolve_device(engine_cfg.device)
        model = load_model(
            model_dir,
            dtype=resolve_dtype(engine_cfg.dtype, device),
            device=device,
            progress=False,
            attention_scale_mscale=engine_cfg.attention_scale_mscale,
        )
        return cls(model, engine_cfg)

    def _load_draft(self) -> None:
        """The EAGLE draft named by ``engine_cfg.speculative_model`` (None without one)."""
        path = self.engine_cfg.speculative_model
        if self.draft is not None or path is None:
            return
        if not self.engine_cfg.num_speculative_tokens:
            log.warning(
                "--speculative-model %s not loaded: 0 speculative tokens (give --num-speculative-tokens K, "
                "or --profile latency)",
                path,
            )
            self.draft = None
            return
        from small4.spec.loading import load_draft  # the draft's weights layouts live with the draft

        self.draft = load_draft(path, self.model, dtype=self.dtype, device=self.device)

    def _setup(self, num_blocks: int | None = None) -> None:
        engine_cfg = self.engine_cfg
        self.model.set_attn_impl(engine_cfg.attn_impl)
        self.model.set_backend(kernel_backend(self.device))
        self.config: ModelConfig = self.model.config
        self.block_size = engine_cfg.block_size
        self.cache_dtype = cache_dtype(engine_cfg, self.dtype)
        self._load_draft()
        self.attach_draft(self.draft)
        self.allocate_cache(num_blocks or self._num_blocks())
        log.info("max tokens in cache: %d (%d blocks of %d)", self.max_cached_tokens, self.num_blocks, self.block_size)

    def configure(self, engine_cfg: EngineConfig) -> None:
        """Runs under other engine settings (batch limits, lengths, prefix caching, eager mode: what an engine built
        next reads from its runner). What shaped the runner (device, dtype, block size, cache dtype, attention
        path) must stay as it is."""
        fixed = ("device", "dtype", "block_size", "kv_cache_dtype", "attn_impl")
        changed = [name for name in fixed if getattr(engine_cfg, name) != getattr(self.engine_cfg, name)]
        if changed:
            raise ValueError(f"a built runner cannot change {', '.join(changed)}")
        self.engine_cfg = engine_cfg

    def allocate_cache(self, num_blocks: int) -> None:
        """The latent cache for ``num_blocks`` blocks, replacing any earlier one (freed first) and the decode graphs
        captured over it. Empty, not zeros: a slot is always written before it is read, and untouched pages cost
        nothing. One block more than the block manager hands out: padded rows of a CUDA-graph step write there. An
        engine sizes its block manager from ``num_blocks`` when it is built, so build it after this."""
        self.release_cache()
        text = self.config.text
        self.num_blocks = self.pad_block = num_blocks
        shape = (num_blocks + 1, self.block_size, text.latent_dim)
        self.kv_caches = [
            torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(text.num_layers)
        ]
        # the draft's layers get latent caches of the same layout: same blocks, same slots as the target's
        self.draft_kv_caches = [
            torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.draft_layers)
        ]
        self.inputs = StepInputs(self.device, self.block_size, self.pad_block)

    def attach_draft(self, draft) -> None:
        """Speculates with ``draft`` (an ``EagleDraft`` on the runner's device, or None for none) from the next cache
        on: its layers' latent caches come with ``allocate_cache``, so allocate one after this (benchmarks)."""
        self.draft = draft
        if draft is not None:
            draft.set_attn_impl(self.engine_cfg.attn_impl)
            apply_backend(draft, kernel_backend(self.device))  # the draft's kernels: the target's choice

    def release_cache(self) -> None:
        """Drops the latent cache and the graphs captured over it (benchmarks size one cache per measurement)."""
        self.kv_caches: list[torch.Tensor] = []
        self.draft_kv_caches: list[torch.Tensor] = []
        self.decode_graphs: DecodeGraphs | None = None

    def capture_decode_graphs(
        self, max_blocks_per_seq: int, max_batch: int, batch_sizes: list[int] | None = None, capture: bool = True
    ) -> DecodeGraphs:
        """Captures one decode forward per batch size of the ladder (or ``batch_sizes``) over the current cache;
        decode-only steps that fit then replay them. Capture needs CUDA (the caller decides, as
        ``prepare_decode_graphs`` does); ``capture=False`` keeps only the static buffers, replayed eagerly."""
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, self.pad_block, max_blocks_per_seq, max_batch, capture, batch_sizes
        )
        return self.decode_graphs

    @property
    def draft_layers(self) -> int:
        return 0 if self.draft is None else self.draft.config.num_layers

    @property
    def bytes_per_block(self) -> int:
        """One block's bytes over every layer that caches latents: the target's and the draft's."""
        text = self.config.text
        itemsize = torch.empty((), dtype=self.cache_dtype).element_size()
        return (text.num_layers + self.draft_layers) * self.block_size * text.latent_dim * itemsize

    @property
    def max_cached_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _num_blocks(self) -> int:
        budget = self.engine_cfg.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.engine_cfg.gpu_memory_utilization) - used - self._activation_reserve()
        elif budget is None:
            budget = CPU_DEFAULT_KV_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the latent cache (budget {budget} bytes)")
        return int(num_blocks)

    def _activation_reserve(self) -> int:
        """Head-room for one step's activations: logits of every sampled row plus MoE intermediates."""
        text = self.config.text
        tokens = self.engine_cfg.max_num_batched_tokens  # the profile fills it in
        per_token = 4 * (
            text.vocab_size + 8 * text.hidden_size + 4 * text.moe_intermediate_size * text.num_experts_per_tok
        )
        return tokens * per_token

    def _collect_image_rows(
        self, req: Request, start: int, n: int, offset: int, rows: list[int], embeds: list[torch.Tensor]
    ) -> None:
        """Image embeddings for the [IMG] slots inside this chunk, with their rows in the flat batch."""
        mm: MultiModalInputs = req.mm_inputs
        lo, hi = mm.slots_in(start, start + n)
        if lo == hi:
            return
        _encode_images(self.model, mm, self.device, self.dtype)
        rows.extend(offset + p - start for p in mm.slot_positions[lo:hi])
        embeds.append(mm.embeddings[lo:hi])

    def slot(self, request: Request, position: int) -> int:
        """The cache slot (block * block_size + offset) of a request's token at ``position``."""
        return request.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def prepare_decode_graphs(self, max_model_len: int, max_batch: int) -> None:
        """Captures decode steps as CUDA graphs (GPU with the Triton kernels, unless ``enforce_eager``)."""
        if self.engine_cfg.enforce_eager or self.device.type != "cuda" or kernel_backend(self.device) != "triton":
            return
        self.capture_decode_graphs(-(-max_model_len // self.block_size), max_batch)

    supports_input_patch = True  # the parallel driver says no: its ranks' inputs are not patched (not tested there)

    def _patch_inputs(self, step, patch: InputPatch | None) -> None:
        """Fill the staged input ids of ``patch``'s decode rows from the previous step's sampled tokens, on the
        device (stream-ordered after the staging copy and the previous step's sampler)."""
        if patch is None:
            return
        qsl = step.query_start_loc
        index = upload([[qsl[i] for i in patch.items], patch.source_rows], torch.long, self.device)
        step.input_ids.index_copy_(0, index[0], patch.source.index_select(0, index[1]))

    def _graph_step(self, plan: SchedulerOutput) -> StepBatch | None:
        """A decode-only step through the graphs; None when the step does not fit them (it then runs eagerly)."""
        graphs, items = self.decode_graphs, plan.scheduled
        if graphs is None or not items or len(items) > graphs.max_batch:
            return None
        if self.draft is not None and self.draft.config.target_hidden == "prenorm":  # the graphs give normed rows
            return None
        width = graphs.max_blocks_per_seq
        if any(item.draft_token_ids for item in items):
            return self._graph_verify_step(plan)
        for item in items:  # one pass: this runs for every sequence of every decode step
            if item.num_new_tokens != 1 or len(item.request.block_ids) > width:
                return None
            if item.request.mm_inputs is not None and _has_image_slot(item):
                return None
        step = self.inputs.stage(items, plan.preempted)
        self._patch_inputs(step, plan.input_patch)
        hidden = graphs.run(step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.seq_lens)
        ids = [item.request.request_id for item in items if item.samples]
        batch = StepBatch(ids, self.model.compute_logits(self._sampled_hidden(hidden, step)))
        if self.draft is not None:
            meta = self._step_meta(step)
            batch.hidden, batch.input_ids, batch.positions, batch.meta = hidden, step.input_ids, step.positions, meta
        return batch

    def _graph_verify_step(self, plan: SchedulerOutput) -> StepBatch | None:
        """Speculative verification through the decode graphs: a chunk of the last token and m drafts becomes
        m + 1 decode rows of the same sequence (same block table, lengths start + 1 .. start + m + 1). Every
        latent is written before attention reads, so row j attends to exactly the causal prefix a chunk would
        show it, through the decode kernel plain decoding uses. None when the step does not fit the graphs."""
        graphs, items = self.decode_graphs, plan.scheduled
        tokens, positions, slots, tables, lens, starts = [], [], [], [], [], []
        for item in items:
            req = item.request
            m = len(item.draft_token_ids)
            if item.num_new_tokens != m + 1 or len(req.block_ids) > graphs.max_blocks_per_seq:
                return None
            if req.mm_inputs is not None and _has_image_slot(item):
                return None
            starts.append(len(tokens))
            tokens += token_slice(req, item.start, item.start + 1) + list(item.draft_token_ids)
            for pos in range(item.start, item.start + m + 1):
                positions.append(pos)
                slots.append(self.slot(req, pos))
                tables.append(req.block_ids)
                lens.append(pos + 1)
        if len(tokens) > graphs.max_batch:
            return None
        hidden = graphs.run(tokens, positions, slots, tables, lens)
        ids = [item.request.request_id for item in items]
        batch = StepBatch(ids, self.model.compute_logits(hidden))
        dev = self.device
        batch.hidden, batch.item_starts = hidden, starts
        batch.input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        batch.positions = torch.tensor(positions, dtype=torch.long, device=dev)
        batch.meta = AttentionMetadata(
            query_start_loc=list(range(len(tokens) + 1)),
            seq_lens=lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=_padded_table(tables, self.pad_block).to(dev),
            block_size=self.block_size,
        )
        self.num_graph_verify_steps += 1
        return batch

    @staticmethod
    def _sampled_hidden(hidden: torch.Tensor, step) -> torch.Tensor:
        """The rows that sample (no gather, and no index upload, when every row does)."""
        return hidden if step.all_rows_sample else hidden.index_select(0, step.sample_rows)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepBatch:
        """One forward over the plan; ``plan.input_patch`` (async scheduling) names decode rows whose input token the
        previous step is still sampling on the device."""
        graphed = self._graph_step(plan)
        if graphed is not None:
            return graphed
        items = plan.scheduled
        step = self.inputs.stage(items, plan.preempted)
        self._patch_inputs(step, plan.input_patch)
        meta = self._step_meta(step)
        images = self._image_rows(items, step.query_start_loc)
        ids = [item.request.request_id for item in items if item.samples]
        if self.draft is not None:
            logits, hidden = self.forward_with_hidden(step.input_ids, step.positions, meta, step.sample_rows, images)
            return StepBatch(ids, logits, hidden, step.input_ids, step.positions, meta, images)
        return StepBatch(ids, self.forward_step(step.input_ids, step.positions, meta, step.sample_rows, images))

    def _step_meta(self, step) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=step.query_start_loc,
            seq_lens=step.seq_lens_list,
            slot_mapping=step.slot_mapping,
            block_tables=step.block_tables,
            block_size=self.block_size,
            seq_lens_tensor=step.seq_lens,
        )

    def forward_with_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_step`` that also returns every row's hidden state in the form the draft takes (after the
        final norm, or before it for a ``target_hidden="prenorm"`` draft): (logits of ``sample_rows``, [T, hidden]).
        The parallel driver overrides it as it does ``forward_step`` (the other ranks run ``forward_step``)."""
        embeds = self._merged_embeds(ids, images)
        prenorm = self.model.forward_prenorm(ids, positions, meta, self.kv_caches, inputs_embeds=embeds)
        normed = self.model.norm(prenorm)
        hidden = prenorm if self.draft.config.target_hidden == "prenorm" else normed
        return self._logits_of_rows(normed, sample_rows), hidden

    def draft_forward(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The draft over a flat batch through its own caches: row t pairs token ``next_ids[t]`` (embedded by the
        target, image rows merged) with ``hidden[t]`` at ``positions[t]`` -> the draft's hidden [T, hidden]."""
        embeds = self.model.embed(next_ids, *(images[::-1] if images is not None else ()))
        return self.draft(embeds, hidden, positions, meta, self.draft_kv_caches)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the draft's hidden rows through the target's lm_head: the draft's proposals. A seam of
        its own, beside ``draft_forward``, because under TP the lm_head is collective (parallel/draft.py)."""
        return self.model.compute_logits(hidden)

    def forward_step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One eager forward over a flat batch: ids / positions [T], ``images`` = (rows [N], embeddings [N, hidden])
        for the [IMG] slots -> float32 logits of ``sample_rows`` (no gather when every row samples: sorted unique
        rows, so a full count is the identity). The one seam the parallel driver (small4/parallel/) overrides, to
        send the same inputs to the other ranks first."""
        hidden = self.model(ids, positions, meta, self.kv_caches, inputs_embeds=self._merged_embeds(ids, images))
        return self._logits_of_rows(hidden, sample_rows)

    def _merged_embeds(
        self, ids: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor | None:
        """The token embeddings with the [IMG] rows replaced, or None without images (the model embeds itself)."""
        return None if images is None else self.model.embed(ids, images[1], images[0])

    def _logits_of_rows(self, hidden: torch.Tensor, sample_rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``sample_rows`` (sorted, unique: a full count is every row, so no gather)."""
        if sample_rows.numel() != hidden.shape[0]:
            hidden = hidden.index_select(0, sample_rows)
        return self.model.compute_logits(hidden)

    def _image_rows(self, items: list[ScheduledRequest], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The [IMG] slots of this step's chunks: (rows [N] in the flat batch, embeddings [N, hidden]), or None."""
        image_rows: list[int] = []
        image_embeds: list[torch.Tensor] = []
        for i, item in enumerate(items):
            if item.request.mm_inputs is not None:
                self._collect_image_rows(
                    item.request, item.start, item.num_new_tokens, starts[i], image_rows, image_embeds
                )
        if not image_rows:
            return None
        return torch.tensor(image_rows, dtype=torch.long, device=self.device), torch.cat(image_embeds)
