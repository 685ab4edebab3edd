"""The runner's staged step inputs equal the plain per-token construction, block-table rows follow appends,
vanished and preempted sequences, and rotary tables are computed once per step, not once per layer."""

from __future__ import annotations

import torch

from small4.bench.synthetic import TINY_BENCH_SPEC, build_random_model, model_config
from small4.engine.cuda_graphs import _padded_table
from small4.engine.request import Request
from small4.engine.sampling_params import SamplingParams
from small4.engine.scheduler import ScheduledRequest
from small4.engine.step_inputs import StepInputs, token_slice
from small4.model.context import AttentionMetadata

BS, PAD = 4, 99


def _request(rid: str, prompt: list[int], outputs: list[int], blocks: list[int]) -> Request:
    req = Request(rid, prompt, SamplingParams())
    req.output_token_ids = list(outputs)
    req.block_ids = list(blocks)
    return req


def _expected(items: list[ScheduledRequest]) -> dict:
    """The per-token lists the runner used to build (the definition the staged step must match)."""
    tokens, positions, slots, starts, lens, rows = [], [], [], [0], [], []
    for it in items:
        req = it.request
        tokens += token_slice(req, it.start, it.start + it.num_new_tokens)
        for p in range(it.start, it.start + it.num_new_tokens):
            positions.append(p)
            slots.append(req.block_ids[p // BS] * BS + p % BS)
        starts.append(starts[-1] + it.num_new_tokens)
        lens.append(it.start + it.num_new_tokens)
        if it.samples:
            rows.append(starts[-1] - 1)
    width = max(len(it.request.block_ids) for it in items)
    tables = [it.request.block_ids + [PAD] * (width - len(it.request.block_ids)) for it in items]
    return dict(tokens=tokens, positions=positions, slots=slots, starts=starts, lens=lens, rows=rows, tables=tables)


def _check(step, items) -> None:
    want = _expected(items)
    assert step.input_ids.tolist() == want["tokens"]
    assert step.positions.tolist() == want["positions"]
    assert step.slot_mapping.tolist() == want["slots"]
    assert step.query_start_loc == want["starts"] and step.seq_lens_list == want["lens"]
    assert step.seq_lens.tolist() == want["lens"] and step.seq_lens.dtype == torch.int32
    assert step.sample_rows.tolist() == want["rows"]
    assert step.block_tables.tolist() == want["tables"] and step.block_tables.dtype == torch.int32
    assert step.all_rows_sample == (len(want["rows"]) == len(want["tokens"]))


def test_mixed_step_equals_per_token_lists():
    a = _request("a", [5, 6, 7, 8, 9, 10, 11], [], [3, 8])  # prefill chunk [2, 7) over two blocks
    b = _request("b", [1, 2, 3], [40, 41], [7, 2])  # decode at position 4: second block
    c = _request("c", list(range(20, 30)), [], [1, 0, 5])  # chunk [0, 6) that does not sample
    items = [ScheduledRequest(b, 1, 4, True), ScheduledRequest(a, 5, 2, True), ScheduledRequest(c, 6, 0, False)]
    inputs = StepInputs(torch.device("cpu"), BS, PAD)
    _check(inputs.stage(items), items)


def test_table_rows_follow_appends_vanishing_and_preemption():
    inputs = StepInputs(torch.device("cpu"), BS, PAD)
    a = _request("a", [1, 2, 3], [4], [10])
    b = _request("b", [1, 2, 3, 4, 5], [6, 7, 8], [11, 12])
    decode = lambda *reqs: [ScheduledRequest(r, 1, r.num_tokens - 1, True) for r in reqs]  # noqa: E731
    _check(inputs.stage(decode(a, b)), decode(a, b))
    a.output_token_ids.append(9)  # a reaches position 4: a new block, appended to its row
    a.block_ids.append(13)
    _check(inputs.stage(decode(a, b)), decode(a, b))
    # b vanishes (finished): its row is reused by c, whose shorter table must not show b's old ids
    c = _request("c", [9], [], [20])
    _check(inputs.stage(decode(a, c)), decode(a, c))
    # a preempted and recomputed with other blocks (same length): its row is rewritten, not appended to
    a.block_ids = [30, 31]
    step = inputs.stage(decode(a, c), preempted=[a])
    _check(step, decode(a, c))
    a.block_ids = [32, 33]  # ids changed without notice: detected by the last written id
    _check(inputs.stage(decode(a, c)), decode(a, c))
    # the id "c" reused at once by a new request with as many blocks and the same last id: its own row, rewritten
    c.block_ids = [20, 21]
    c.output_token_ids = [3, 3, 3, 3, 3]
    _check(inputs.stage(decode(a, c)), decode(a, c))
    c2 = _request("c", [9], [3, 3, 3, 3, 3], [5, 21])
    _check(inputs.stage(decode(a, c2)), decode(a, c2))
    many = [_request(f"r{i}", [1] * (i + 1), [], list(range(100 + 3 * i, 103 + 3 * i))) for i in range(9)]
    _check(inputs.stage(decode(*many)), decode(*many))  # grows the table (rows and buffers)


def test_padded_table_without_a_loop():
    tables = [[3, 1], [7], [2, 5, 6, 4]]
    assert _padded_table(tables, PAD).tolist() == [[3, 1, PAD, PAD], [7, PAD, PAD, PAD], [2, 5, 6, 4]]


def test_rope_tables_once_per_step_not_per_layer(monkeypatch):
    from dataclasses import replace

    config = model_config(replace(TINY_BENCH_SPEC, num_layers=3))
    model = build_random_model(config, torch.device("cpu"), torch.float32, "bf16", seed=0)
    calls = []
    model.rotary.register_forward_hook(lambda *_: calls.append(1))
    positions = torch.tensor([0, 1, 2, 5000])  # 5000: past the llama-4 scale's first step
    ids = torch.tensor([1000, 1001, 1002, 1003])
    out = model(ids, positions, AttentionMetadata.for_prefill([3, 1]))
    assert len(calls) == 1 and torch.isfinite(out).all()
    # the same forward with the rows recomputed in every layer, as before: identical
    monkeypatch.setattr(AttentionMetadata, "rope_tables", lambda self, positions, dtype, make: make())
    assert torch.equal(model(ids, positions, AttentionMetadata.for_prefill([3, 1])), out) and len(calls) == 4


def test_table_grows_by_doubling_only_the_short_dimension():
    """A sequence gaining a block every few steps widens the table; its row count must not grow with it."""
    inputs = StepInputs(torch.device("cpu"), BS, PAD)
    req = _request("a", [1], [], [0])
    for n in range(1, 200):
        req.output_token_ids.append(7)
        if len(req.block_ids) * BS < req.num_tokens:
            req.block_ids.append(n)
        items = [ScheduledRequest(req, 1, req.num_tokens - 1, True)]
        step = inputs.stage(items)
    _check(step, items)
    rows, width = inputs._table.shape
    assert rows <= 2 and len(req.block_ids) <= width < 2 * len(req.block_ids)
