"""The rejection sampler: emitted tokens are distributed as the target's p whatever the draft's q (chi-square over
many seeded draws), greedy rows emit exactly the target's argmax run, and ``sampling_probs`` is what plain sampling
draws from."""

import torch

from small4.engine.sampler import Sampler, SamplingBatch
from small4.engine.sampling_params import SamplingParams
from small4.spec.rejection import rejection_sample, sampling_probs

# chi-square critical values at p = 0.001 (the test fails by chance once in a thousand runs per check; seeded)
CRITICAL_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def draw(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(q, 1, generator=g).squeeze(-1)


def test_emitted_tokens_follow_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, k, N = 8, 3, 40000
    p = torch.rand(k + 1, V, generator=g) ** 2
    p = (p / p.sum(-1, keepdim=True)).clamp_min(1e-3)
    p = p / p.sum(-1, keepdim=True)  # every token possible: the expected counts stay large
    q = torch.rand(k, V, generator=g) ** 3
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack([draw(q[j].expand(N, V), g) for j in range(k)], dim=1)  # [N, k]: d_j ~ q_j
    uniforms = torch.rand(N, k, generator=g)
    noise = torch.empty(N, V).exponential_(generator=g)
    accepted, final = rejection_sample(
        p.expand(N, k + 1, V), q.expand(N, k, V), drafts, torch.full((N,), k), uniforms, noise
    )
    emitted = torch.cat([drafts, torch.zeros(N, 1, dtype=torch.long)], dim=1)
    emitted[torch.arange(N), accepted] = final  # [N, k+1]: position j valid where j <= accepted
    for j in range(k + 1):  # the target's p here does not depend on the prefix, so each position is p_j
        rows = accepted >= j
        assert rows.sum() > 2000
        assert chi_square(emitted[rows, j], p[j]) < CRITICAL_001[7], j
    # and the rule does reject: with q far from p, some but not all drafts survive
    assert 0 < accepted.float().mean() < k


def test_a_draft_equal_to_the_target_is_always_accepted():
    g = torch.Generator().manual_seed(1)
    V, N = 6, 5000
    p = torch.softmax(torch.randn(V, generator=g), -1)
    drafts = draw(p.expand(N, V), g)[:, None]
    accepted, final = rejection_sample(
        p.expand(N, 2, V),
        p.expand(N, 1, V),
        drafts,
        torch.ones(N, dtype=torch.long),
        torch.rand(N, 1, generator=g),
        torch.empty(N, V).exponential_(generator=g),
    )
    assert bool((accepted == 1).all())
    assert chi_square(final, p) < CRITICAL_001[5]


def test_greedy_one_hot_rows_accept_exactly_the_matching_prefix():
    V = 10
    target = torch.tensor([3, 5, 7, 2])  # the target's argmax at positions 0..3
    p = torch.zeros(3, 4, V)
    p[:, torch.arange(4), target] = 1.0
    drafts = torch.tensor([[3, 5, 7], [3, 4, 7], [1, 5, 7]])
    q = torch.zeros(3, 3, V).scatter_(2, drafts[:, :, None], 1.0)
    accepted, final = rejection_sample(p, q, drafts, torch.tensor([3, 3, 2]), torch.full((3, 3), 0.5), torch.ones(3, V))
    assert accepted.tolist() == [3, 1, 0]
    assert final.tolist() == [2, 5, 3]  # bonus after all three; the target's token at the first mismatch


def test_sampling_probs_is_the_distribution_plain_sampling_draws_from():
    """The plain sampler's empirical distribution (seeded draws) matches ``sampling_probs`` under temperature,
    top-k, top-p and min-p."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 8, generator=g) * 2
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)
    probs = sampling_probs(logits, [params])[0]
    assert probs[logits[0].argsort()[:2]].sum() == 0  # top-k dropped the two worst
    sampler, gen = Sampler(), torch.Generator().manual_seed(3)
    N = 6000
    batch = SamplingBatch.from_lists([params] * N, shared_generator=gen)
    tokens = torch.tensor(sampler(logits.expand(N, 8), batch).token_ids)
    support = probs > 0
    assert bool(support[tokens].all())
    kept = probs[support]
    counts = torch.bincount(tokens, minlength=8)[support].double()
    stat = float(((counts - kept * N) ** 2 / (kept * N)).sum())
    assert stat < CRITICAL_001[int(support.sum()) - 1]
    greedy = sampling_probs(logits, [SamplingParams(temperature=0.0)])[0]
    assert greedy.argmax() == logits.argmax() and greedy.sum() == 1
