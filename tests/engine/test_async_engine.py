"""The asyncio front on the real tiny model: concurrent streams equal the offline engine token for token, aborts
(explicit, by closing, by cancelling, by dropping the stream) free every block, rejections raise at ``add``, a
failing step fails only its own requests (RequestFailedError) unless steps keep failing (EngineDeadError), and
shutdown lets in-flight requests finish. Every test runs over the synchronous loop and over async scheduling
(engine/overlap.py), whose offline runs are the synchronous ones."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import replace

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.async_engine import (
    MAX_CONSECUTIVE_STEP_FAILURES,
    AsyncEngine,
    EngineDeadError,
    RequestFailedError,
    RequestStream,
)
from small4.engine.engine import LLM, Engine
from small4.engine.outputs import RequestOutput
from small4.engine.sampling_params import SamplingParams
from small4.weights.tiny import make_tiny

CFG = EngineConfig(block_size=4, kv_cache_memory=1 << 20)
LONG = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=7)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def engine(model_dir, request) -> Engine:
    return Engine.from_model_dir(model_dir, replace(CFG, async_scheduling=request.param))


def _prompt(i: int, length: int) -> list[int]:
    return torch.randint(1000, 3000, (length,), generator=torch.Generator().manual_seed(i)).tolist()


async def _collect(stream: RequestStream) -> dict[int, list[RequestOutput]]:
    by_index: dict[int, list[RequestOutput]] = {}
    async for out in stream:
        by_index.setdefault(out.index, []).append(out)
    return by_index


async def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _idle_and_empty(front: AsyncEngine) -> bool:
    stats = front.stats
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def _assert_all_blocks_free(engine: Engine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_concurrent_streams_equal_offline_runs(model_dir, engine):
    requests = [
        (
            f"r{i}",
            _prompt(i, 3 + 5 * i % 23),
            SamplingParams(temperature=0.0, max_tokens=3 + 2 * i % 9, n=1 + i % 3 // 2),
        )
        for i in range(12)
    ]
    llm = LLM(model_dir, CFG)
    expected = {}
    for rid, prompt, params in requests:
        result = llm.generate([prompt], params)[0]
        expected[rid] = {o.index: (o.token_ids, o.finish_reason) for o in result.outputs}

    async def main():
        async with AsyncEngine(engine) as front:
            streams = [await front.add(rid, prompt, params) for rid, prompt, params in requests]
            collected = await asyncio.gather(*(_collect(s) for s in streams))
            await _wait_until(lambda: _idle_and_empty(front))
            return collected, front.stats

    collected, stats = asyncio.run(main())
    for (rid, _, params), by_index in zip(requests, collected, strict=True):
        assert sorted(by_index) == list(range(params.n))
        for index, outs in by_index.items():
            assert all(o.request_id == rid for o in outs)
            assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
            tokens = [t for o in outs for t in o.new_token_ids]
            assert (tokens, outs[-1].finish_reason) == expected[rid][index]
    assert sum(params.n for *_, params in requests) == 16  # the mix does contain n=2 requests
    assert stats.num_requests_total == 12
    assert stats.prompt_tokens_total == sum(len(p) for _, p, _ in requests)
    assert stats.generation_tokens_total == sum(len(t) for e in expected.values() for t, _ in e.values())
    _assert_all_blocks_free(engine)


def test_abort_mid_stream_ends_it_with_abort_and_frees_blocks(engine):
    """After ``abort``, the stream yields one last output per running sequence with finish_reason "abort"."""

    async def main():
        async with AsyncEngine(engine) as front:
            stream = await front.add("a", _prompt(1, 9), SamplingParams(temperature=0.0, max_tokens=1000, n=2))
            seen = []
            async for out in stream:
                seen.append(out)
                if len(seen) == 6:
                    front.abort("a")
            await _wait_until(lambda: _idle_and_empty(front))
            return seen

    seen = asyncio.run(main())
    finals = [o for o in seen if o.finished]
    assert sorted(o.index for o in finals) == [0, 1]
    assert {o.finish_reason for o in finals} == {"abort"}
    assert len(seen) < 100
    _assert_all_blocks_free(engine)


@pytest.mark.parametrize("how", ["aclose", "async_with", "cancel", "drop"])
def test_leaving_a_stream_early_aborts_the_request(engine, how):
    async def consume(stream: RequestStream, k: int) -> None:
        async for _ in stream:
            k -= 1
            if k == 0 and how != "cancel":
                break

    async def main():
        async with AsyncEngine(engine) as front:
            stream = await front.add("x", _prompt(2, 7), LONG)
            if how == "aclose":
                await consume(stream, 3)
                await stream.aclose()
            elif how == "async_with":
                async with stream:
                    await consume(stream, 3)
            elif how == "cancel":  # the consumer task is cancelled while it waits for the next token
                task = asyncio.create_task(consume(stream, -1))
                await _wait_until(lambda: front.generation_tokens_total >= 3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:  # break out and drop the last reference: the stream's finaliser aborts
                await consume(stream, 3)
                del stream
                gc.collect()
            await _wait_until(lambda: _idle_and_empty(front))
            assert front.generation_tokens_total < 200
            again = await front.add("y", _prompt(2, 7), SamplingParams(temperature=0.0, max_tokens=2))
            assert len([o async for o in again]) == 2

    asyncio.run(main())
    _assert_all_blocks_free(engine)


def test_invalid_requests_raise_at_add_and_the_engine_keeps_serving(engine):
    vocab = engine.runner.config.text.vocab_size
    ok = SamplingParams(temperature=0.0, max_tokens=3)

    async def main():
        async with AsyncEngine(engine) as front:
            with pytest.raises(ValueError, match="prompt token ids"):
                await front.add("bad-token", [1, vocab], ok)
            with pytest.raises(ValueError, match="max_model_len"):
                await front.add("too-long", [1000] * (engine.max_model_len + 1), ok)
            with pytest.raises(ValueError, match="logit_bias"):
                await front.add("bad-bias", [1000], SamplingParams(logit_bias={vocab + 5: 1.0}))
            running = await front.add("dup", _prompt(3, 5), LONG)
            with pytest.raises(ValueError, match="already in use"):
                await front.add("dup", _prompt(3, 5), ok)
            await running.aclose()
            outs = [o async for o in await front.add("good", _prompt(4, 6), ok)]
            assert front.healthy
            return outs

    outs = asyncio.run(main())
    assert [o.finished for o in outs] == [False, False, True]
    _assert_all_blocks_free(engine)


def _raising_mask_factory():
    """A grammar hook that raises when the sampler calls it: a real fault inside a step, on the engine thread."""

    def provider(output_token_ids):
        raise RuntimeError("matcher exploded")

    return provider


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model_dir, engine):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = LLM(model_dir, CFG).generate([_prompt(3, 7)], params)[0].outputs[0].token_ids

    async def main():
        async with AsyncEngine(engine) as front:
            bystander = await front.add("bystander", _prompt(1, 5), LONG)
            await bystander.__anext__()  # running: it shares the next step with the bad request
            bad = await front.add("bad", _prompt(2, 5), LONG, token_mask_factory=_raising_mask_factory)
            results = await asyncio.wait_for(
                asyncio.gather(_collect(bad), _collect(bystander), return_exceptions=True), timeout=10
            )
            assert all(isinstance(r, RequestFailedError) for r in results), results
            assert isinstance(results[0].__cause__, RuntimeError)
            assert front.healthy
            await _wait_until(lambda: _idle_and_empty(front))
            after = await _collect(await front.add("after", _prompt(3, 7), params))
            assert [t for o in after[0] for t in o.new_token_ids] == expected
            assert after[0][-1].finish_reason == "length"

    asyncio.run(main())
    _assert_all_blocks_free(engine)


def test_steps_that_keep_failing_kill_the_engine(engine):
    def broken(plan):
        raise RuntimeError("device lost")

    engine.runner.execute = broken

    async def main():
        front = AsyncEngine(engine)
        front.start()
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            with pytest.raises(RequestFailedError):
                await asyncio.wait_for(_collect(await front.add(f"s{i}", _prompt(i, 4), LONG)), timeout=5)
            assert front.healthy
        last = await front.add("last", _prompt(9, 4), LONG)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(last), timeout=5)
        assert not front.healthy
        with pytest.raises(EngineDeadError):
            await front.add("late", _prompt(9, 4), LONG)
        await asyncio.wait_for(front.shutdown(), timeout=5)

    asyncio.run(main())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_shutdown_finishes_in_flight_requests_then_refuses_new_ones(engine):
    async def main():
        front = AsyncEngine(engine)
        front.start()
        stream = await front.add("s", _prompt(5, 6), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        consumer = asyncio.create_task(_collect(stream))
        await front.shutdown()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await front.add("late", _prompt(6, 4), LONG)
        return await consumer

    by_index = asyncio.run(main())
    assert sum(len(o.new_token_ids) for o in by_index[0]) == 30
    assert by_index[0][-1].finish_reason == "length"
    _assert_all_blocks_free(engine)


def test_shutdown_timeout_aborts_what_is_left(engine):
    async def main():
        front = AsyncEngine(engine)
        front.start()
        stream = await front.add("s", _prompt(7, 6), LONG)
        consumer = asyncio.create_task(_collect(stream))
        await asyncio.wait_for(front.shutdown(timeout=0.05), timeout=5)
        return await consumer

    by_index = asyncio.run(main())
    assert by_index[0][-1].finish_reason == "abort"
    _assert_all_blocks_free(engine)
