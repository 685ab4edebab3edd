"""BlockManager: refcounts balance, prefix blocks are shared by content (tokens, image keys), LRU eviction."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from small4.engine.kv_cache import BlockManager, hash_block
from small4.engine.request import Request
from small4.engine.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], extras: list[bytes | None] | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), block_hash_extras=extras)


def admit(bm: BlockManager, request: Request, num_new: int | None = None) -> bool:
    """What the scheduler does to admit a request: one prefix lookup, allocation after the prefix, and the
    request's blocks and progress written from what the block manager returned."""
    computed, num_cached = bm.get_computed_blocks(request)
    new = bm.allocate_slots(request, request.num_tokens - num_cached if num_new is None else num_new, computed)
    if new is None:
        return False
    request.block_ids = computed + new
    request.num_computed_tokens = request.num_cached_prompt_tokens = num_cached
    return True


def grow(bm: BlockManager, request: Request, num_new: int) -> bool:
    """What the scheduler does for a running request: the new blocks appended to its own."""
    new = bm.allocate_slots(request, num_new)
    if new is None:
        return False
    request.block_ids.extend(new)
    return True


def prefill(bm: BlockManager, request: Request) -> None:
    """Admit and compute the whole prompt in one go, as a step would, then publish its full blocks."""
    assert admit(bm, request)
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)


def test_allocate_and_free_balance():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    prefill(bm, a)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_allocate_grows_by_whole_blocks_only_when_needed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3])
    assert admit(bm, a, 3) and len(a.block_ids) == 1
    a.num_computed_tokens = 3
    assert grow(bm, a, 1) and len(a.block_ids) == 1  # slot 3 still in block 0
    a.num_computed_tokens = 4
    assert grow(bm, a, 1) and len(a.block_ids) == 2
    bm.check_invariants([a])


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_request("a", list(range(12)))
    assert not admit(bm, a, 12)
    assert a.block_ids == [] and a.num_computed_tokens == 0 and bm.num_free_blocks == 2
    bm.check_invariants([a])


def test_shared_prefix_reuses_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    stem = list(range(100, 100 + 3 * BS))
    a = make_request("a", stem + [1, 2])
    prefill(bm, a)
    b = make_request("b", stem + [7, 8, 9])
    block_ids, num_tokens = bm.get_computed_blocks(b)
    assert block_ids == a.block_ids[:3] and num_tokens == 3 * BS
    assert admit(bm, b, b.num_tokens - num_tokens)
    assert b.block_ids[:3] == a.block_ids[:3]
    assert b.block_ids[3] != a.block_ids[3]
    assert all(bm.ref_count(i) == 2 for i in a.block_ids[:3])
    assert b.num_computed_tokens == 3 * BS and b.num_cached_prompt_tokens == 3 * BS
    assert bm.prefix_cache_hits == 3 * BS
    assert bm.prefix_cache_queries == a.num_tokens + b.num_tokens
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])


def test_prefix_is_a_chain_not_a_set_of_blocks():
    """The same block content after a different prefix must not match."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefill(bm, make_request("a", [1] * BS + [2] * BS + [0]))
    assert bm.get_computed_blocks(make_request("b", [3] * BS + [2] * BS + [0]))[1] == 0
    assert bm.get_computed_blocks(make_request("c", [1] * BS + [2] * BS + [0]))[1] == 2 * BS


def test_extra_keys_gate_reuse():
    """Identical [IMG] placeholder ids with different pictures must not share blocks past the image."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = [5] * (3 * BS + 1)

    def extras(image: bytes) -> list[bytes | None]:
        return [None] * BS + [image] * BS + [None] * (BS + 1)

    prefill(bm, make_request("a", tokens, extras(b"cat")))
    assert bm.get_computed_blocks(make_request("b", tokens, extras(b"dog")))[1] == BS
    assert bm.get_computed_blocks(make_request("c", tokens, extras(b"cat")))[1] == 3 * BS
    assert bm.get_computed_blocks(make_request("d", tokens))[1] == BS


def test_fully_cached_prompt_still_computes_a_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefill(bm, make_request("a", list(range(3 * BS))))
    b = make_request("b", list(range(3 * BS)))  # every block of b is cached...
    block_ids, num_tokens = bm.get_computed_blocks(b)
    assert num_tokens == 2 * BS  # ...but the last block is recomputed so the last token yields logits
    assert admit(bm, b, b.num_tokens - num_tokens)
    assert b.num_computed_tokens == 2 * BS
    c = make_request("c", list(range(3 * BS)) + [0])
    assert bm.get_computed_blocks(c)[1] == 3 * BS  # one token past the blocks: all three reused
    one = make_request("one", [0])
    assert bm.get_computed_blocks(one) == ([], 0)


def test_duplicate_content_stays_private():
    """Two requests computing the same prefix at once: the second copy is not published and frees first."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_request("a", list(range(BS + 1))), make_request("b", list(range(BS + 1)))
    for r in (a, b):
        assert admit(bm, r, r.num_tokens)
    for r in (a, b):
        r.num_computed_tokens = r.num_tokens
        bm.cache_full_blocks(r)
    bm.check_invariants([a, b])
    assert bm.get_computed_blocks(make_request("c", list(range(BS + 1))))[0] == a.block_ids[:1]


def test_lru_eviction_order():
    """Free queue: blocks holding nothing first, then cached blocks, least recently freed first, and within
    one request its tail before its head (a prefix without its head is useless)."""
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_request("a", [1, 1, 2, 2, 9]), make_request("b", [3, 3, 4, 4, 9])
    prefill(bm, a)
    bm.free(a)
    prefill(bm, b)  # takes a's unhashed tail block and the three never-used blocks
    assert bm.get_computed_blocks(make_request("a2", [1, 1, 2, 2, 0]))[1] == 4
    bm.free(b)
    c = make_request("c", [7, 7, 7, 7, 7, 7])
    assert admit(bm, c, 6)  # needs 3: b's unhashed tail, the never-used block, then a's 2nd block
    assert bm.get_computed_blocks(make_request("a3", [1, 1, 2, 2, 0]))[1] == 2  # a's head survives
    assert bm.get_computed_blocks(make_request("b2", [3, 3, 4, 4, 0]))[1] == 4
    bm.check_invariants([c])


def test_lru_evicts_tail_first():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 1, 2, 2, 3, 3, 0])
    assert admit(bm, a, 6)
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    bm.free(a)
    c = make_request("c", [8, 8])
    assert admit(bm, c, 2)
    assert bm.get_computed_blocks(make_request("a2", [1, 1, 2, 2, 3, 3, 0]))[1] == 4


def test_revived_cached_blocks_count_against_free_blocks():
    """Attaching a cached block with refcount 0 takes it off the free queue, so it must be budgeted."""
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 1, 2, 2])
    prefill(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)  # both blocks cached, refcount 0
    filler = make_request("f", [9, 9])
    assert admit(bm, filler, 2)  # takes the never-used block
    again = make_request("a_again", [1, 1, 2, 2, 5])
    assert bm.get_computed_blocks(again)[1] == 4
    assert bm.num_free_blocks == 2
    assert not admit(bm, again, 1)  # 1 new block + 2 revived > 2 free
    assert again.block_ids == [] and bm.num_free_blocks == 2
    bm.free(filler)
    assert admit(bm, again, 1)
    assert again.block_ids[:2] == a_blocks and again.num_computed_tokens == 4
    bm.check_invariants([again])


def test_prefix_caching_off_never_reuses():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(3 * BS + 1)))
    prefill(bm, a)
    b = make_request("b", list(range(3 * BS + 1)))
    assert bm.get_computed_blocks(b) == ([], 0)
    assert admit(bm, b, b.num_tokens)
    assert not set(a.block_ids) & set(b.block_ids)
    assert b.num_computed_tokens == 0 and bm.prefix_cache_queries == 0
    bm.check_invariants([a, b])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(2 * BS + 1)))
    prefill(bm, a)
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_request("b", list(range(2 * BS + 1))))[1] == 0
    bm.check_invariants([a])
    bm.free(a)
    bm.check_invariants([])


def test_hash_block_is_content_addressed():
    root = b"\0" * 32
    assert hash_block(root, [1, 2]) == hash_block(root, [1, 2])
    assert hash_block(root, [1, 2]) == hash_block(root, [1, 2], [None, None])
    variants = {
        hash_block(root, [1, 2]),
        hash_block(root, [2, 1]),
        hash_block(b"\1" * 32, [1, 2]),
        hash_block(root, [1, 2], [b"x", None]),
        hash_block(root, [1, 2], [None, b"x"]),
        hash_block(root, [1, 2], [b"xy", None]),
    }
    assert len(variants) == 6


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 3]),
    prefix_caching=st.booleans(),
)
def test_random_allocations_balance(seed: int, num_blocks: int, block_size: int, prefix_caching: bool):
    """Random admit / grow / free over a small vocabulary (so prefixes collide): the books balance at every
    step and every block is free at the end."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    live: list[Request] = []
    for i in range(40):
        op = rng.random()
        if op < 0.4 or not live:
            r = make_request(f"r{i}", [rng.randrange(2) for _ in range(rng.randint(1, 8))])
            _, cached = bm.get_computed_blocks(r)
            if admit(bm, r, rng.randint(1, r.num_tokens - cached)):
                live.append(r)
            else:
                assert r.block_ids == [] and r.num_computed_tokens == 0
        elif op < 0.7:
            r = rng.choice(live)
            reach = min(len(r.block_ids) * block_size - rng.randrange(block_size), r.num_tokens)
            r.num_computed_tokens = max(r.num_computed_tokens, reach)
            bm.cache_full_blocks(r)
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(rng.randrange(2))
            grow(bm, r, 1)
        else:
            r = live.pop(rng.randrange(len(live)))
            bm.free(r)
        bm.check_invariants(live)
    for r in live:
        bm.free(r)
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
