"""Scheduler: budgets and limits hold every step, decodes go first, preemption by recompute loses nothing,
stop rules, and allocator balance under random workloads driven by a fake model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from small4.engine.kv_cache import BlockManager
from small4.engine.request import Request, RequestStatus
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, eos: int | None = None, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), eos_token_id=eos)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 128,
    prefix_caching: bool = True,
    **config,
) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, **config)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, prefix_caching))


class FakeModel:
    """Stands in for runner + sampler. It writes every computed token into its cache slot and checks, before
    each chunk, that the slots of all earlier tokens hold exactly that request's tokens (and image keys): a
    wrong prefix hit, a stale block after eviction or a botched recompute shows up as a mismatch. It never
    writes into a block another request shares. Tokens come from ``script`` if given, else at random."""

    def __init__(self, scheduler: Scheduler, seed: int = 0, vocab: int = 3) -> None:
        self.scheduler = scheduler
        self.bm = scheduler.block_manager
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.slots: dict[tuple[int, int], tuple[int, bytes | None]] = {}
        self.script: dict[str, list[int]] = {}

    def _key(self, request: Request, pos: int) -> tuple[int, bytes | None]:
        extras = request.block_hash_extras or []
        return request.all_token_ids[pos], extras[pos] if pos < len(extras) else None

    def _slot(self, request: Request, pos: int) -> tuple[int, int]:
        bs = self.bm.block_size
        return request.block_ids[pos // bs], pos % bs

    def run(self, output: SchedulerOutput) -> dict[str, int | None]:
        sampled: dict[str, int | None] = {}
        for item in output.scheduled:
            r = item.request
            assert item.start == r.num_computed_tokens
            for pos in range(item.start):
                assert self.slots.get(self._slot(r, pos)) == self._key(r, pos), (r.request_id, pos)
            for pos in range(item.start, item.start + item.num_new_tokens):
                block_id, offset = self._slot(r, pos)
                assert self.bm.ref_count(block_id) == 1, "write into a shared block"
                self.slots[(block_id, offset)] = self._key(r, pos)
            if item.samples:
                script = self.script.get(r.request_id)
                sampled[r.request_id] = script.pop(0) if script else self.rng.randrange(self.vocab)
        return sampled

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        output = self.scheduler.schedule()
        return output, self.scheduler.update_from_output(output, self.run(output))


def run_to_completion(model: FakeModel, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while model.scheduler.has_unfinished():
        output, _ = model.step()
        assert not output.is_empty, "stalled with unfinished requests"
        outputs.append(output)
        assert len(outputs) < max_steps
    return outputs


def assert_all_free(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


# ---- budgets, order, limits --------------------------------------------------------------------------------


def test_long_prompt_is_chunked_and_does_not_stall_decodes():
    sched = make_scheduler(max_num_batched_tokens=16)
    model = FakeModel(sched)
    for i in range(3):
        sched.add_request(make_request(f"short{i}", [i, 1], max_tokens=30))
    model.step()  # three short prefills
    sched.add_request(make_request("long", list(range(100)), max_tokens=2))
    chunks = []
    for _ in range(20):
        output, _ = model.step()
        assert output.num_batched_tokens <= 16
        decodes = [s for s in output.scheduled if s.request.request_id.startswith("short")]
        assert len(decodes) == 3 and all(s.num_new_tokens == 1 for s in decodes)
        assert output.scheduled[:3] == decodes  # decodes first
        long = [s for s in output.scheduled if s.request.request_id == "long"]
        chunks.append(long[0].num_new_tokens)
        if long[0].samples:
            break
    assert sum(chunks) == 100 and chunks[:-1] == [13] * (len(chunks) - 1)


def test_running_decodes_go_before_an_older_running_prefill():
    sched = make_scheduler(max_num_batched_tokens=8, long_prefill_token_threshold=4)
    model = FakeModel(sched)
    sched.add_request(make_request("old_long", list(range(40))))
    sched.add_request(make_request("young", [1, 2, 3]))
    output, _ = model.step()  # old_long: 4 tokens (threshold), young: its 3-token prompt
    assert [s.num_new_tokens for s in output.scheduled] == [4, 3]
    output, _ = model.step()
    assert [s.request.request_id for s in output.scheduled] == ["young", "old_long"]
    assert [s.num_new_tokens for s in output.scheduled] == [1, 4]


def test_sequence_limit_and_fcfs():
    sched = make_scheduler(max_num_seqs=2)
    model = FakeModel(sched)
    for i, max_tokens in enumerate([1, 3, 1, 1]):
        sched.add_request(make_request(f"r{i}", [i, i, i], max_tokens=max_tokens))
    admitted_order = []
    while sched.has_unfinished():
        output, _ = model.step()
        assert sched.num_running <= 2 and len(output.scheduled) <= 2
        admitted_order += [s.request.request_id for s in output.scheduled if s.start == 0]
    assert admitted_order == ["r0", "r1", "r2", "r3"]
    assert_all_free(sched)


def test_head_of_line_request_is_not_overtaken():
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=24)
    model = FakeModel(sched)
    sched.add_request(make_request("hog", list(range(12)), max_tokens=4))  # 3 blocks, grows to 4
    model.step()
    sched.add_request(make_request("big", list(range(100, 120)), max_tokens=1))  # 5 blocks: must wait
    sched.add_request(make_request("small", [1], max_tokens=1))  # would fit, but may not overtake
    output, _ = model.step()
    assert [s.request.request_id for s in output.scheduled] == ["hog"]
    outputs = run_to_completion(model)
    admitted = [s.request.request_id for o in outputs for s in o.scheduled if s.start == 0]
    assert admitted == ["big", "small"]
    assert_all_free(sched)


def test_no_chunked_prefill_schedules_whole_prompts():
    sched = make_scheduler(max_num_batched_tokens=20, max_model_len=20, enable_chunked_prefill=False)
    model = FakeModel(sched)
    sched.add_request(make_request("a", list(range(12)), max_tokens=3))
    sched.add_request(make_request("b", list(range(12)), max_tokens=3))
    output, _ = model.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [("a", 12)]
    output, _ = model.step()  # a decodes; b's prompt fits now, less the 8 tokens a cached for it
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [("a", 1), ("b", 4)]
    run_to_completion(model)
    assert_all_free(sched)


def test_long_prefill_threshold_lets_prompts_share_a_step():
    sched = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=10, prefix_caching=False)
    model = FakeModel(sched)
    sched.add_request(make_request("a", list(range(30))))
    sched.add_request(make_request("b", list(range(30))))
    output, _ = model.step()
    assert [s.num_new_tokens for s in output.scheduled] == [10, 10]


# ---- prefix caching through the scheduler ------------------------------------------------------------------


def test_second_request_starts_after_the_shared_prefix():
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched)
    stem = list(range(50, 62))  # 3 blocks
    sched.add_request(make_request("a", stem + [1], max_tokens=2))
    run_to_completion(model)
    sched.add_request(make_request("b", stem + [2, 3], max_tokens=2))
    output, _ = model.step()
    (item,) = output.scheduled
    assert item.start == 12 and item.num_new_tokens == 2
    assert item.request.num_cached_prompt_tokens == 12
    run_to_completion(model)
    assert_all_free(sched)


# ---- preemption --------------------------------------------------------------------------------------------


def test_preempts_the_youngest():
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, prefix_caching=False)
    model = FakeModel(sched)
    a, b = make_request("a", [1, 2, 3], max_tokens=4), make_request("b", [4, 5, 6], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    model.step()  # both prefilled: 2 blocks each, all blocks used
    sched.add_request(c := make_request("c", [7, 8, 9], max_tokens=1))  # waits: no free block
    model.step()  # a and b decode into the second slot of their second block
    output, _ = model.step()  # a needs a third block: b, the youngest, gives its blocks up
    assert output.preempted == [b] and [s.request for s in output.scheduled] == [a]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and b.num_output_tokens == 2
    assert list(sched.waiting) == [b, c]  # b keeps its turn ahead of later arrivals
    run_to_completion(model)
    assert [r.num_output_tokens for r in (a, b, c)] == [4, 4, 1]
    assert_all_free(sched)


def test_request_preempts_itself_when_it_is_the_youngest():
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, prefix_caching=False)
    model = FakeModel(sched)
    a, b = make_request("a", [1, 2, 3], max_tokens=4), make_request("b", [4, 5, 6, 7], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    model.step()
    output, _ = model.step()  # a decodes into its free slot; b needs a third block and is the youngest
    assert [s.request for s in output.scheduled] == [a] and output.preempted == [b]
    assert b.num_output_tokens == 1
    run_to_completion(model)
    assert [r.num_output_tokens for r in (a, b)] == [4, 4]


def test_preempted_decode_gives_back_its_budget():
    """A decode granted earlier in the step, then preempted for an older request's prefill chunk, returns its
    token to the budget and disappears from the plan."""
    sched = make_scheduler(
        num_blocks=5,
        block_size=2,
        max_num_seqs=2,
        max_num_batched_tokens=4,
        max_model_len=16,
        prefix_caching=False,
        long_prefill_token_threshold=2,
    )
    model = FakeModel(sched)
    old = make_request("old", list(range(9)), max_tokens=1)  # 5 blocks, 2 prompt tokens a step
    young = make_request("young", [1], max_tokens=4)  # decodes from step 1 on
    sched.add_request(old)
    sched.add_request(young)
    for _ in range(3):  # old: 6 tokens in 3 blocks; young: 3 tokens in 2 blocks; the cache is full
        model.step()
    assert sched.block_manager.num_free_blocks == 0 and old.num_computed_tokens == 6
    output, _ = model.step()  # young's decode fits its block, then old needs a block: young goes
    assert output.preempted == [young]
    assert [(s.request, s.num_new_tokens) for s in output.scheduled] == [(old, 2)]
    assert output.num_batched_tokens == 2 and young.num_output_tokens == 3
    run_to_completion(model)
    assert old.num_output_tokens == 1 and young.num_output_tokens == 4
    assert_all_free(sched)


def test_preemption_under_tiny_cache_still_finishes_every_request():
    sched = make_scheduler(num_blocks=8, block_size=2, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16)
    model = FakeModel(sched, seed=1)
    requests = [make_request(f"r{i}", [i % 3, 1, 2, i % 2], max_tokens=8) for i in range(6)]
    for r in requests:
        sched.add_request(r)
    outputs = run_to_completion(model)
    assert sum(len(o.preempted) for o in outputs) > 0
    assert all(r.num_output_tokens == 8 and r.status is RequestStatus.FINISHED_LENGTH for r in requests)
    assert_all_free(sched)


# ---- abort and finish --------------------------------------------------------------------------------------


def test_abort_frees_blocks_immediately():
    sched = make_scheduler(num_blocks=16)
    model = FakeModel(sched)
    a, b = make_request("a", list(range(10)), max_tokens=50), make_request("b", [1, 2], max_tokens=50)
    sched.add_request(a)
    sched.add_request(b)
    model.step()
    assert sched.abort_request("a") is a
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert sched.block_manager.num_free_blocks == 16 - len(b.block_ids)
    assert sched.abort_request("a") is None and sched.abort_request("nope") is None
    sched.add_request(c := make_request("c", [3]))
    assert sched.abort_request("c") is c and sched.num_waiting == 0
    output = sched.schedule()
    sched.abort_request("b")  # between schedule and update: the update skips it
    assert sched.update_from_output(output, {"b": 1}) == []
    assert b.num_output_tokens == 1 and not sched.has_unfinished()  # 1 from the first step
    assert_all_free(sched)


def test_finish_request_for_a_stop_string():
    sched = make_scheduler()
    model = FakeModel(sched)
    sched.add_request(a := make_request("a", [1, 2], max_tokens=10))
    model.step()
    assert sched.finish_request("a", RequestStatus.FINISHED_STOPPED, "\n\n") is a
    assert a.stop_reason == "\n\n" and a.status is RequestStatus.FINISHED_STOPPED
    assert_all_free(sched)
    with pytest.raises(ValueError):
        sched.finish_request("a", RequestStatus.RUNNING)


# ---- stop rules --------------------------------------------------------------------------------------------


def generate(request: Request, script: list[int], **scheduler_kwargs) -> Request:
    sched = make_scheduler(**scheduler_kwargs)
    model = FakeModel(sched)
    model.script[request.request_id] = list(script)
    sched.add_request(request)
    run_to_completion(model)
    assert_all_free(sched)
    return request


def test_eos_stops():
    r = generate(make_request("r", [1], max_tokens=10, eos=9), [5, 9, 5])
    assert r.output_token_ids == [5, 9] and r.status is RequestStatus.FINISHED_STOPPED
    assert r.stop_reason is None


def test_min_tokens_holds_eos_and_stop_ids_back():
    request = make_request("r", [1], max_tokens=10, eos=9, min_tokens=3, stop_token_ids=(7,))
    r = generate(request, [9, 7, 9, 5])
    assert r.output_token_ids == [9, 7, 9] and r.status is RequestStatus.FINISHED_STOPPED


def test_stop_token_ids_set_stop_reason():
    r = generate(make_request("r", [1], max_tokens=10, eos=9, stop_token_ids=(7, 8)), [5, 8, 5])
    assert r.output_token_ids == [5, 8] and r.stop_reason == 8 and r.status is RequestStatus.FINISHED_STOPPED


def test_ignore_eos():
    r = generate(make_request("r", [1], max_tokens=3, eos=9, ignore_eos=True), [9, 9, 9, 9])
    assert r.output_token_ids == [9, 9, 9] and r.status is RequestStatus.FINISHED_LENGTH


def test_eos_on_the_last_allowed_token_is_a_stop():
    r = generate(make_request("r", [1], max_tokens=2, eos=9), [5, 9])
    assert r.status is RequestStatus.FINISHED_STOPPED


def test_max_tokens_is_length():
    r = generate(make_request("r", [1, 2, 3], max_tokens=5, eos=9), [1, 2, 3, 4, 5, 6])
    assert r.num_output_tokens == 5 and r.status is RequestStatus.FINISHED_LENGTH


def test_max_model_len_ends_generation():
    r = generate(make_request("r", list(range(6)), max_tokens=10), [1] * 10, max_model_len=8)
    assert r.num_output_tokens == 2 and r.status is RequestStatus.FINISHED_LENGTH
    r = generate(make_request("r", list(range(8)), max_tokens=10), [1] * 10, max_model_len=8)
    assert r.num_output_tokens == 1 and r.status is RequestStatus.FINISHED_LENGTH


# ---- validation --------------------------------------------------------------------------------------------


def test_rejects_requests_that_can_never_run():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len=64"):
        sched.add_request(make_request("long", list(range(65))))
    with pytest.raises(ValueError, match="cache"):
        sched.add_request(make_request("huge", list(range(17))))
    with pytest.raises(ValueError, match="cache"):  # the prompt fits, but its generation cannot
        sched.add_request(make_request("grows", list(range(10)), max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("empty", []))
    sched.add_request(make_request("ok", list(range(10)), max_tokens=7))  # 16 tokens cached at most
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("ok", [1]))
    assert sched.num_waiting == 1


def test_scheduler_config_validates():
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(4, 64, 128, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(8, 4, 128)
    with pytest.raises(ValueError):
        SchedulerConfig(0, 4, 128)
    with pytest.raises(ValueError):
        SchedulerConfig(4, 256, 128, enable_chunked_prefill=False, long_prefill_token_threshold=8)
    SchedulerConfig(4, 128, 128, enable_chunked_prefill=False)


# ---- random workloads --------------------------------------------------------------------------------------


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(3, 20))
    max_model_len = min(24, num_blocks * block_size)
    max_num_seqs = draw(st.integers(1, 4))
    chunked = draw(st.booleans())
    if chunked:
        budget = draw(st.integers(max_num_seqs, 32))
        threshold = draw(st.sampled_from([0, 0, 3]))
    else:
        budget, threshold = draw(st.integers(max(max_model_len, max_num_seqs), 40)), 0
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, chunked, threshold)
    stem = draw(st.lists(st.integers(0, 2), min_size=max_model_len, max_size=max_model_len))
    image = st.sampled_from([None, None, b"cat", b"dog"])
    requests = draw(
        st.lists(
            st.tuples(
                st.integers(0, 12),  # arrival step
                st.integers(0, max_model_len),  # tokens taken from the shared stem
                st.lists(st.integers(0, 2), max_size=6),  # own suffix
                st.integers(1, 8),  # max_tokens
                st.one_of(st.none(), st.tuples(st.integers(0, max_model_len), image)),  # an image key
                st.one_of(st.none(), st.integers(0, 20)),  # abort at this step
            ),
            min_size=1,
            max_size=8,
        )
    )
    return block_size, num_blocks, config, draw(st.booleans()), stem, requests


@settings(max_examples=120, deadline=None)
@given(workload=workloads(), seed=st.integers(0, 2**16))
def test_random_workload_balances_and_finishes(workload, seed):
    block_size, num_blocks, config, prefix_caching, stem, specs = workload
    sched = Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching))
    model = FakeModel(sched, seed=seed)
    pending: list[tuple[int, Request, int | None]] = []
    for i, (arrival, take, suffix, max_tokens, img, abort_at) in enumerate(specs):
        prompt = (stem[:take] + suffix)[: config.max_model_len] or [0]
        r = make_request(f"r{i}", prompt, max_tokens=max_tokens)
        if img is not None:
            r.block_hash_extras = [img[1] if j >= img[0] else None for j in range(len(prompt))]
        pending.append((arrival, r, abort_at))
    requests = [r for _, r, _ in pending]
    aborted: set[str] = set()
    step = 0
    while any(a >= step for a, _, _ in pending) or sched.has_unfinished():
        for arrival, r, _ in pending:
            if arrival == step:
                sched.add_request(r)
        for arrival, r, abort_at in pending:
            if abort_at == step and arrival <= step and sched.abort_request(r.request_id) is not None:
                aborted.add(r.request_id)
        running_before = set(sched.running)
        output, _ = model.step()
        check_step(sched, output, running_before)
        if sched.has_unfinished():
            assert not output.is_empty, "stalled"
        step += 1
        assert step < 500
    assert_all_free(sched)
    for r in requests:
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
        else:
            expected = min(r.sampling_params.max_tokens, max(1, config.max_model_len - r.num_prompt_tokens))
            assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == expected
        assert r.block_ids == []


def check_step(sched: Scheduler, output: SchedulerOutput, running_before: set[Request]) -> None:
    cfg = sched.config
    assert output.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(output.scheduled) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert len({id(s.request) for s in output.scheduled}) == len(output.scheduled)
    seen_prefill = False
    for s in output.scheduled:
        assert s.num_new_tokens >= 1
        is_decode = s.request in running_before and s.num_new_tokens == 1 and s.samples and s.start > 0
        if s.request in running_before and not is_decode:
            seen_prefill = True
        elif is_decode:
            assert not seen_prefill, "a running decode came after a running prefill"
        if not cfg.enable_chunked_prefill:
            assert s.samples  # whole prompts only
        if cfg.long_prefill_token_threshold:
            assert s.num_new_tokens <= cfg.long_prefill_token_threshold
    for r in output.preempted:
        assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0 and r.block_ids == []
    live = list(sched.running) + list(sched.waiting)
    sched.block_manager.check_invariants(live)
    for r in sched.waiting:
        assert r.block_ids == [] and r.status is RequestStatus.WAITING
    for r in sched.running:
        assert len(r.block_ids) >= sched.block_manager.num_blocks_for(r.num_computed_tokens)
        assert r.status is RequestStatus.RUNNING


def test_admission_looks_the_prefix_up_once_and_writes_the_request_state():
    """The scheduler asks the block manager for the cached prefix once per admission attempt and then writes the
    request's blocks and progress itself from the blocks it gets back (the block manager only counts blocks)."""
    sched = make_scheduler(num_blocks=16, block_size=4)
    lookups = []
    real = sched.block_manager.get_computed_blocks

    def counted(request):
        lookups.append(request.request_id)
        return real(request)

    sched.block_manager.get_computed_blocks = counted
    stem = list(range(100, 112))  # three full blocks
    first = make_request("a", stem + [1])
    sched.add_request(first)
    sched.update_from_output(sched.schedule(), {"a": 7})
    second = make_request("b", stem + [2, 3])
    sched.add_request(second)
    plan = sched.schedule()
    assert lookups == ["a", "b"]
    assert second.block_ids[:3] == first.block_ids[:3] and len(second.block_ids) == 4
    assert second.num_computed_tokens == 12 and second.num_cached_prompt_tokens == 12
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in plan.scheduled] == [("a", 13, 1), ("b", 12, 2)]
    sched.block_manager.check_invariants([first, second])


# ---- async scheduling: steps booked at launch, tokens written when they come back ---------------------------
def test_a_booked_step_plans_the_next_decode_around_its_placeholder():
    sched = make_scheduler()
    req = make_request("a", [1, 2, 3, 4, 5], max_tokens=3, eos=99)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance_in_flight(first)
    assert req.output_token_ids == [-1] and req.num_pending_outputs == 1 and req.num_output_tokens == 0
    second = sched.schedule()  # planned before the first step's token is known
    assert [(s.request, s.start, s.num_new_tokens) for s in second.scheduled] == [(req, 5, 1)]
    sched.advance_in_flight(second)
    assert sched.resolve_in_flight(first, {"a": 7}) == []
    assert req.output_token_ids == [7, -1] and req.num_computed_tokens == 6
    sched.resolve_in_flight(second, {"a": 8})
    assert req.output_token_ids == [7, 8] and req.num_pending_outputs == 0


def test_a_request_found_finished_drops_its_extra_row_and_frees_its_blocks_once():
    sched = make_scheduler(num_blocks=8)
    req = make_request("a", [1, 2, 3], max_tokens=10, eos=99)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance_in_flight(first)
    second = sched.schedule()
    sched.advance_in_flight(second)  # a row of a request that will turn out finished
    assert sched.resolve_in_flight(first, {"a": 99}) == [req]  # EOS
    assert req.status is RequestStatus.FINISHED_STOPPED and req.output_token_ids == [99]
    assert sched.resolve_in_flight(second, {"a": 5}) == []  # dropped
    assert req.output_token_ids == [99] and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 8
    sched.block_manager.check_invariants([])


def test_a_request_ending_by_length_is_not_scheduled_past_its_last_token():
    sched = make_scheduler()
    req = make_request("a", [1, 2, 3], max_tokens=1)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance_in_flight(first)
    assert sched.schedule().is_empty  # its pending token is its last, whatever it is
    assert sched.resolve_in_flight(first, {"a": 4}) == [req] and req.status is RequestStatus.FINISHED_LENGTH


def test_aborting_a_request_with_tokens_in_flight_drops_its_placeholders():
    sched = make_scheduler(num_blocks=8)
    req = make_request("a", [1, 2, 3], max_tokens=10)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance_in_flight(first)
    sched.abort_request("a")
    assert req.output_token_ids == [] and req.num_pending_outputs == 0
    assert sched.resolve_in_flight(first, {"a": 4}) == []
    assert sched.block_manager.num_free_blocks == 8
