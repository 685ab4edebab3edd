"""Speculative sampling's accept/reject rule (Leviathan et al. 2023, Chen et al. 2023), vectorised over a batch.

A sequence proposes draft tokens d_1..d_k, each d_j drawn from the draft's distribution q_j; one target forward
gives p_0..p_k (p_j: the target's distribution for the position after d_1..d_j, with every sampling transform
applied). Position j is accepted with probability min(1, p_{j-1}(d_j) / q_j(d_j)); at the first rejection the
sequence takes a token from norm(max(0, p - q)) at that position, and when all k are accepted a bonus token from
p_k. Each emitted token is then distributed exactly as p (the theorem), whatever q was.

Greedy rows need no separate rule: with p and q one-hot (the target's and the draft's argmax) the same formulas
accept exactly the drafts equal to the target's argmax and emit the target's argmax at the first mismatch, so the
tokens are those of plain greedy decoding.

Pure PyTorch (no kernel, so no twin): the work per step is a few [N, k+1, V] element-wise ops.
"""

from __future__ import annotations

import torch

from small4.engine.sampler import apply_min_p, apply_top_k_top_p
from small4.engine.sampling_params import SamplingParams


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution plain sampling draws row i from, [R, V] float32: the same temperature, top-k / top-p and
    min-p as ``sampler._choose_tokens`` (on logits already processed for masks, bias, min_tokens, penalties);
    greedy rows are one-hot on the argmax (ties -> lowest id, as ``argmax``)."""
    vocab = logits.shape[1]
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    out = torch.zeros_like(logits, dtype=torch.float32)
    out.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)  # one-hot argmax: the greedy rows' distribution
    if bool(greedy.all()):
        return out
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    x = logits.float() / temps[:, None]  # [R, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        x = apply_top_k_top_p(x, top_k, torch.tensor([p.top_p for p in params], device=device))
    if any(p.min_p > 0.0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], device=device))
    return torch.where(greedy[:, None], out, x.softmax(dim=-1))


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to k drafts; row i uses its first ``num_drafts[i]``.

    target_probs [N, k+1, V], draft_probs [N, k, V], draft_tokens [N, k] (int64), num_drafts [N], uniforms [N, k]
    in [0, 1), noise [N, V] ~ Exp(1) (the recovery / bonus draw, by the exponential race argmax(w / noise))
    -> (accepted [N]: drafts kept, 0..num_drafts; token [N]: the token emitted after them)."""
    N, k = draft_tokens.shape
    device = target_probs.device
    if k == 0:
        return torch.zeros(N, dtype=torch.long, device=device), _race(target_probs[:, 0], noise)
    p_at = target_probs[:, :k].gather(2, draft_tokens[:, :, None]).squeeze(2)  # [N, k]: p_{j-1}(d_j)
    q_at = draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)  # [N, k]: q_j(d_j)
    ok = uniforms * q_at < p_at  # u < p/q without dividing (q(d) > 0: d was drawn from q)
    ok &= torch.arange(k, device=device)[None, :] < num_drafts[:, None]
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [N]: the length of the accepted prefix
    rows = torch.arange(N, device=device)
    p_stop = target_probs[rows, accepted]  # [N, V]: p at the first rejected position (or p_k / p_num_drafts)
    rejected = accepted < num_drafts
    q_stop = draft_probs[rows, accepted.clamp(max=k - 1)]  # [N, V]
    residual = (p_stop - q_stop).clamp_min(0)
    # a residual of zero mass can only come from rounding (p == q makes rejection impossible): fall back to p
    use_residual = rejected & (residual.sum(dim=1) > 0)
    weights = torch.where(use_residual[:, None], residual, p_stop)
    return accepted, _race(weights, noise)


def _race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw proportional to ``weights`` [N, V] (unnormalised, >= 0) with Exp(1) ``noise``: argmax(w / noise)."""
    return (weights / noise).argmax(dim=-1)
