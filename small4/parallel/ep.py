"""Expert parallelism: each rank runs only the token-expert assignments whose expert it holds.

One interface, two strategies (``ExpertDispatch.__call__``: this rank's partial MoE output [T, H], which the MoE
block's all-reduce sums with the shared expert's partial). Tokens arrive replicated on every rank (attention is
replicated, or head-split and all-reduced), so the strategies differ in who sends what:

- ``gather`` (small batches): the textbook version all-gathers every token's hidden state and routing, runs the
  local experts and reduce-scatters. Here every rank already holds every token, so the all-gather is free and the
  MoE all-reduce is the reduce-scatter (plus the all-gather that re-replicates the output). Other ranks' ids become
  -1, which the fused MoE skips. No extra collective and no host sync, so it runs inside a CUDA graph.
- ``all_to_all``: each rank owns a contiguous share of the tokens and sends each of them once to every rank that
  holds one of its experts (counts first, so every rank knows its receive sizes: a host sync, never inside a
  graph), with its routing rewritten to the receiver's local ids (-1 elsewhere). The receiver runs its local experts
  over what it got and sends the weighted rows back; the owner sums them into its tokens' rows and leaves the other
  rows zero for the MoE all-reduce. It moves the rows that need moving and no more, which pays off once the tokens
  are not replicated (data-parallel attention, not built): with replicated tokens it only adds bytes.

The choice is made per call from the batch size, identically on every rank (every rank sees the same T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, local ids, weights) -> [T, H]


def token_share(num_tokens: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of the tokens rank ``index`` owns for the all-to-all (shares differ by at most one token)."""
    return index * num_tokens // parts, (index + 1) * num_tokens // parts


class ExpertDispatch:
    """Routes one MoE block's assignments to the ranks holding their experts (``num_local`` experts per rank,
    rank r holding ``[r * num_local, (r + 1) * num_local)``). ``all_to_all_min_tokens``: batches of at least this
    many tokens use the all-to-all, smaller ones the gather; None: always the gather."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        num_local: int,
        group: dist.ProcessGroup | None,
        all_to_all_min_tokens: int | None = None,
    ) -> None:
        self.rank, self.world_size, self.num_local, self.group = rank, world_size, num_local, group
        self.all_to_all_min_tokens = all_to_all_min_tokens
        self.calls = {"gather": 0, "all_to_all": 0}  # host counters: which strategy ran how often

    def strategy(self, num_tokens: int) -> str:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        big = self.all_to_all_min_tokens is not None and num_tokens >= self.all_to_all_min_tokens
        return "all_to_all" if big and not capturing else "gather"

    def __call__(self, experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        how = self.strategy(x.shape[0])
        self.calls[how] += 1
        if how == "all_to_all":
            return self.all_to_all(experts, x, ids, weights)
        return self.gather(experts, x, ids, weights)

    def local_ids(self, ids: torch.Tensor, rank: torch.Tensor | int) -> torch.Tensor:
        """Global expert ids -> ids local to ``rank`` (a scalar or one per row, broadcast), -1 for other ranks'."""
        first = rank * self.num_local
        mine = (ids >= first) & (ids < first + self.num_local)
        return torch.where(mine, ids - first, torch.full_like(ids, -1))

    def gather(self, experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts(x, self.local_ids(ids, self.rank), weights)

    def all_to_all(self, experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = self.world_size, ids.shape[1]
        start, stop = token_share(x.shape[0], n, self.rank)
        own_ids = ids[start:stop]  # [t, k]
        owner = own_ids // self.num_local  # [t, k] the rank holding each assignment's expert
        hit = torch.zeros(own_ids.shape[0], n, dtype=torch.bool, device=x.device)
        hit.scatter_(1, owner, True)  # [t, n]: token needs rank
        dest, token = hit.t().nonzero(as_tuple=True)  # [m] one row per (destination, token), destination-major
        routing = torch.cat(  # [m, 2k]: ids local to the destination (-1: not there), then the weights
            [self.local_ids(own_ids[token], dest[:, None]).float(), weights[start:stop][token].float()], dim=1
        )
        send = hit.sum(0)  # [n] rows to each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()  # host sync: the receive buffers' sizes
        rows = self._exchange(x[start:stop][token], recv_sizes, send_sizes)  # [r, H]
        got = self._exchange(routing, recv_sizes, send_sizes)  # [r, 2k]
        done = experts(rows, got[:, :k].long(), got[:, k:].to(weights.dtype))  # [r, H] weighted sums
        back = self._exchange(done, send_sizes, recv_sizes)  # [m, H] in the order sent
        out = torch.zeros_like(x)
        out[start:stop].index_add_(0, token, back)
        return out

    def _exchange(self, t: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
        out = t.new_empty(sum(out_sizes), *t.shape[1:])
        dist.all_to_all_single(out, t.contiguous(), out_sizes, in_sizes, group=self.group)
        return out
