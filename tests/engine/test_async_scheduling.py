"""Async scheduling (engine/overlap.py): with the overlap loop on, every request's outputs are exactly those of the
synchronous loop (greedy and seeded sampling) over randomized workloads: mixed prompt lengths and max_tokens, stop
token ids, stop strings, EOS, aborts mid-stream, preemption under a small block pool, chunked prefill, n > 1, prefix
cache hits and requests joining while others run; the block manager's books balance after every step and the pool
is free at the end. Requests that need the previous token on the host (a grammar, penalties, logprobs) switch the
loop to the synchronous step and back; a failed overlapped step names its requests and the engine keeps serving."""

from __future__ import annotations

import random

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.engine import Engine, StepFailedError
from small4.engine.sampling_params import SamplingParams
from small4.weights.tiny import make_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=11)


def _engine(model_dir, device, overlap: bool, **cfg) -> Engine:
    cfg.setdefault("block_size", 4)
    return Engine.from_model_dir(model_dir, EngineConfig(device=str(device), async_scheduling=overlap, **cfg))


def _blocks_for(model_dir, device, n: int) -> int:
    """``kv_cache_memory`` for a cache of ``n`` blocks of this model."""
    return n * _engine(model_dir, device, False).runner.bytes_per_block


def _drive(engine: Engine, script: list, abort_after: dict[str, int]) -> dict:
    """Run ``script`` ((call index, request id, prompt, params), sorted) through ``engine.step()``; abort a request
    once ``abort_after[id]`` of its tokens were emitted. Checks the block books after every call. Returns each
    sequence's tokens, text and finish."""
    got: dict[tuple[str, int], dict] = {}
    todo, call = list(script), 0

    def record(outputs) -> None:
        for out in outputs:
            seq = got.setdefault((out.request_id, out.index), {"tokens": [], "text": "", "finish": None})
            assert seq["finish"] is None, f"{out.request_id} emitted after it finished"
            seq["tokens"] += out.new_token_ids
            seq["text"] += out.new_text
            if out.finished:
                seq["finish"] = (out.finish_reason, out.stop_reason)

    while todo or engine.has_unfinished():
        while todo and todo[0][0] <= call:
            _, rid, prompt, params = todo.pop(0)
            engine.add_request(rid, prompt, params)
        record(engine.step())
        for rid, n in list(abort_after.items()):
            if sum(len(s["tokens"]) for (r, _), s in got.items() if r == rid) >= n:
                record(engine.abort_request(rid))
                del abort_after[rid]
        engine.block_manager.check_invariants(list(engine.scheduler._requests.values()))
        call += 1
        assert call < 2000, "the engine did not finish"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.sequences and not engine.children
    return got


def _workload(seed: int, eos: int) -> tuple[list, dict[str, int]]:
    """Random requests joining over the first calls: shared prefixes and repeated prompts (prefix hits), greedy and
    seeded sampling, n up to 2, min_tokens, an EOS bias on some (so EOS ends them), and some aborted mid-stream."""
    rng = random.Random(seed)
    shared = [rng.randrange(1000, 3000) for _ in range(13)]
    script, abort_after = [], {}
    for i in range(9):
        own = [rng.randrange(1000, 3000) for _ in range(rng.randint(1, 24))]
        prompt = shared + own if rng.random() < 0.4 else own
        if i >= 6 and rng.random() < 0.5:
            prompt = list(script[rng.randrange(len(script))][2])  # the same prompt again: a prefix-cache hit
        kw = {"max_tokens": rng.randint(1, 12), "n": 2 if rng.random() < 0.2 else 1}
        if rng.random() < 0.5:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=0.9, top_p=0.95, seed=rng.randrange(10_000))
        if rng.random() < 0.3:
            kw["logit_bias"] = {eos: rng.choice([2.0, 4.0])}
        if rng.random() < 0.2:
            kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        rid = f"r{i}"
        script.append((rng.randint(0, 8), rid, prompt, SamplingParams(**kw)))
        if rng.random() < 0.15:
            abort_after[rid] = rng.randint(1, 6)
    script.sort(key=lambda s: s[0])
    return script, abort_after


def _with_stops(script: list, first: dict) -> list:
    """Stop token ids and stop strings taken from what the requests generated without them, so they do hit."""
    rng = random.Random(len(script))
    out = []
    for call, rid, prompt, params in script:
        seq = first.get((rid, 0))
        kw = {}
        if seq and len(seq["tokens"]) > 3 and rng.random() < 0.4:
            kw["stop_token_ids"] = (seq["tokens"][rng.randrange(1, len(seq["tokens"]))],)
        elif seq and len(seq["text"]) > 6 and rng.random() < 0.5:
            at = rng.randrange(2, len(seq["text"]) - 2)
            kw["stop"] = (seq["text"][at : at + 2],)
        out.append((call, rid, prompt, SamplingParams(**{**params.__dict__, **kw}) if kw else params))
    return out


CONFIGS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 24, "max_num_seqs": 8, "long_prefill_token_threshold": 12},
    "no-prefix-cache": {"enable_prefix_caching": False, "max_num_seqs": 6},
    "small-pool": {"max_num_seqs": 16},  # kv_cache_memory set in the test: preemption
}


@pytest.mark.parametrize(
    "config, seed",
    [("plain", 0), ("plain", 1), ("chunked", 0), ("no-prefix-cache", 0), ("small-pool", 0), ("small-pool", 1)],
)
def test_overlap_outputs_equal_the_synchronous_loop(model_dir, device, config, seed):
    cfg = dict(CONFIGS[config])
    if config == "small-pool":
        cfg["kv_cache_memory"] = _blocks_for(model_dir, device, 16)
    sync = _engine(model_dir, device, False, **cfg)
    script, abort_after = _workload(seed, sync.tokenizer.eos_id)
    script = _with_stops(script, _drive(sync, script, {}))
    expected = _drive(_engine(model_dir, device, False, **cfg), script, dict(abort_after))
    overlap = _engine(model_dir, device, True, **cfg)
    assert _drive(overlap, script, dict(abort_after)) == expected
    assert overlap.num_overlapped_steps > overlap.num_steps // 2
    finishes = {s["finish"][0] for s in expected.values()}
    assert {"stop", "length"} <= finishes
    if config == "small-pool":
        assert overlap.num_preemptions > 0


def _allow_some(vocab: int):
    """A grammar-like mask factory: one provider per sequence, allowing every seventh token."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[1000::7] = True
    return (lambda: lambda output_ids: allowed), allowed


@pytest.mark.parametrize("kind", ["grammar", "penalties", "logprobs"])
def test_a_request_needing_the_synchronous_step_switches_the_loop_and_back(model_dir, device, kind):
    """Plain requests overlap; while a request with a grammar / penalties / logprobs is live every step is
    synchronous (nothing in flight between calls); once it is done the loop overlaps again. Outputs are the
    synchronous loop's."""
    results = {}
    for overlap in (False, True):
        engine = _engine(model_dir, device, overlap)
        factory, allowed = _allow_some(engine.runner.config.text.vocab_size)
        plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for i in range(3):
            engine.add_request(f"p{i}", [1000 + 17 * i + j for j in range(5 + i)], plain)
        outputs = [o for _ in range(4) for o in engine.step()]
        overlapped_before = engine.num_overlapped_steps
        special = {
            "grammar": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
            "penalties": SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3, ignore_eos=True),
            "logprobs": SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True),
        }[kind]
        engine.add_request("s", [1500, 1600, 1700], special, factory if kind == "grammar" else None)
        outputs += engine.step()  # finishes the step in flight: nothing launched
        while "s" in engine.children:
            assert engine._in_flight is None
            outputs += engine.step()
            assert engine.num_overlapped_steps == overlapped_before
        while engine.has_unfinished():
            outputs += engine.step()
        if overlap:
            assert overlapped_before >= 3
            assert engine.num_overlapped_steps > overlapped_before + 10  # overlapping again after it
        tokens: dict[str, list[int]] = {}
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.request_id == "s" and kind == "logprobs":
                assert len(out.logprobs) == len(out.new_token_ids)
        results[overlap] = tokens
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert results[True] == results[False]
    if kind == "grammar":
        assert all(allowed[t] for t in results[True]["s"])


def test_a_failed_overlapped_step_names_its_requests_and_the_engine_keeps_serving(model_dir, device):
    """A launch that raises ends the requests of that step and of the step in flight (whose tokens fed it), frees
    their blocks, and the next requests run as if nothing happened."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reference = _engine(model_dir, device, False)
    reference.add_request("after", [1200, 1300, 1400, 1500], params)
    expected = _drive(reference, [], {})
    engine = _engine(model_dir, device, True)
    engine.add_request("a", [1100, 1101, 1102], params)
    engine.add_request("b", [1103, 1104], params)
    for _ in range(3):
        engine.step()
    real = engine.runner.execute
    engine.runner.execute = lambda plan: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(StepFailedError) as err:
        engine.step()
    assert sorted(err.value.request_ids) == ["a", "b"]
    engine.runner.execute = real
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.add_request("after", [1200, 1300, 1400, 1500], params)
    assert _drive(engine, [], {}) == expected


def test_abort_of_a_request_whose_token_is_in_flight(model_dir, device):
    """Aborted between calls while its token is on the device: the abort output ends it, the in-flight token is
    dropped, the others are unaffected and every block comes back."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    runs = {}
    for overlap in (False, True):
        engine = _engine(model_dir, device, overlap)
        script = [(0, "a", [1100, 1101, 1102], params), (0, "b", [1103, 1104], params)]
        runs[overlap] = _drive(engine, script, {"a": 3})
    assert runs[True] == runs[False]
    assert runs[True][("a", 0)]["finish"] == ("abort", None) and len(runs[True][("a", 0)]["tokens"]) == 3


def test_overlap_through_the_decode_graph_buffers(model_dir, device):
    """Decode steps through the decode-graph buffers (captured on CUDA, the static-buffer path elsewhere) take their
    input tokens from the device-side patch too: outputs equal the synchronous loop's."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    script = [(0, f"r{i}", [1000 + 31 * i + j for j in range(3 + 2 * i)], params) for i in range(4)]
    runs = {}
    for overlap in (False, True):
        engine = _engine(model_dir, device, overlap)
        if engine.runner.decode_graphs is None:
            engine.runner.capture_decode_graphs(16, 8, capture=device.type == "cuda")
        runs[overlap] = _drive(engine, script, {})
        assert engine.num_overlapped_steps > (5 if overlap else -1)
    assert runs[True] == runs[False]
