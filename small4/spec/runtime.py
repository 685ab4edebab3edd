"""Speculative decoding inside the engine's one step loop: verify the drafts, accept, then draft the next ones.

A step with speculation (chain drafting, k drafts per sequence):

1. The scheduler grants a decoding sequence with drafts ``1 + k`` tokens: its last sampled token and the drafts,
   one prefill-like chunk in the same flat batch as everyone else's prefills and decodes; their cache slots were
   allocated through the block manager when the drafts were made (lookahead slots).
2. The target runs once over the batch. ``verify`` turns each chunk's k + 1 logits rows into the target's
   sampling distributions (every transform plain sampling applies, each row seeing the drafts before it as
   output: penalties, min_tokens, the grammar's mask) and accepts by rejection sampling (``rejection.py``).
3. The scheduler counts only accepted positions as computed (rejected slots are overwritten later; the prefix
   cache hashes only blocks of accepted tokens) and applies stop rules token by token.
4. ``propose`` runs the draft over every row the target just computed, with the same layout and slots ("catch
   up": row p pairs token p+1 with the target's hidden state at p, so the draft's cache follows the target's for
   every request, speculating or not, and prefix-cache hits find draft rows too), and at each speculating
   sequence's last accepted row proposes d_1; k - 1 single-row draft steps chain d_2..d_k.

A request speculates once its prompt is done (it has sampled), unless its params say ``speculative=False``.
Drafts are dropped on preemption (the recompute catches the draft up again). Tree drafting is not implemented:
with a 2-layer draft each chain step costs a full pass over the draft's weights, and a tree only pays when
acceptance is high and the batch is small; not measured here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from small4.engine.request import Request
from small4.engine.sampler import Sampler, SamplingBatch, TokenLogprobs, compute_logprobs
from small4.engine.scheduler import SchedulerOutput
from small4.engine.step_inputs import token_slice
from small4.model.context import AttentionMetadata
from small4.spec.rejection import rejection_sample, sampling_probs


@dataclass
class SpecStats:
    """Engine-wide speculation counters (metrics and bench read them)."""

    num_drafts: int = 0  # draft tokens verified
    num_accepted: int = 0  # of those, accepted
    num_verifies: int = 0  # sequence-steps that verified drafts

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying sequence-step (accepted drafts + the target's own token)."""
        return (self.num_accepted + self.num_verifies) / self.num_verifies if self.num_verifies else 0.0


MaskFn = Callable[[list[int]], "torch.Tensor | None"]


class SpeculativeDecoder:
    """Owns the proposals (the draft's distributions of the drafts a request holds) and the draft's steps; the
    runner owns the draft's weights and caches, the scheduler the drafts' tokens (``Request.draft_token_ids``)."""

    def __init__(self, runner, block_manager, num_tokens: int, max_model_len: int, eos_token_id: int | None) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_tokens}")
        self.runner = runner
        self.block_manager = block_manager
        self.k = num_tokens
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.sampler = Sampler()  # stateless use only: penalty counts from lists (rows see different prefixes)
        self.proposals: dict[str, torch.Tensor] = {}  # request id -> q [len(drafts), V]
        self.stats = SpecStats()

    @staticmethod
    def enabled(request: Request) -> bool:
        return getattr(request.sampling_params, "speculative", None) is not False

    def release(self, request_id: str) -> None:
        self.proposals.pop(request_id, None)

    # ---- verification ------------------------------------------------------------------------------------
    def verify(
        self, plan: SchedulerOutput, logits: torch.Tensor, seqs: Mapping[str, Any], rng: torch.Generator | None
    ) -> dict[str, tuple[list[int], list[TokenLogprobs]]]:
        """Accept or reject the drafts of every chunk that carries some. ``logits`` holds the step's sampled rows
        (``StepBatch.logits``); returns, per verifying request, the tokens it emits and their logprobs."""
        items, offsets, row = [], [], 0
        for item in plan.scheduled:
            if not item.samples:
                continue
            if item.draft_token_ids:
                items.append(item)
                offsets.append(row)
            row += 1 + len(item.draft_token_ids)
        if not items:
            return {}
        seq_of = [seqs[it.request.request_id] for it in items]
        rows = [o + j for o, it in zip(offsets, items, strict=True) for j in range(len(it.draft_token_ids) + 1)]
        raw = logits.index_select(0, _idx(rows, logits.device))  # [R, V]
        expanded = [
            (s, list(it.draft_token_ids[:j]))
            for s, it in zip(seq_of, items, strict=True)
            for j in range(len(it.draft_token_ids) + 1)
        ]
        masks = [m for s, it in zip(seq_of, items, strict=True) for m in _verify_masks(s, it.draft_token_ids)]
        probs = sampling_probs(self._process(raw, expanded, masks), [s.request.sampling_params for s, _ in expanded])
        N, k, V = len(items), max(len(it.draft_token_ids) for it in items), raw.shape[1]
        p = probs.new_zeros(N, k + 1, V)
        q = probs.new_zeros(N, k, V)
        drafts = torch.zeros(N, k, dtype=torch.long)
        device = probs.device
        uniforms, noise = torch.full((N, k), 0.5, device=device), torch.ones(N, V, device=device)
        r = 0
        for i, (s, it) in enumerate(zip(seq_of, items, strict=True)):
            m = len(it.draft_token_ids)
            p[i, : m + 1] = probs[r : r + m + 1]
            q[i, :m] = self.proposals.pop(it.request.request_id)[:m]
            drafts[i, :m] = torch.tensor(it.draft_token_ids)
            if not s.request.sampling_params.greedy:  # the row's own generator: seeded requests reproduce
                gen = s.generator if s.generator is not None else rng
                where = gen.device if gen is not None else device
                uniforms[i, :m] = torch.rand(m, generator=gen, device=where).to(device)
                draw = torch.empty(V, device=where).exponential_(generator=gen)
                noise[i] = draw.to(device).clamp_min_(torch.finfo(torch.float32).tiny)
            r += m + 1
        num = torch.tensor([len(it.draft_token_ids) for it in items], device=device)
        accepted, final = rejection_sample(p, q, drafts.to(device), num, uniforms, noise)
        return self._accepted(items, offsets, seq_of, raw, rows, accepted.tolist(), final.tolist())

    def _accepted(self, items, offsets, seq_of, raw, rows, accepted, final) -> dict:
        out: dict[str, tuple[list[int], list[TokenLogprobs]]] = {}
        emitted_rows, emitted_tokens, asks, num_lp = [], [], [], []
        r = 0
        for it, s, a, tok in zip(items, seq_of, accepted, final, strict=True):
            tokens = list(it.draft_token_ids[:a]) + [tok]
            out[it.request.request_id] = (tokens, [])
            if s.request.sampling_params.logprobs is not None:
                emitted_rows += range(r, r + a + 1)
                emitted_tokens += tokens
                asks.append((it.request.request_id, len(tokens)))
                num_lp += [s.request.sampling_params.logprobs] * len(tokens)
            r += len(it.draft_token_ids) + 1
            self.stats.num_drafts += len(it.draft_token_ids)
            self.stats.num_accepted += a
            self.stats.num_verifies += 1
        if emitted_rows:
            idx = _idx(emitted_rows, raw.device)
            lps = compute_logprobs(raw.index_select(0, idx), _idx(emitted_tokens, raw.device), num_lp)
            j = 0
            for rid, n in asks:
                out[rid][1].extend(lps[j : j + n])
                j += n
        return out

    def _process(self, raw: torch.Tensor, rows: list[tuple[Any, list[int]]], masks=None) -> torch.Tensor:
        """Masks, bias, min_tokens and penalties for rows that each see their own draft prefix as output."""
        if masks is None:
            masks = [None if s.token_mask is None else _bind(s.token_mask, s.request, d) for s, d in rows]
        batch = SamplingBatch.from_lists(
            [s.request.sampling_params for s, _ in rows],
            prompt_token_ids=[s.request.prompt_token_ids for s, _ in rows],
            output_token_ids=[s.request.output_token_ids + d for s, d in rows],
            generators=[s.generator for s, _ in rows],
            token_masks=masks,
            eos_token_id=self.eos_token_id,
        )
        return self.sampler.process_logits(raw, batch)

    # ---- drafting ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, plan: SchedulerOutput, batch, seqs: Mapping[str, Any], rng: torch.Generator | None) -> None:
        """Catch the draft up over this step's rows, then draft up to k tokens for each sequence that sampled
        and speculates (see the module docstring). Sets ``Request.draft_token_ids`` and keeps their q."""
        if batch.hidden is None or not plan.scheduled:
            return
        runner = self.runner
        qsl = batch.item_starts or batch.meta.query_start_loc  # each item's first row
        next_ids = torch.roll(batch.input_ids, -1)  # [T]: row t's next token, where it is in the chunk
        fix_rows, fix_tokens, out_rows, proposing = [], [], [], []
        for i, item in enumerate(plan.scheduled):
            req = item.request
            n_known = req.num_tokens - item.start  # this chunk's tokens that are now part of the sequence
            last = qsl[i] + min(item.num_new_tokens, n_known - 1) - 1  # the chunk's last row with a known next token
            if last < qsl[i]:
                continue
            fix_rows.append(last)
            fix_tokens.append(token_slice(req, item.start + last - qsl[i] + 1, item.start + last - qsl[i] + 2)[0])
            if item.samples and not req.is_finished and req.request_id in seqs and self.enabled(req):
                out_rows.append(last)
                proposing.append(req)
        next_ids[_idx(fix_rows, next_ids.device)] = _idx(fix_tokens, next_ids.device)
        images = _shifted_images(batch.images, qsl)
        hidden = runner.draft_forward(next_ids, batch.hidden, batch.positions, batch.meta, images)
        if not proposing:
            return
        budgets = [self._lookahead(req) for req in proposing]
        keep = [j for j, b in enumerate(budgets) if b > 0]
        if not keep:
            return
        proposing = [proposing[j] for j in keep]
        budgets = [budgets[j] for j in keep]
        h = hidden.index_select(0, _idx([out_rows[j] for j in keep], hidden.device))
        self._chain(proposing, budgets, h, seqs, rng)

    def _lookahead(self, req: Request) -> int:
        """Drafts this request may make now (0: none), with the slots of its next verify allocated."""
        params = req.sampling_params
        k = min(self.k, params.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens)
        new_blocks = self.block_manager.allocate_slots(req, 1 + k) if k > 0 else None
        if new_blocks is None:
            return 0
        req.block_ids.extend(new_blocks)  # the block manager hands blocks out; the request's progress is ours
        return k

    def _chain(self, reqs: list[Request], budgets: list[int], hidden: torch.Tensor, seqs, rng) -> None:
        """k draft steps: the first from the catch-up rows, the others one row per sequence through the draft."""
        runner = self.runner
        drafts: list[list[int]] = [[] for _ in reqs]
        qs: list[list[torch.Tensor]] = [[] for _ in reqs]
        active = list(range(len(reqs)))
        for j in range(max(budgets)):
            if j > 0:  # the row at position N - 2 + j pairs d_j (token N - 1 + j) with the draft's last hidden
                pos = [reqs[i].num_tokens - 2 + j for i in active]
                meta = _decode_meta([reqs[i] for i in active], pos, runner.block_size, runner.pad_block, hidden.device)
                ids = torch.tensor([drafts[i][-1] for i in active], device=hidden.device)
                hidden = runner.draft_forward(ids, hidden, torch.tensor(pos, device=hidden.device), meta)
            logits = runner.draft_logits(hidden)  # [A, V]: the target's lm_head on the draft's hidden
            rows = [(seqs[reqs[i].request_id], drafts[i]) for i in active]
            q = sampling_probs(self._process(logits, rows), [s.request.sampling_params for s, _ in rows])
            tokens = _draw(q, [s for s, _ in rows], rng)
            for a, i in enumerate(active):
                drafts[i].append(tokens[a])
                qs[i].append(q[a])
            still = [a for a, i in enumerate(active) if len(drafts[i]) < budgets[i]]
            active = [active[a] for a in still]
            if not active:
                break
            hidden = hidden.index_select(0, _idx(still, hidden.device))
        for req, d, q in zip(reqs, drafts, qs, strict=True):
            req.draft_token_ids = d
            self.proposals[req.request_id] = torch.stack(q)


def _bind(provider: MaskFn, request: Request, drafts: list[int]) -> Callable[[], torch.Tensor | None]:
    """The grammar mask after the output and ``drafts`` (the matcher advances over the drafts; it rolls back
    when the next call passes a shorter or different output)."""
    return lambda: provider(request.output_token_ids + drafts)


def _verify_masks(seq, drafts: tuple[int, ...]) -> list:
    """The grammar masks of a verify chunk's rows, computed now and in order: row j's after drafts d_1..d_j. A
    draft the previous row's mask forbids is certain to be rejected there, so the matcher is never fed it (it
    would fail for good); the rows after it get no mask (they are never used)."""
    if seq.token_mask is None:
        return [None] * (len(drafts) + 1)
    out, ok = [], True
    for j in range(len(drafts) + 1):
        mask = seq.token_mask(seq.request.output_token_ids + list(drafts[:j])) if ok else None
        out.append(None if mask is None else (lambda m=mask: m))
        if j < len(drafts) and mask is not None:
            ok = drafts[j] < mask.shape[0] and bool(mask[drafts[j]])
    return out


def _draw(q: torch.Tensor, seqs: list, rng: torch.Generator | None) -> list[int]:
    """One token per row from q [A, V]: greedy rows (one-hot q) by argmax, the others by the exponential race
    with the sequence's own generator (seeded requests stay reproducible), else the engine's."""
    out = q.argmax(dim=-1).tolist()
    for a, s in enumerate(seqs):
        if s.request.sampling_params.greedy:
            continue
        gen = s.generator if s.generator is not None else rng
        noise = torch.empty(q.shape[1], device=gen.device if gen else q.device).exponential_(generator=gen)
        noise = noise.to(q.device).clamp_min_(torch.finfo(noise.dtype).tiny)
        out[a] = int((q[a] / noise).argmax())
    return out


def _decode_meta(reqs: list[Request], positions: list[int], block_size: int, pad_block: int, device):
    """Metadata for one draft row per sequence at ``positions`` (its slot allocated by ``_lookahead``)."""
    slots = [r.block_ids[p // block_size] * block_size + p % block_size for r, p in zip(reqs, positions, strict=True)]
    width = max(len(r.block_ids) for r in reqs)
    tables = torch.full((len(reqs), width), pad_block, dtype=torch.int32)
    for i, r in enumerate(reqs):
        tables[i, : len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
    return AttentionMetadata(
        query_start_loc=list(range(len(reqs) + 1)),
        seq_lens=[p + 1 for p in positions],
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=tables.to(device),
        block_size=block_size,
    )


def _shifted_images(images, qsl: list[int]):
    """The target step's image rows moved to the draft's rows: draft row t embeds token t+1, so an [IMG] slot at
    row r is draft row r - 1 (inside its chunk; a slot that opens a chunk was embedded as the plain [IMG] token
    by the previous step's draft row, which only costs acceptance)."""
    if images is None:
        return None
    rows, embeds = images
    starts = set(qsl[:-1])
    keep = [j for j, r in enumerate(rows.tolist()) if r not in starts]
    if not keep:
        return None
    idx = _idx(keep, rows.device)
    return rows.index_select(0, idx) - 1, embeds.index_select(0, idx)


def _idx(values: list[int], device) -> torch.Tensor:
    """int64 indices on ``device`` (an empty list too)."""
    return torch.tensor(values, dtype=torch.long, device=device)
