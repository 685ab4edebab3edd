"""The block manager of the paged latent cache: block ids, refcounts and prefix-cache hashes.

The runner owns the cache tensors; this module only decides which block ids a request holds. Blocks hold
``block_size`` token slots. With prefix caching on, every *full* block that has been computed is keyed by a
hash chain ``H(parent hash, token ids, extra keys)`` so a later request with the same prefix (same tokens and
same images) can reuse it instead of recomputing it. Pure Python, no torch: the scheduler calls it on the CPU
and tests drive it without a GPU.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from small4.engine.request import Request, token_slice

# The parent of the first block. A fixed-width digest (rather than b"") keeps the byte encoding unambiguous.
_ROOT_HASH = hashlib.blake2b(b"small4-prefix-root", digest_size=32).digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int], extras: Sequence[bytes | None] = ()) -> bytes:
    """Content key of one full block, chained to its parent so equal blocks after different prefixes differ.

    ``extras[i]`` is the extra key of the block's i-th token (an image content hash) or None; it is what keeps
    two prompts with identical ``[IMG]`` placeholder ids but different pictures from sharing a block.
    Uses blake2b over a framed byte encoding: stable across processes, unlike Python's salted ``hash()``.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(parent_hash)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for offset, extra in enumerate(extras):
        if extra is not None:
            h.update(struct.pack("<II", offset, len(extra)))
            h.update(extra)
    return h.digest()


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set only while the block is in the prefix cache


class BlockManager:
    """Hands out cache blocks to requests; shares full blocks between requests with the same prefix.

    Free blocks sit in one queue ordered for eviction: blocks holding nothing reusable first, then cached
    blocks (refcount 0, hash still valid) from least to most recently freed. Taking a block from the queue
    evicts its hash, so the prefix cache costs no memory: it is exactly the set of free blocks not yet reused.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._hashes: dict[str, list[bytes]] = {}  # request id -> chain hashes of its full blocks (memo)
        self._num_registered: dict[str, int] = {}  # request id -> leading blocks already in the cache
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # ---- accounting -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, cached-but-unreferenced ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, for metrics."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # ---- lookup and allocation --------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks matching the request's leading full blocks, and the number of tokens they cover.

        Lookup only; run once per admission and handed to ``allocate_slots``. Capped at ``num_tokens - 1`` tokens:
        the last token must be computed to get logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in self._request_hashes(request, max_blocks)[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Blocks for ``num_new_tokens`` more tokens, or None (and nothing changed) when the free ones do not suffice.

        Admission passes ``computed_blocks`` (from ``get_computed_blocks``, maybe empty): they are referenced first,
        and the new tokens follow them. Otherwise the request's own ``block_ids`` and ``num_computed_tokens`` say
        what it holds. Returns only the newly taken blocks; the scheduler owns the request's ``block_ids`` and
        progress and writes them (vLLM's ``allocate_slots``).
        """
        admitting = computed_blocks is not None
        if admitting:
            held, num_computed = computed_blocks, len(computed_blocks) * self.block_size
        else:
            held, num_computed = request.block_ids, request.num_computed_tokens
        num_new_blocks = max(0, self.num_blocks_for(num_computed + num_new_tokens) - len(held))
        num_revived = sum(1 for block_id in computed_blocks or () if self._blocks[block_id].ref_count == 0)
        if num_new_blocks + num_revived > len(self._free):
            return None
        if admitting:
            self._reference_prefix(request, computed_blocks)
        return [self._take_free_block() for _ in range(num_new_blocks)]

    def _reference_prefix(self, request: Request, prefix: list[int]) -> None:
        for block_id in prefix:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        self._num_registered[request.request_id] = len(prefix)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(prefix) * self.block_size

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:  # evict: the block's content is about to be overwritten
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    # ---- after a step -----------------------------------------------------------------------------------
    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed full blocks (tokens ``< num_computed_tokens``) in the cache.

        A block whose content another block already publishes stays private (it frees like a partial block).
        """
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._request_hashes(request, num_full)
        for i in range(start, num_full):
            block = self._blocks[request.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are queued for eviction before the prefix blocks
        (a longer prefix is useless without its head); blocks with no hash are queued before every cached
        block since they hold nothing anyone can reuse."""
        for block_id in reversed(request.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after loading new weights); referenced blocks stay allocated."""
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()

    # ---- helpers ----------------------------------------------------------------------------------------
    def _request_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Chain hashes of the request's first ``num_blocks`` full blocks, memoised: tokens only grow."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        extras = request.block_hash_extras
        while len(hashes) < num_blocks:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else _ROOT_HASH
            block_extras = extras[start : start + bs] if extras is not None else ()
            hashes.append(hash_block(parent, token_slice(request, start, start + bs), block_extras))
        return hashes

    def check_invariants(self, requests: Iterable[Request] | None = None) -> None:
        """Raise AssertionError if the books do not balance. ``requests``: every live request, if given,
        whose block lists must account for each refcount exactly."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is queued twice")
        for block in self._blocks:
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id} has refcount {block.ref_count}")
            is_free = block.block_id in free
            if (block.ref_count == 0) != is_free:
                raise AssertionError(f"block {block.block_id}: refcount {block.ref_count}, free={is_free}")
            if block.block_hash is not None and self._cached.get(block.block_hash) != block.block_id:
                raise AssertionError(f"block {block.block_id} has a hash the cache does not map to it")
        if sum(b.block_hash is not None for b in self._blocks) != len(self._cached):
            raise AssertionError("cache map and block hashes disagree")
        if not self.enable_prefix_caching and self._cached:
            raise AssertionError("hashes registered with prefix caching off")
        if requests is not None:
            refs = [0] * self.num_blocks
            for request in requests:
                for block_id in request.block_ids:
                    refs[block_id] += 1
            bad = [b.block_id for b in self._blocks if b.ref_count != refs[b.block_id]]
            if bad:
                raise AssertionError(f"refcounts do not match the requests' block lists: blocks {bad[:8]}")
