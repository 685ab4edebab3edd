"""The engine: exactly one step loop (schedule -> forward -> sample -> emit), and the offline ``LLM`` API.

Latency and throughput modes are settings of the same loop (``EngineConfig.profile``), never forks of it.
The engine speaks token ids; text in and out goes through the ``Tokenizer`` it owns (for stop strings and
offline prompts), chat rendering lives in ``chat/`` above it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from small4.config import EngineConfig
from small4.engine.detokenizer import IncrementalDetokenizer
from small4.engine.kv_cache import BlockManager
from small4.engine.model_runner import InputPatch, ModelRunner
from small4.engine.multimodal import ImageInput, MultiModalInputs
from small4.engine.outputs import CompletionOutput, GenerationResult, RequestOutput
from small4.engine.overlap import InFlight, overlaps
from small4.engine.request import Request, RequestStatus
from small4.engine.sampler import Sampler, SamplingBatch, TokenLogprobs, seeded_generator
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from small4.spec.runtime import SpeculativeDecoder
from small4.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TokenMaskProvider = Callable[[list[int]], "torch.Tensor | None"]
# one provider per sequence: grammar matchers are stateful, so the n sequences of a request each need their own
TokenMaskFactory = Callable[[], TokenMaskProvider]


class StepFailedError(RuntimeError):
    """A step raised; the requests it held (``request_ids``, the ids given to ``add_request``) were ended and
    their blocks freed. The engine itself is consistent and keeps serving the others."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"an engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


@dataclass
class _Sequence:
    """Engine-side state of one sequence beside the scheduler's Request: detokenizer, RNG, grammar hook."""

    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    token_mask: TokenMaskProvider | None
    first_token_time: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer) -> None:
        """An engine around a built runner (its config is the runner's); ``from_model_dir`` loads a checkpoint."""
        if isinstance(runner, (str, Path)):
            raise TypeError("Engine(runner, tokenizer) takes a built runner; use Engine.from_model_dir for a directory")
        self.engine_cfg = runner.engine_cfg
        self.tokenizer = tokenizer
        self.runner = runner
        text = self.runner.config.text
        if self.tokenizer.vocab_size > text.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, model only {text.vocab_size}")
        self.max_model_len = min(
            self.engine_cfg.max_model_len or text.max_position_embeddings, text.max_position_embeddings
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.engine_cfg.block_size, self.engine_cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(self._scheduler_config(), self.block_manager)
        spec_rows = 1 + (self.engine_cfg.num_speculative_tokens or 0) if getattr(runner, "draft", None) else 1
        # with a draft, a verify step is (1 + k) decode rows per sequence through the same graphs
        self.runner.prepare_decode_graphs(self.max_model_len, self.engine_cfg.max_num_seqs * spec_rows)
        self.sampler = Sampler()
        # unseeded requests draw from this one generator: a restarted engine with the same seed reproduces them
        self.rng = seeded_generator(self.engine_cfg.seed, self.runner.device)
        self.sequences: dict[str, _Sequence] = {}
        self.children: dict[str, list[str]] = {}
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_overlapped_steps = 0  # steps launched before the previous one's tokens were read (async scheduling)
        self._in_flight: InFlight | None = None
        self._synchronous: set[str] = set()  # live sequences that need the synchronous step (engine/overlap.py)
        self.spec: SpeculativeDecoder | None = None
        k = self.engine_cfg.num_speculative_tokens
        if getattr(self.runner, "draft", None) is not None and k:
            self.spec = SpeculativeDecoder(
                self.runner, self.block_manager, k, self.max_model_len, self.tokenizer.eos_id
            )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, engine_cfg: EngineConfig | None = None) -> Engine:
        runner = ModelRunner.from_model_dir(model_dir, engine_cfg or EngineConfig())
        return cls(runner, Tokenizer.from_file(model_dir))

    def _scheduler_config(self) -> SchedulerConfig:
        cfg = self.engine_cfg
        budget = (
            cfg.max_num_batched_tokens
            if cfg.enable_chunked_prefill
            else max(cfg.max_num_batched_tokens, self.max_model_len)
        )
        return SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            long_prefill_token_threshold=cfg.long_prefill_token_threshold,
        )

    # ---- requests --------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        token_mask_factory: TokenMaskFactory | None = None,
        block_hash_extras: list[bytes | None] | None = None,
        images: list[ImageInput] | None = None,
    ) -> None:
        """Queues a request; with ``params.n > 1`` it fans out into n sequences sharing the prompt's cache.
        ``images`` fill the prompt's ``[IMG]`` slots in order; their content hashes key the prefix cache."""
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.runner.config.text.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for bad in (t for t in params.logit_bias if not 0 <= t < vocab):
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        mm = self._multimodal(list(prompt_token_ids), images) if images else None
        if mm is not None:
            block_hash_extras = mm.block_hash_extras(len(prompt_token_ids), self.runner.config.vision.tokens_per_image)
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        added: list[str] = []
        try:
            for index, seq_id in enumerate(ids):
                self._add_sequence(
                    seq_id, request_id, index, list(prompt_token_ids), params, token_mask_factory, mm, block_hash_extras
                )
                added.append(seq_id)
        except ValueError:
            for seq_id in added:
                self.scheduler.abort_request(seq_id)
                del self.sequences[seq_id]
                self._synchronous.discard(seq_id)
            raise
        self.children[request_id] = ids

    def _multimodal(self, prompt: list[int], images: list[ImageInput]) -> MultiModalInputs:
        vision = self.runner.config.vision
        if vision is None:
            raise ValueError("this model has no vision tower: images are not supported")
        return MultiModalInputs.build(prompt, images, vision.image_token_id, vision.tokens_per_image)

    def _add_sequence(self, seq_id, parent_id, index, prompt, params, mask_factory, mm, extras) -> None:
        request = Request(
            seq_id, prompt, params, eos_token_id=self.tokenizer.eos_id, block_hash_extras=extras, mm_inputs=mm
        )
        self.scheduler.add_request(request)
        generator = None
        if params.seed is not None:
            generator = seeded_generator(params.seed + index, self.runner.device)
        detok = IncrementalDetokenizer(self.tokenizer.token_bytes, self.tokenizer.is_special, params)
        token_mask = mask_factory() if mask_factory is not None else None
        self.sequences[seq_id] = _Sequence(request, parent_id, index, detok, generator, token_mask)
        if not overlaps(params, token_mask is not None):
            self._synchronous.add(seq_id)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Ends a request (all its n sequences) and frees its blocks now."""
        outputs = []
        for seq_id in self.children.pop(request_id, []):
            self.scheduler.abort_request(seq_id)
            self.sampler.release(seq_id)
            self._synchronous.discard(seq_id)
            if self.spec is not None:
                self.spec.release(seq_id)
            seq = self.sequences.pop(seq_id, None)
            if seq is not None:
                outputs.append(self._output(seq, [], "", []))
        step = self._in_flight
        if step is not None and all(r.is_finished for r in step.requests + [i.request for i in step.plan.scheduled]):
            self._in_flight = None  # nothing left to read back (the device may still finish it: nothing reads it)
        return outputs

    def has_unfinished(self) -> bool:
        """True while a request waits or runs, or a step's tokens are still in flight (async scheduling)."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs ready now. If any part of it raises (runner, sampler, a grammar
        hook, the detokenizer), the requests it held are ended and their blocks freed, and ``StepFailedError``
        names them: one bad batch must not take the requests that were not in it, or the engine, down with it.

        With ``EngineConfig.async_scheduling`` a step overlaps the previous one (engine/overlap.py) while every
        live sequence allows it: the call plans and launches the next step, then returns the previous step's
        outputs. When a sequence that needs the synchronous step is live, the call first only finishes the step in
        flight; the calls after it are synchronous until no such sequence is left."""
        if self._can_overlap():
            return self._overlapped_step()
        if self._in_flight is not None:
            return self._finish_in_flight()
        return self._synchronous_step()

    def _can_overlap(self) -> bool:
        return (
            self.engine_cfg.async_scheduling
            and self.spec is None
            and self.runner.supports_input_patch
            and not self._synchronous
        )

    def _synchronous_step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        parents = self._begin_step(plan)
        try:
            batch = self.runner.execute(plan)
            if self.spec is None:
                sampled = self._sample(batch.request_ids, batch.logits)
                self.scheduler.update_from_output(plan, {rid: tok for rid, (tok, _) in sampled.items()})
                return self._emit(plan, sampled)
            return self._speculative_step(plan, batch)
        except Exception as exc:
            for parent in parents:
                self.abort_request(parent)
            raise StepFailedError(parents, exc) from exc

    def _begin_step(self, plan: SchedulerOutput) -> list[str]:
        """Count a step about to run; its requests' parent ids, taken before running, so that a sequence that
        finishes inside a failing step is still named by ``StepFailedError``."""
        self.num_steps += 1
        self.num_preemptions += len(plan.preempted)
        seqs = [self.sequences.get(item.request.request_id) for item in plan.scheduled]
        return list(dict.fromkeys(s.parent_id for s in seqs if s is not None))

    # ---- async scheduling (engine/overlap.py) -----------------------------------------------------------
    def _overlapped_step(self) -> list[RequestOutput]:
        """Plan and launch the next step behind the one in flight, then read and emit the one in flight."""
        previous = self._in_flight
        plan = self.scheduler.schedule()
        self._in_flight = None if plan.is_empty else self._launch(plan, previous)
        return [] if previous is None else self._resolve(previous)

    def _launch(self, plan: SchedulerOutput, previous: InFlight | None) -> InFlight:
        """Stage, run and sample ``plan`` without reading anything back, and book it in the scheduler."""
        parents = self._begin_step(plan)
        try:
            plan.input_patch = self._input_patch(plan, previous)
            batch = self.runner.execute(plan)
            tokens = self._sample_on_device(batch.request_ids, batch.logits)
            self.scheduler.advance_in_flight(plan)
        except Exception as exc:
            # the step in flight is lost with it: its tokens would feed rows that no longer exist
            failed = list(dict.fromkeys(parents + (previous.parents if previous is not None else [])))
            self._in_flight = None
            for parent in failed:
                self.abort_request(parent)
            raise StepFailedError(failed, exc) from exc
        if previous is not None:
            self.num_overlapped_steps += 1
        requests = [self.sequences[rid].request for rid in batch.request_ids]
        return InFlight.launch(plan, batch.request_ids, requests, tokens, parents)

    def _input_patch(self, plan: SchedulerOutput, previous: InFlight | None) -> InputPatch | None:
        """The decode rows whose input token is a placeholder: the step in flight is sampling it."""
        items, rows = [], []
        row_of = previous.row_of() if previous is not None else {}
        for i, item in enumerate(plan.scheduled):
            req = item.request
            if req.num_pending_outputs and item.start >= req.num_tokens - req.num_pending_outputs:
                if item.num_new_tokens != 1 or req.request_id not in row_of:
                    raise RuntimeError(f"request {req.request_id!r} was scheduled over a token nobody is sampling")
                items.append(i)
                rows.append(row_of[req.request_id])
        return InputPatch(items, previous.tokens, rows) if items else None

    def _sample_on_device(self, request_ids: list[str], logits: torch.Tensor) -> torch.Tensor:
        """The overlapped step's sampler: tokens stay on the device (no logprobs, no masks, no penalties here)."""
        if not request_ids:
            return torch.zeros(0, dtype=torch.long, device=logits.device)
        return self.sampler.sample(logits, self._sampling_batch(request_ids))

    def _resolve(self, step: InFlight) -> list[RequestOutput]:
        """Read a launched step's tokens, apply them and emit; rows of requests ended meanwhile are dropped."""
        try:
            tokens = step.read()
            seqs, live = self.sequences, {}
            for rid, req, tok in zip(step.request_ids, step.requests, tokens, strict=True):
                seq = seqs.get(rid)
                if seq is not None and seq.request is req and not req.status.finished:
                    live[rid] = tok
            self.scheduler.resolve_in_flight(step.plan, live)
            return self._emit(step.plan, {rid: (tok, None) for rid, tok in live.items()})
        except Exception as exc:
            for parent in step.parents:
                self.abort_request(parent)
            raise StepFailedError(step.parents, exc) from exc

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Resolve the step in flight without launching another (the next step must be synchronous)."""
        step, self._in_flight = self._in_flight, None
        return self._resolve(step)

    def _speculative_step(self, plan: SchedulerOutput, batch) -> list[RequestOutput]:
        """The step's second half with a draft model: verify drafts (plain sampling for the other rows), let the
        scheduler accept, emit, then draft for the next step (small4/spec/runtime.py)."""
        verified = self.spec.verify(plan, batch.logits, self.sequences, self.rng)
        rows, ids, row = [], [], 0
        for item in plan.scheduled:
            if item.samples:
                if not item.draft_token_ids:
                    rows.append(row)
                    ids.append(item.request.request_id)
                row += 1 + len(item.draft_token_ids)
        logits = (
            batch.logits
            if len(rows) == row
            else batch.logits[torch.tensor(rows, dtype=torch.long, device=batch.logits.device)]
        )
        sampled = self._sample(ids, logits)
        tokens = {rid: toks for rid, (toks, _) in verified.items()} | {rid: t for rid, (t, _) in sampled.items()}
        before = {rid: self.sequences[rid].request.num_output_tokens for rid in verified}
        self.scheduler.update_from_output(plan, tokens)
        for rid, (toks, lps) in verified.items():  # a stop inside the accepted run drops the tokens after it
            n = self.sequences[rid].request.num_output_tokens - before[rid]
            verified[rid] = (toks[:n], lps[:n])
        outputs = self._emit(plan, sampled | verified)
        self.spec.propose(plan, batch, self.sequences, self.rng)
        return outputs

    def _sample(self, request_ids: list[str], logits: torch.Tensor) -> dict[str, tuple[int, TokenLogprobs | None]]:
        if not request_ids:
            return {}
        out = self.sampler(logits, self._sampling_batch(request_ids))
        logprobs = out.logprobs or [None] * len(request_ids)
        return {rid: (tok, lp) for rid, tok, lp in zip(request_ids, out.token_ids, logprobs, strict=True)}

    def _sampling_batch(self, request_ids: list[str]) -> SamplingBatch:
        seqs = [self.sequences[rid] for rid in request_ids]
        masks = [None if s.token_mask is None else _bind_mask(s.token_mask, s.request) for s in seqs]
        return SamplingBatch.from_lists(
            [s.request.sampling_params for s in seqs],
            prompt_token_ids=[s.request.prompt_token_ids for s in seqs],
            output_token_ids=[s.request.output_token_ids for s in seqs],
            generators=[s.generator for s in seqs],
            token_masks=masks,
            eos_token_id=self.tokenizer.eos_id,
            shared_generator=self.rng,
            keys=request_ids,
        )

    def _emit(self, plan: SchedulerOutput, sampled: dict[str, tuple[int, TokenLogprobs | None]]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for item in plan.scheduled:
            rid = item.request.request_id
            if rid not in sampled or rid not in self.sequences:
                continue
            seq = self.sequences[rid]
            token, logprob = sampled[rid]
            seq.first_token_time = seq.first_token_time or now
            if isinstance(token, list):  # a verified speculative run: one or more tokens
                tokens, lps, text = self._emit_run(seq, token, logprob)
            else:
                tokens, lps = [token], [logprob] if logprob is not None else []
                text = "" if _is_stop_token(seq.request, token) else seq.detokenizer.add(token)
                if seq.detokenizer.stopped is not None:
                    self._finish_by_stop_string(seq)
                elif seq.request.is_finished:
                    text += seq.detokenizer.flush()
            seq.logprobs.extend(lps)
            outputs.append(self._output(seq, tokens, text, lps))
            if item.draft_token_ids:
                outputs[-1].num_accepted_this_step = len(tokens) - 1
            if seq.request.is_finished:
                self._forget(seq)
        return outputs

    def _emit_run(self, seq: _Sequence, tokens: list[int], lps: list) -> tuple[list[int], list, str]:
        """Detokenize a run of tokens; a stop string inside it ends the sequence there (later tokens dropped)."""
        text = ""
        for n, token in enumerate(tokens):
            last = n == len(tokens) - 1
            text += "" if last and _is_stop_token(seq.request, token) else seq.detokenizer.add(token)
            if seq.detokenizer.stopped is not None:
                drop = len(tokens) - n - 1
                if drop:
                    del seq.request.output_token_ids[-drop:]
                self._finish_by_stop_string(seq)
                return tokens[: n + 1], lps[: n + 1], text
        if seq.request.is_finished:
            text += seq.detokenizer.flush()
        return tokens, lps, text

    def _finish_by_stop_string(self, seq: _Sequence) -> None:
        stop = seq.detokenizer.stopped
        if seq.request.is_finished:  # finished by length in the same step: the stop string explains it better
            seq.request.status, seq.request.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        else:
            self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_STOPPED, stop)

    def _forget(self, seq: _Sequence) -> None:
        del self.sequences[seq.request.request_id]
        self.sampler.release(seq.request.request_id)
        self._synchronous.discard(seq.request.request_id)
        if self.spec is not None:
            self.spec.release(seq.request.request_id)
        siblings = self.children.get(seq.parent_id, [])
        if all(s not in self.sequences for s in siblings):
            self.children.pop(seq.parent_id, None)

    @staticmethod
    def _output(seq: _Sequence, tokens: list[int], text: str, logprobs: list[TokenLogprobs]) -> RequestOutput:
        req = seq.request
        finished = req.is_finished
        return RequestOutput(
            request_id=seq.parent_id,
            index=seq.index,
            new_token_ids=tokens,
            new_text=text,
            finished=finished,
            finish_reason=req.status.value if finished else None,
            stop_reason=req.stop_reason if finished else None,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_prompt_tokens,
            num_draft_tokens=req.num_draft_tokens,
            num_accepted_draft_tokens=req.num_accepted_draft_tokens,
            num_verify_steps=req.num_verify_steps,
        )


def _is_stop_token(request: Request, token: int) -> bool:
    """EOS and stop token ids end a sequence without becoming part of its text (as in vLLM)."""
    if request.status is not RequestStatus.FINISHED_STOPPED:
        return False
    return token == request.eos_token_id or token == request.stop_reason


def _bind_mask(provider: TokenMaskProvider, request: Request) -> Callable[[], torch.Tensor | None]:
    return lambda: provider(request.output_token_ids)


class LLM:
    """Offline batch generation: ``LLM(model_dir).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model_dir: str | Path, engine_cfg: EngineConfig | None = None, **overrides) -> None:
        cfg = engine_cfg or EngineConfig(**overrides)
        self.engine = Engine.from_model_dir(model_dir, cfg)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        """The offline API over an engine built some other way (a runner with an in-process draft model)."""
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer, llm._counter = engine, engine.tokenizer, 0
        return llm

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Text prompts are encoded with BOS; token-id prompts are used as given. Results keep prompt order."""
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        results: dict[str, GenerationResult] = {}
        collected: dict[str, dict[int, CompletionOutput]] = {}
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, ids, p)
            results[rid] = GenerationResult(rid, ids, [])
            collected[rid] = {
                i: CompletionOutput(i, "", [], None, None, [] if p.logprobs is not None else None) for i in range(p.n)
            }
            order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                done = collected[out.request_id][out.index]
                done.text += out.new_text
                done.token_ids.extend(out.new_token_ids)
                if done.logprobs is not None:
                    done.logprobs.extend(out.logprobs)
                if out.finished:
                    done.finish_reason, done.stop_reason = out.finish_reason, out.stop_reason
                    results[out.request_id].num_cached_tokens = out.num_cached_tokens
        for rid in order:
            results[rid].outputs = [collected[rid][i] for i in sorted(collected[rid])]
        return [results[rid] for rid in order]
