"""One rank's share of every weight: which slice of a checkpoint tensor it reads, and where that slice lands.

A ``Cut`` names pieces of one dimension of a checkpoint tensor (more than one piece for a fused gate/up matrix,
whose gate and up halves are each split); the rank reads those pieces with ``safe_open(...).get_slice`` and
concatenates them. FP8 scales follow their weight: a scale dimension of size 1 is kept whole, a block-scale
dimension is cut at block boundaries, or inside one block per piece (the gate and up halves of one expert under
a [E, 2, 1] scale), so the local weight still has equal blocks and dequantisation sees matching scales.

``ShardPlan.local`` rewrites a checkpoint tensor's global ``Destination`` (weights/names.py) into this rank's
parameter: expert e becomes e - first local expert (None: not this rank's expert, never read), fused gate/up
rows shrink to the local intermediate width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from small4.config import TextConfig
from small4.parallel.config import ParallelConfig, Range, split
from small4.weights.names import Destination


@dataclass(frozen=True)
class Cut:
    dim: int
    pieces: tuple[Range, ...]

    def length(self) -> int:
        return sum(p.size for p in self.pieces)


def _suffix(module: str) -> str:
    return module.rsplit(".", 1)[-1]


class ShardPlan:
    def __init__(self, text: TextConfig, parallel: ParallelConfig, rank: int) -> None:
        parallel.validate(text)
        self.text, self.parallel, self.rank = text, parallel, rank
        tp, n = parallel.tensor_parallel_size, parallel.world_size
        self.tp = tp
        self.heads = split(text.num_heads, tp, rank if tp > 1 else 0)
        self.vocab = split(text.vocab_size, tp, rank if tp > 1 else 0)
        self.moe_parts = n
        self.experts = split(text.num_experts, n, rank) if parallel.expert_parallel else Range(0, text.num_experts)
        I = text.moe_intermediate_size
        self.inter = Range(0, I) if parallel.expert_parallel else split(I, n, rank)
        self.shared = split(I * text.num_shared_experts, n, rank) if text.num_shared_experts else Range(0, 0)

    @property
    def expert_parallel(self) -> bool:
        return self.parallel.expert_parallel

    # ---- which slice of a checkpoint tensor -----------------------------------------------------------------
    def cut(self, dest: Destination) -> Cut | None:
        """The slice of the checkpoint weight behind ``dest`` (a global destination) this rank reads; None: all."""
        t, name, param = self.text, _suffix(dest.module), dest.param
        if self.tp > 1:
            h = self.heads
            if name in ("q_b_proj", "q_proj"):
                return Cut(0, (Range(h.start * t.qk_head_dim, h.stop * t.qk_head_dim),))
            if name == "kv_b_proj":
                per = t.qk_nope_head_dim + t.v_head_dim
                return Cut(0, (Range(h.start * per, h.stop * per),))
            if name == "o_proj":
                return Cut(1, (Range(h.start * t.v_head_dim, h.stop * t.v_head_dim),))
            if dest.module in ("embed_tokens", "lm_head"):
                return Cut(0, (self.vocab,))
        if self.moe_parts == 1:
            return None
        if dest.module.endswith("mlp.experts"):
            return self._expert_cut(param, fused=not dest.index)
        if dest.module.endswith("shared_experts.gate_up"):
            return Cut(0, (self.shared,))
        if dest.module.endswith("shared_experts.down"):
            return Cut(1, (self.shared,))
        return None

    def _expert_cut(self, param: str, fused: bool) -> Cut | None:
        if self.expert_parallel:
            return Cut(0, (self.experts,)) if fused else None  # per-expert tensors: whole, or not read at all
        I, i = self.text.moe_intermediate_size, self.inter
        if param == "w13":  # fused [E, 2I, H]: the rank's gate rows and its up rows; per expert [I, H]
            return Cut(1, (i, Range(I + i.start, I + i.stop))) if fused else Cut(0, (i,))
        return Cut(2 if fused else 1, (i,))  # down: [E, H, I] or [H, I]

    # ---- where the slice lands -------------------------------------------------------------------------------
    def local(self, dest: Destination) -> Destination | None:
        """This rank's destination for a global one; None when the tensor belongs to another rank's experts."""
        if dest.module.endswith("mlp.experts"):
            return self._local_expert(dest)
        if dest.module.endswith("shared_experts.gate_up") and dest.index:
            half = dest.index[0].start // (self.text.moe_intermediate_size * self.text.num_shared_experts)
            s = self.shared.size
            return replace(dest, index=(slice(half * s, (half + 1) * s),))
        return dest

    def _local_expert(self, dest: Destination) -> Destination | None:
        e0, E_local = self.experts.start, self.experts.size
        scale_shape = (E_local, *dest.scale_shape[1:])
        if not dest.index:  # a fused tensor of all experts, already cut to the local ones
            return replace(dest, scale_shape=scale_shape)
        e = dest.index[0]
        if e not in self.experts:
            return None
        index, scale_index = (e - e0, *dest.index[1:]), (e - e0, *dest.scale_index[1:])
        if dest.param == "w13":
            I, size = self.text.moe_intermediate_size, self.inter.size
            half = dest.index[1].start // I
            index = (e - e0, slice(half * size, (half + 1) * size))
        return replace(dest, index=index, scale_shape=scale_shape, scale_index=scale_index)


def scale_cut(cut: Cut, scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Cut | None:
    """The cut of a scale (or activation-scale) tensor that matches ``cut`` of its weight; None: read it whole.

    Scales broadcast over blocks (kernels/fp8.py): a 1-D per-expert scale of a 3-D weight is its dim 0; a
    dimension of size 1 covers the whole weight dimension; otherwise each scale entry covers ceil(L / s) rows."""
    if len(scale_shape) == 0 or all(s == 1 for s in scale_shape):
        return None
    if len(scale_shape) == len(weight_shape):
        dim = cut.dim
    elif len(scale_shape) == 1 and cut.dim == 0:
        dim = 0
    else:
        return None
    s, full = scale_shape[dim], weight_shape[cut.dim]
    if s == 1:
        return None
    block = -(-full // s)
    pieces, local_blocks = [], set()
    for p in cut.pieces:
        first, last = p.start // block, -(-p.stop // block)
        aligned = p.start % block == 0 and (p.stop % block == 0 or p.stop == full)
        if not aligned and last - first != 1:
            raise ValueError(f"a split at {p.start}:{p.stop} falls across FP8 scale blocks of {block}")
        local_blocks.add(p.size if not aligned else block)
        pieces.append(Range(first, last))
    if len(local_blocks) > 1:  # dequantisation assumes equal blocks: every piece must shrink its blocks alike
        raise ValueError(f"a split of {cut.pieces} leaves FP8 scale blocks of unequal sizes {sorted(local_blocks)}")
    return Cut(dim, tuple(pieces))
