"""Sampler tests: each processor against a plain per-row reference, support restrictions by sampling, seeded
batch invariance, and logprobs against log_softmax of the raw logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from small4.engine.sampler import Sampler, SamplingBatch, seeded_generator
from small4.engine.sampling_params import SamplingParams

VOCAB = 32
EOS = 2


def _logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0  # [B, V]


def _sample_support(logits_row: torch.Tensor, params: SamplingParams, draws: int = 2000) -> set[int]:
    """Sample ``draws`` times (as a batch of identical rows) and return the set of tokens that appeared."""
    batch = SamplingBatch.from_lists([params] * draws, eos_token_id=EOS)
    torch.manual_seed(1234)
    out = Sampler()(logits_row.expand(draws, -1).clone(), batch)
    return set(out.token_ids)


def test_greedy_is_argmax_and_ties_pick_lowest_id() -> None:
    logits = _logits(5)
    logits[3, 7] = logits[3, 11] = logits[3].max() + 1.0
    batch = SamplingBatch.from_lists([SamplingParams(temperature=0.0)] * 5)
    out = Sampler()(logits, batch)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs is None


def test_top_k_restricts_support() -> None:
    row = _logits(1)[0]
    support = _sample_support(row, SamplingParams(temperature=2.0, top_k=3))
    assert support == set(row.topk(3).indices.tolist())


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    row = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))  # sorted: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
    assert _sample_support(row, SamplingParams(top_p=0.7)) == {1, 3}
    assert _sample_support(row, SamplingParams(top_p=0.85)) == {1, 3, 2}
    assert _sample_support(row, SamplingParams(top_p=0.3)) == {1}
    assert _sample_support(row, SamplingParams(top_p=1.0)) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    row = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    assert _sample_support(row, SamplingParams(min_p=0.2)) == {1, 2, 3}  # threshold 0.1
    assert _sample_support(row, SamplingParams(min_p=0.5)) == {1, 3}  # threshold 0.25


def test_temperature_matches_softmax_frequencies() -> None:
    row = torch.tensor([1.0, 0.0, -1.0, 0.5])
    draws = 20000
    for temperature in (0.5, 2.0):
        batch = SamplingBatch.from_lists([SamplingParams(temperature=temperature)] * draws)
        torch.manual_seed(0)
        counts = Counter(Sampler()(row.expand(draws, -1).clone(), batch).token_ids)
        freq = torch.tensor([counts[t] / draws for t in range(4)])
        assert torch.allclose(freq, (row / temperature).softmax(-1), atol=0.015)
    tiny = _sample_support(row, SamplingParams(temperature=1e-4))
    assert tiny == {0}


def _reference_process(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Per-row, per-token reference of bias + min_tokens + repetition + presence/frequency penalties."""
    out = logits.clone()
    for i, p in enumerate(batch.params):
        x = out[i]
        for token, bias in p.logit_bias.items():
            x[token] += bias
        if len(batch.output_token_ids[i]) < p.min_tokens:
            for token in [*p.stop_token_ids, batch.eos_token_ids[i]]:
                x[token] = float("-inf")
        for token in set(batch.prompt_token_ids[i]) | set(batch.output_token_ids[i]):
            if x[token] > 0:
                x[token] = x[token] / p.repetition_penalty
            else:
                x[token] = x[token] * p.repetition_penalty
        for token, count in Counter(batch.output_token_ids[i]).items():
            x[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_bias_and_min_tokens_match_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(),
        SamplingParams(
            repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=1.2, logit_bias={4: 5.0, 9: -3.0}
        ),
        SamplingParams(min_tokens=5, stop_token_ids=(6, 8), logit_bias={0: 1.0}),
    ]
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 3, 5, 9, 2)]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 10, 0, 6, 3)]
    batch = SamplingBatch.from_lists(params, prompts, outputs, eos_token_id=EOS)
    logits = _logits(len(params), seed=5)
    got = Sampler().process_logits(logits, batch)
    torch.testing.assert_close(got, _reference_process(logits, batch), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[2], logits[2])


def test_logit_bias_moves_greedy_choice() -> None:
    logits = _logits(1)
    target = int(logits[0].argmin())
    batch = SamplingBatch.from_lists([SamplingParams(temperature=0.0, logit_bias={target: 100.0})])
    assert Sampler()(logits, batch).token_ids == [target]


def test_min_tokens_bans_eos_then_allows_it() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 5], logits[0, 9] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    sampler = Sampler()
    early = SamplingBatch.from_lists([params], output_token_ids=[[1, 1]], eos_token_id=EOS)
    assert sampler(logits, early).token_ids == [9]
    done = SamplingBatch.from_lists([params], output_token_ids=[[1, 1, 1]], eos_token_id=EOS)
    assert sampler(logits, done).token_ids == [EOS]


def _run_steps(rows: list[tuple[SamplingParams, int]], steps: int) -> list[list[int]]:
    """Sample ``steps`` times; row r's logits at step s depend only on (its logits seed, s)."""
    gens = [seeded_generator(p.seed) if p.seed is not None else None for p, _ in rows]
    batch = SamplingBatch.from_lists([p for p, _ in rows], generators=gens)
    tokens: list[list[int]] = [[] for _ in rows]
    for step in range(steps):
        logits = torch.cat([_logits(1, seed=key * 100 + step) for _, key in rows])  # [B, V]
        for r, token in enumerate(Sampler()(logits, batch).token_ids):
            tokens[r].append(token)
    return tokens


def test_seeded_rows_are_batch_invariant() -> None:
    a = (SamplingParams(temperature=1.5, seed=11), 1)
    b = (SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=22), 2)
    unseeded = (SamplingParams(temperature=1.0), 3)
    greedy = (SamplingParams(temperature=0.0, seed=5), 4)
    alone_a = _run_steps([a], 8)[0]
    alone_b = _run_steps([b], 8)[0]
    mixed = _run_steps([unseeded, b, greedy, a], 8)
    assert mixed[3] == alone_a and mixed[1] == alone_b
    reordered = _run_steps([a, greedy, b, unseeded, unseeded], 8)
    assert reordered[0] == alone_a and reordered[2] == alone_b
    assert len(set(alone_a)) > 1  # it really samples


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k() -> None:
    logits = _logits(4)
    params = [
        SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0, logit_bias={0: 50.0}),
        SamplingParams(temperature=1.0, logprobs=0, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, logprobs=3, top_k=4, seed=2),
    ]
    generators = [None, seeded_generator(1), None, seeded_generator(2)]
    batch = SamplingBatch.from_lists(params, prompt_token_ids=[[0, 1, 2]] * 4, generators=generators)
    before = logits.clone()
    out = Sampler()(logits, batch)
    assert torch.equal(logits, before)  # the caller's logits are never modified
    assert out.logprobs is not None and out.logprobs[2] is None
    expected = logits.log_softmax(-1)
    for i in (0, 1, 3):
        entry = out.logprobs[i]
        assert entry is not None
        token = out.token_ids[i]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[i, token]), abs=1e-5)
        assert entry.rank == int((expected[i] > expected[i, token]).sum()) + 1
        k = params[i].logprobs
        order = expected[i].argsort(descending=True)[:k].tolist()
        assert [t for t, _ in entry.top] == order
        for t, lp in entry.top:
            assert lp == pytest.approx(float(expected[i, t]), abs=1e-5)
    assert out.token_ids[0] == 0 and out.logprobs[0].rank > 1  # bias chose it, logprob is the model's
    assert out.logprobs[1].top == []


def test_token_mask_restricts_support() -> None:
    row = _logits(1)[0]
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[3, 7, 9]] = True
    draws = 500
    batch = SamplingBatch.from_lists(
        [SamplingParams(temperature=3.0)] * draws, token_masks=[lambda: allowed] * draws, eos_token_id=EOS
    )
    torch.manual_seed(0)
    assert set(Sampler()(row.expand(draws, -1).clone(), batch).token_ids) == {3, 7, 9}
    greedy = SamplingBatch.from_lists(
        [SamplingParams(temperature=0.0)], token_masks=[lambda: allowed], eos_token_id=EOS
    )
    best = max((3, 7, 9), key=lambda t: float(row[t]))
    assert Sampler()(row[None], greedy).token_ids == [best]


def test_short_mask_disallows_tail_and_none_mask_is_unconstrained() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, VOCAB - 1] = 10.0
    short = torch.ones(VOCAB - 4, dtype=torch.bool)
    batch = SamplingBatch.from_lists(
        [SamplingParams(temperature=0.0)] * 2, token_masks=[lambda: short, lambda: None], eos_token_id=EOS
    )
    tokens = Sampler()(logits, batch).token_ids
    assert tokens[0] < VOCAB - 4 and tokens[1] == VOCAB - 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_all_masked_falls_back_to_eos(temperature: float) -> None:
    nothing = torch.zeros(VOCAB, dtype=torch.bool)
    only_eos = torch.zeros(VOCAB, dtype=torch.bool)
    only_eos[EOS] = True
    params = [
        SamplingParams(temperature=temperature),
        SamplingParams(temperature=temperature, min_tokens=4),  # grammar wants eos, min_tokens bans it
        SamplingParams(temperature=temperature),
    ]
    batch = SamplingBatch.from_lists(params, token_masks=[lambda: nothing, lambda: only_eos, None], eos_token_id=EOS)
    torch.manual_seed(0)
    out = Sampler()(_logits(3), batch)
    assert out.token_ids[:2] == [EOS, EOS]


def test_batch_validation() -> None:
    with pytest.raises(ValueError, match="generator"):
        SamplingBatch.from_lists([SamplingParams(seed=3)])
    SamplingBatch.from_lists([SamplingParams(seed=3, temperature=0.0)])  # greedy needs no generator
    with pytest.raises(ValueError, match="eos"):
        SamplingBatch.from_lists([SamplingParams()], token_masks=[lambda: None])
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingBatch.from_lists([SamplingParams()], output_token_ids=[[], []])
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler()(_logits(1), SamplingBatch.from_lists([SamplingParams(logit_bias={VOCAB: 1.0})]))


def test_seeded_generator_uses_the_whole_64_bit_seed() -> None:
    def draw(seed: int) -> list[float]:
        return torch.rand(8, generator=seeded_generator(seed)).tolist()

    assert draw(5) == torch.rand(8, generator=torch.Generator().manual_seed(5)).tolist()  # 32-bit seeds: torch's own
    assert draw(5 + 2**32) == draw(5 + 2**32) != draw(5)
    assert len({tuple(draw(s)) for s in (-1, -(2**63), 2**63 - 1, 2**40, 2**40 + 1)}) == 5


def test_shared_generator_draws_the_unseeded_rows() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # [B, V]
    params = [SamplingParams(temperature=1.0)] * 3

    def sample(seed: int) -> list[int]:
        batch = SamplingBatch.from_lists(params, shared_generator=seeded_generator(seed))
        return [Sampler()(logits, batch).token_ids for _ in range(4)]

    assert sample(1) == sample(1) != sample(2)
