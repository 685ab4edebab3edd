"""Logits -> next tokens for a whole batch: logits processors, greedy / random choice, and logprobs.

Every processor works on the full ``[B, V]`` tensor (or on the subset of rows that need it) so a step costs a
handful of kernels whatever the batch holds. Python loops run over rows only where the data is per request by
nature: building the small per-row parameter tensors, calling grammar mask providers, and drawing each seeded
row's noise from its own generator (which is what makes seeded sampling independent of batch composition).

Penalties need each sequence's token counts. Given ``SamplingBatch.keys`` (the engine passes its sequence ids),
the sampler keeps them on the device across steps (``PenaltyCounts``): the prompt's tokens are uploaded once,
then each step only the tokens a sequence gained since it was last counted. Without keys (tests, one-off calls)
the counts are built from the batch's lists, with the same values.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from small4.engine.sampling_params import SamplingParams
from small4.engine.step_inputs import upload

TokenMaskFn = Callable[[], torch.Tensor | None]
"""Grammar hook: returns a bool tensor ``[<= V]`` of allowed tokens for the next step, or None (no limit)."""

_NEG_INF = float("-inf")


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator; create it on the logits' device so the noise needs no copy.

    The whole 64-bit seed counts. CUDA's Philox generator takes all 64 bits; torch's CPU generator (mt19937) keeps
    only the low 32, so s and s + 2**32 would sample identically: a CPU seed outside [0, 2**32) gets its mt19937
    state filled from numpy's ``SeedSequence`` of the full seed instead (seeds inside keep torch's own seeding)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if generator.device.type == "cpu" and not 0 <= seed < 2**32:
        _seed_mt19937_whole(generator, seed % 2**64)
    return generator


_MT_WORDS = 624
_MT_STATE_OFFSET = 24  # torch's CPU generator state: u64 initial seed, i32 left, i32 seeded, u64 next, u64 words[624]


def _seed_mt19937_whole(generator: torch.Generator, seed: int) -> None:
    """Replace the 624 mt19937 state words of a freshly seeded CPU generator with words drawn from the full seed."""
    state = bytearray(generator.get_state().numpy().tobytes())
    initial, left, _, _ = struct.unpack_from("<QiiQ", state, 0)
    (first_word,) = struct.unpack_from("<Q", state, _MT_STATE_OFFSET)
    if initial != seed or left != 1 or first_word != seed & 0xFFFFFFFF:  # the layout this relies on changed
        raise RuntimeError("unexpected torch CPU generator state layout: cannot seed it with 64 bits")
    words = np.random.SeedSequence(seed).generate_state(_MT_WORDS, dtype=np.uint32).astype("<u8")
    state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_WORDS] = words.tobytes()
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())


@dataclass(frozen=True)
class SamplingBatch:
    """What the sampler needs to know about each row of the logits, as parallel lists (one entry per row).

    ``generators[i]`` must be the request's own generator, kept by the engine across steps (the sampler only
    advances it); a non-greedy row whose params carry a seed must have one, or the seed would be ignored.
    ``eos_token_ids[i]`` is banned under ``min_tokens`` and is the fallback when a grammar masks everything.
    ``shared_generator`` (the engine's, seeded with its ``seed``) draws the noise of the unseeded rows, so a
    restarted engine given the same requests samples the same tokens; None uses torch's global RNG.
    """

    params: list[SamplingParams]
    prompt_token_ids: list[Sequence[int]]
    output_token_ids: list[Sequence[int]]
    generators: list[torch.Generator | None]
    token_masks: list[TokenMaskFn | None]
    eos_token_ids: list[int | None]
    shared_generator: torch.Generator | None = None
    keys: list[str] | None = None  # one stable id per row (the sequence's): penalty counts persist under it

    def __post_init__(self) -> None:
        n = len(self.params)
        if self.keys is not None and len(self.keys) != n:
            raise ValueError("every SamplingBatch field needs one entry per row")
        fields = (
            self.prompt_token_ids,
            self.output_token_ids,
            self.generators,
            self.token_masks,
            self.eos_token_ids,
        )
        if any(len(f) != n for f in fields):
            raise ValueError("every SamplingBatch field needs one entry per row")
        for i, p in enumerate(self.params):
            if p.seed is not None and not p.greedy and self.generators[i] is None:
                raise ValueError(f"row {i} is seeded but has no generator")
            if self.token_masks[i] is not None and self.eos_token_ids[i] is None:
                raise ValueError(f"row {i} has a token mask but no eos id to fall back to")

    def __len__(self) -> int:
        return len(self.params)

    @classmethod
    def from_lists(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        token_masks: Sequence[TokenMaskFn | None] | None = None,
        eos_token_id: int | None | Sequence[int | None] = None,
        shared_generator: torch.Generator | None = None,
        keys: Sequence[str] | None = None,
    ) -> SamplingBatch:
        """Build a batch; omitted lists default to empty token lists / no generator / no mask.

        ``eos_token_id`` may be one id shared by every row or one per row.
        """
        n = len(params)
        eos = [eos_token_id] * n if eos_token_id is None or isinstance(eos_token_id, int) else eos_token_id
        return cls(
            params=list(params),
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else [[]] * n,
            output_token_ids=list(output_token_ids) if output_token_ids is not None else [[]] * n,
            generators=list(generators) if generators is not None else [None] * n,
            token_masks=list(token_masks) if token_masks is not None else [None] * n,
            eos_token_ids=list(eos),
            shared_generator=shared_generator,
            keys=list(keys) if keys is not None else None,
        )


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's (raw logits) view of one sampled token: its logprob, rank (1 = most likely), top-k."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplerOutput:
    """``logprobs`` is None when no row asked, else one entry per row (None for the rows that did not ask)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None


class Sampler:
    """Turns one step's logits into one token per row. The only state kept across calls is ``penalties``: the
    device-side token counts of penalised sequences, by the batch's keys (``release`` a key when it ends)."""

    def __init__(self) -> None:
        self.penalties = PenaltyCounts()

    def release(self, key: str) -> None:
        """Forget a sequence's penalty counts (it finished or was aborted)."""
        self.penalties.release(key)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"logits {tuple(logits.shape)} do not match a batch of {len(batch)} rows")
        raw = logits.float()  # [B, V]
        tokens = self.sample(raw, batch)  # [B]
        logprobs = compute_logprobs(raw, tokens, [p.logprobs for p in batch.params])
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The chosen tokens as a device tensor [B], with no host sync: what the engine's overlap loop launches
        (the next step's decode rows read their input from it on the device; the host reads it back later)."""
        return _choose_tokens(self.process_logits(logits.float(), batch), batch)

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Mask, bias, min_tokens and penalties, on a copy (the float32 logits themselves when no row has any);
        the order is the one users' params assume."""
        vocab = logits.shape[1]
        if not _needs_processing(batch):  # nothing to apply: no [B, V] copy (every decode step of plain sampling)
            return logits.float()
        x = logits.float().clone()  # [B, V]
        masked = apply_token_masks(x, batch.token_masks)
        apply_logit_bias(x, batch.params, vocab)
        banned = apply_min_tokens(x, batch)
        apply_repetition_penalty(x, batch, self.penalties)
        apply_presence_frequency_penalties(x, batch, self.penalties)
        if masked or banned:
            x = _fall_back_to_eos(x, batch.eos_token_ids)
        return x


def _needs_processing(batch: SamplingBatch) -> bool:
    """Whether any row has a mask, a bias, a pending min_tokens ban or a penalty."""
    for i, p in enumerate(batch.params):
        if batch.token_masks[i] is not None or p.logit_bias or p.repetition_penalty != 1.0:
            return True
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            return True
        if p.min_tokens and len(batch.output_token_ids[i]) < p.min_tokens:
            return True
    return False


def _rows_tensor(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return upload(rows, torch.long, device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return upload(values, torch.float32, device)[:, None]  # [R, 1]


def apply_token_masks(logits: torch.Tensor, masks: Sequence[TokenMaskFn | None]) -> bool:
    """Grammar constraint: disallowed tokens -> -inf, in place. A mask shorter than V disallows the tail
    (the tokenizer's vocabulary may be smaller than the padded lm_head). Returns whether a row was masked."""
    vocab = logits.shape[1]
    rows: list[int] = []
    allowed: list[torch.Tensor] = []
    for i, provider in enumerate(masks):
        mask = provider() if provider is not None else None
        if mask is None:
            continue
        if mask.dim() != 1 or mask.shape[0] > vocab:
            raise ValueError(f"token mask for row {i} has shape {tuple(mask.shape)}, vocab is {vocab}")
        full = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        full[: mask.shape[0]] = mask.to(device=logits.device, dtype=torch.bool)
        rows.append(i)
        allowed.append(full)
    if not rows:
        return False
    idx = _rows_tensor(rows, logits.device)
    sub = logits.index_select(0, idx).masked_fill_(~torch.stack(allowed), _NEG_INF)  # [M, V]
    logits.index_copy_(0, idx, sub)
    return True


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams], vocab: int) -> None:
    """OpenAI logit_bias: add each row's bias to its tokens, in place, with one scatter for the batch."""
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if not 0 <= token < vocab:
                raise ValueError(f"logit_bias token {token} is outside the vocabulary ({vocab})")
            rows.append(i)
            cols.append(token)
            vals.append(bias)
    if rows:
        device = logits.device
        values = upload(vals, logits.dtype, device)
        logits.index_put_((_rows_tensor(rows, device), _rows_tensor(cols, device)), values, accumulate=True)


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> bool:
    """Until a row has ``min_tokens`` outputs, its eos and stop_token_ids cannot be sampled. Returns whether
    anything was banned (so the caller knows a row may have lost every token)."""
    vocab = logits.shape[1]
    rows, cols = [], []
    for i, p in enumerate(batch.params):
        if len(batch.output_token_ids[i]) >= p.min_tokens:
            continue
        eos = batch.eos_token_ids[i]
        for token in {*p.stop_token_ids, *([eos] if eos is not None else [])}:
            if 0 <= token < vocab:
                rows.append(i)
                cols.append(token)
    if rows:
        logits[_rows_tensor(rows, logits.device), _rows_tensor(cols, logits.device)] = _NEG_INF
    return bool(rows)


def _token_counts(token_lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How many times each token occurs in each list: ``[R, V]`` float, built with one scatter-add."""
    lengths = [len(t) for t in token_lists]
    flat = _rows_tensor(list(itertools.chain.from_iterable(token_lists)), device)
    row_of = torch.repeat_interleave(
        torch.arange(len(token_lists), device=device), _rows_tensor(lengths, device)
    )  # [sum(lengths)]
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)  # [R, V]
    counts.index_put_((row_of, flat), torch.ones_like(flat, dtype=torch.float32), accumulate=True)
    return counts


class PenaltyCounts:
    """Per-sequence token counts on the device, kept across steps: a sequence's row holds whether each token is in
    its prompt and how often it is in its output. A row is filled from the prompt once; afterwards a step uploads
    only the output tokens added since the last count (one flat upload and one scatter for all rows), never the
    whole history. Rows live in two pools that double when full; a released row is reused."""

    def __init__(self) -> None:
        self._rows: dict[str, list] = {}  # key -> [pool row, output tokens counted, the prompt list counted]
        self._free: list[int] = []
        self._prompt: torch.Tensor | None = None  # bool [rows, V]
        self._output: torch.Tensor | None = None  # float32 [rows, V]

    def release(self, key: str) -> None:
        entry = self._rows.pop(key, None)
        if entry is not None:
            self._free.append(entry[0])

    def _grow(self, need: int, vocab: int, device: torch.device) -> None:
        have = 0 if self._output is None else self._output.shape[0]
        if self._output is not None and (self._output.shape[1] != vocab or self._output.device != device):
            self._rows.clear()  # another model: start over
            self._free, have, self._output = [], 0, None
        if need <= len(self._free):
            return
        rows = max(need - len(self._free) + have, 2 * have, 8)
        prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        output = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        if have:
            prompt[:have], output[:have] = self._prompt, self._output
        self._prompt, self._output = prompt, output
        self._free.extend(range(have, rows))

    def rows(self, batch: SamplingBatch, rows: list[int], vocab: int, device: torch.device) -> torch.Tensor:
        """The pool rows [R] of batch rows ``rows``, brought up to date with their prompts and outputs."""
        keys = batch.keys
        self._grow(sum(1 for i in rows if keys[i] not in self._rows), vocab, device)
        pool_rows, new_rows, new_ids, add_rows, add_ids = [], [], [], [], []
        for i in rows:
            entry = self._rows.get(keys[i])
            outputs = batch.output_token_ids[i]
            prompt = batch.prompt_token_ids[i]
            if entry is not None and (entry[1] > len(outputs) or entry[2] is not prompt):  # not the same sequence
                self.release(keys[i])
                entry = None
            if entry is None:
                entry = self._rows[keys[i]] = [self._free.pop(), 0, prompt]
                self._prompt[entry[0]].zero_()
                self._output[entry[0]].zero_()
                new_rows += [entry[0]] * len(prompt)
                new_ids += prompt
            tail = outputs[entry[1] :]
            add_rows += [entry[0]] * len(tail)
            add_ids += tail
            entry[1] = len(outputs)
            pool_rows.append(entry[0])
        if new_ids:
            self._prompt[_rows_tensor(new_rows, device), _rows_tensor(new_ids, device)] = True
        if add_ids:
            idx = (_rows_tensor(add_rows, device), _rows_tensor(add_ids, device))
            self._output.index_put_(idx, torch.ones(len(add_ids), device=device), accumulate=True)
        return _rows_tensor(pool_rows, device)

    def seen(self, pool_rows: torch.Tensor) -> torch.Tensor:
        """bool [R, V]: the token is in the prompt or the output."""
        return self._prompt.index_select(0, pool_rows) | (self._output.index_select(0, pool_rows) > 0)

    def output_counts(self, pool_rows: torch.Tensor) -> torch.Tensor:
        """float32 [R, V]: occurrences in the output."""
        return self._output.index_select(0, pool_rows)


def apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch, state: PenaltyCounts | None = None) -> None:
    """HF/vLLM repetition penalty over prompt + output tokens: positive logits divided by it, negative
    multiplied, so a penalty > 1 always makes a seen token less likely. Only rows that use it pay for it."""
    rows = [i for i, p in enumerate(batch.params) if p.repetition_penalty != 1.0]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    if state is not None and batch.keys is not None:
        seen = state.seen(state.rows(batch, rows, vocab, device))  # [R, V]
    else:
        seen_lists = [[*batch.prompt_token_ids[i], *batch.output_token_ids[i]] for i in rows]
        seen = _token_counts(seen_lists, vocab, device) > 0  # [R, V]
    penalty = _column([batch.params[i].repetition_penalty for i in rows], device)  # [R, 1]
    idx = _rows_tensor(rows, device)
    sub = logits.index_select(0, idx)  # [R, V]
    penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits.index_copy_(0, idx, torch.where(seen, penalised, sub))


def apply_presence_frequency_penalties(
    logits: torch.Tensor, batch: SamplingBatch, state: PenaltyCounts | None = None
) -> None:
    """OpenAI penalties over output tokens only: ``logit -= frequency * count + presence * (count > 0)``."""
    rows = [i for i, p in enumerate(batch.params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    if state is not None and batch.keys is not None:
        counts = state.output_counts(state.rows(batch, rows, vocab, device))  # [R, V]
    else:
        counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)  # [R, V]
    freq = _column([batch.params[i].frequency_penalty for i in rows], device)  # [R, 1]
    pres = _column([batch.params[i].presence_penalty for i in rows], device)  # [R, 1]
    idx = _rows_tensor(rows, device)
    sub = logits.index_select(0, idx) - (freq * counts + pres * (counts > 0))  # [R, V]
    logits.index_copy_(0, idx, sub)


def _fall_back_to_eos(logits: torch.Tensor, eos_token_ids: Sequence[int | None]) -> torch.Tensor:
    """A row with every token at -inf would sample NaN; force its eos instead (without a host sync)."""
    device = logits.device
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)  # [B, 1]
    eos = _rows_tensor([e if e is not None else 0 for e in eos_token_ids], device)[:, None]  # [B, 1]
    only_eos = torch.full_like(logits, _NEG_INF).scatter_(1, eos, 0.0)  # [B, V]
    return torch.where(dead, only_eos, logits)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` best tokens (``top_k >= V`` disables), then the smallest prefix of those
    whose renormalised mass reaches ``top_p``. The best token always survives. One sort for the batch."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    position = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    sorted_logits = sorted_logits.masked_fill(position >= top_k[:, None], _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's best probability."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def _exponential_noise(batch: SamplingBatch, rows: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """``Exp(1)`` noise ``[B, V]`` for the sampled rows: each seeded row from its own generator (so its draw
    does not depend on who else is in the batch), the unseeded ones in one draw from the shared generator (the
    engine's, seeded by its config; the global RNG when None)."""
    shared = [i for i in rows if batch.generators[i] is None]
    if len(shared) == len(batch):  # every row from the shared generator: the one draw is the noise
        noise = torch.empty(len(batch), vocab, device=device).exponential_(generator=batch.shared_generator)  # [B, V]
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    noise = torch.ones(len(batch), vocab, device=device)  # [B, V]
    if shared:
        draw = torch.empty(len(shared), vocab, device=device).exponential_(generator=batch.shared_generator)
        noise[_rows_tensor(shared, device)] = draw
    for i in rows:
        generator = batch.generators[i]
        if generator is None:
            continue
        if generator.device == noise.device:  # drawn in place into its row: one kernel per seeded row, not two
            noise[i].exponential_(generator=generator)
        else:
            noise[i] = torch.empty(vocab, device=generator.device).exponential_(generator=generator).to(device)
    # Exp(1) can round to 0, which would turn a zero probability into 0/0 = NaN and win the argmax.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _choose_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Greedy rows take the argmax (ties -> lowest id); the others are sampled after temperature and the
    top-k / top-p / min-p filters, by the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``."""
    params = batch.params
    greedy_argmax = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_argmax
    device, vocab = logits.device, logits.shape[1]
    # every per-row parameter in one upload: [5, B] = temperature, top_k, top_p, min_p, greedy
    rows = [
        [1.0 if p.greedy else p.temperature for p in params],
        [p.top_k if p.top_k > 0 else vocab for p in params],
        [p.top_p for p in params],
        [p.min_p for p in params],
        [float(p.greedy) for p in params],
    ]
    table = upload(rows, torch.float32, device)
    x = logits / table[0][:, None]  # [B, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        x = apply_top_k_top_p(x, table[1].long(), table[2])
    if any(p.min_p > 0.0 for p in params):
        x = apply_min_p(x, table[3])
    probs = x.softmax(dim=-1)  # [B, V]
    sampled = (probs / _exponential_noise(batch, sampled_rows, vocab, device)).argmax(dim=-1)  # [B]
    is_greedy = table[4] > 0
    return torch.where(is_greedy, greedy_argmax, sampled)


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: Sequence[int | None]
) -> list[TokenLogprobs | None] | None:
    """Logprobs of the model's own distribution (log_softmax of the raw logits, before any processor) for the
    rows that asked: the chosen token's logprob and rank, and the top ``num_logprobs`` alternatives."""
    rows = [i for i, k in enumerate(num_logprobs) if k is not None]
    if not rows:
        return None
    idx = _rows_tensor(rows, raw_logits.device)
    logprobs = raw_logits.index_select(0, idx).float().log_softmax(dim=-1)  # [R, V]
    chosen_ids = token_ids.index_select(0, idx)  # [R]
    chosen = logprobs.gather(1, chosen_ids[:, None])  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [R]
    k_max = max(num_logprobs[i] or 0 for i in rows)
    top_values, top_ids = logprobs.topk(k_max, dim=-1)  # [R, k_max]
    chosen_l, ranks_l, ids_l = chosen.squeeze(1).tolist(), ranks.tolist(), chosen_ids.tolist()
    top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
    out: list[TokenLogprobs | None] = [None] * len(num_logprobs)
    for j, i in enumerate(rows):
        k = num_logprobs[i] or 0
        top = list(zip(top_ids_l[j][:k], top_values_l[j][:k], strict=True))
        out[i] = TokenLogprobs(token_id=ids_l[j], logprob=chosen_l[j], rank=ranks_l[j], top=top)
    return out
