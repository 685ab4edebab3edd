"""The engine core process: one ``Engine`` stepped by one loop, fed and read over ZMQ (``python -m
small4.core.process``, started by ``CoreClient``).

The loop is ``AsyncEngine``'s engine thread without asyncio: apply the commands that arrived (block on the socket
only when idle), step once, send one ``StepBatch`` with everything that iteration produced (adds accepted or
refused, every request's deltas, failed steps, stats). A failed step fails its own requests; only
``MAX_CONSECUTIVE_STEP_FAILURES`` in a row end the loop (a ``CoreExit`` with the error, exit code 1).

The core ignores SIGINT and SIGTERM: a Ctrl-C or a supervisor signalling the whole process group must let the
API process drain (it sends ``Stop``). It ends when told to stop, when its loop dies, or when its parent is gone
(a watchdog thread polls the parent pid and exits at once: no orphan holds the device).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from small4.config import EngineConfig
from small4.core import messages as m
from small4.engine.async_engine import EngineStats, StepFailures
from small4.engine.engine import Engine, StepFailedError
from small4.engine.outputs import RequestOutput

log = logging.getLogger("small4.core")

PARENT_POLL_S = 0.2
PENDING_POLL_MS = 5  # how often an idle core looks at grammar compiles in flight


@dataclass
class _Pending:
    """An add waiting for its grammar to compile; ``aborted`` when an abort came first."""

    add: m.AddRequest
    factory: Future[Any]
    aborted: bool = False


@dataclass
class _Batch:
    accepted: list[str] = field(default_factory=list)
    rejected: list[m.Rejection] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[m.StepFailure] = field(default_factory=list)


class EngineCore:
    """The loop around one engine; ``receive(timeout_ms)`` yields decoded messages, ``send`` ships one."""

    def __init__(self, engine: Engine, receive: Any, send: Any) -> None:
        self.engine, self._receive, self._send = engine, receive, send
        self._live: dict[str, int] = {}  # request id -> sequences not yet finished
        self._pending: dict[str, _Pending] = {}
        self._counters = [0, 0, 0]  # requests, prompt tokens, generation tokens
        self._step_failures = StepFailures()
        self._stats: EngineStats | None = None
        self._grammars: Any = None

    def run(self) -> int:
        stopping = False
        try:
            while True:
                busy = self.engine.has_unfinished()
                if stopping and not busy and not self._pending:
                    break
                batch = _Batch()
                # never spin: while only grammar compiles are in flight, look at them every few ms
                timeout = 0 if busy else (PENDING_POLL_MS if self._pending else None)
                for msg in self._receive(timeout):
                    stopping |= self._apply(msg, batch)
                self._admit_compiled(batch)
                if self.engine.has_unfinished():
                    self._step(batch)
                self._flush(batch)
        except BaseException as exc:  # noqa: BLE001 - the client must hear why, or its streams would hang
            log.exception("engine core loop died")
            self._send(m.CoreExit(error=f"the engine loop died: {exc!r}"))
            return 1
        finally:
            if self._grammars is not None:
                self._grammars.close()
        self._send(m.CoreExit())
        return 0

    # ---- commands ---------------------------------------------------------------------------------------
    def _apply(self, msg: m.Message, batch: _Batch) -> bool:
        """Apply one command; True when it asks the loop to stop."""
        if isinstance(msg, m.AddRequest):
            if msg.grammar is None:
                self._add(msg, None, batch)
            else:
                self._pending[msg.request_id] = _Pending(msg, self._grammar_pool().submit(msg.grammar))
        elif isinstance(msg, m.Abort):
            self._abort(msg.request_id, batch)
        elif isinstance(msg, m.AbortAll | m.Stop):
            if isinstance(msg, m.AbortAll) or msg.abort_all:
                for request_id in [*self._live, *self._pending]:
                    self._abort(request_id, batch)
            return isinstance(msg, m.Stop)
        else:
            log.error("engine core: ignoring a %s, which only the core sends", type(msg).__name__)
        return False

    def _grammar_pool(self) -> Any:
        if self._grammars is None:
            from small4.core.grammars import CoreGrammars

            self._grammars = CoreGrammars(self.engine.tokenizer, self.engine.runner.config.text.vocab_size)
        return self._grammars

    def _add(self, add: m.AddRequest, factory: Any, batch: _Batch) -> bool:
        try:
            self.engine.add_request(
                add.request_id, add.prompt_token_ids, add.params, factory, add.block_hash_extras, add.images
            )
        except Exception as exc:  # the caller's to handle (ValueError: a 400); the engine is unchanged
            self._reject(add.request_id, exc, batch)
            return False
        self._live[add.request_id] = add.params.n
        self._counters[0] += 1
        self._counters[1] += len(add.prompt_token_ids)
        batch.accepted.append(add.request_id)
        return True

    def _reject(self, request_id: str, exc: BaseException, batch: _Batch) -> None:
        kind = "value" if isinstance(exc, ValueError) else "runtime"
        batch.rejected.append(m.Rejection(request_id, kind, str(exc)))

    def _admit_compiled(self, batch: _Batch) -> None:
        for request_id, pending in list(self._pending.items()):
            if not pending.factory.done():
                continue
            del self._pending[request_id]
            try:
                factory = pending.factory.result()
            except Exception as exc:  # noqa: BLE001 - a grammar that does not compile here fails its request
                self._reject(request_id, exc, batch)
                continue
            if self._add(pending.add, factory, batch) and pending.aborted:
                self._abort(request_id, batch)

    def _abort(self, request_id: str, batch: _Batch) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:  # added (then aborted) once its grammar is ready, so its stream ends as usual
            pending.aborted = True
            return
        self._publish(self.engine.abort_request(request_id), batch)

    # ---- steps ------------------------------------------------------------------------------------------
    def _step(self, batch: _Batch) -> None:
        try:
            outputs = self.engine.step()
        except StepFailedError as exc:
            self._step_failures.record(exc)
            for request_id in exc.request_ids:
                self._live.pop(request_id, None)
            batch.failed.append(m.StepFailure(list(exc.request_ids), repr(exc.__cause__)))
            return
        self._step_failures.reset()
        self._publish(outputs, batch)

    def _publish(self, outputs: list[RequestOutput], batch: _Batch) -> None:
        for out in outputs:
            self._counters[2] += len(out.new_token_ids)
            if out.finished and out.request_id in self._live:
                self._live[out.request_id] -= 1
                if self._live[out.request_id] <= 0:
                    del self._live[out.request_id]
        batch.outputs.extend(outputs)

    def _flush(self, batch: _Batch) -> None:
        """One message for the iteration, sent only when something happened or the stats moved."""
        stats = self._snapshot()
        if stats == self._stats and not (batch.accepted or batch.rejected or batch.outputs or batch.failed):
            return
        self._stats = stats
        self._send(m.StepBatch(batch.accepted, batch.rejected, batch.outputs, batch.failed, stats))

    def _snapshot(self) -> EngineStats:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        requests, prompt, generated = self._counters
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting + sum(p.add.params.n for p in self._pending.values()),
            kv_cache_usage=blocks.usage,
            prefix_cache_hit_rate=blocks.prefix_cache_hit_rate,
            num_requests_total=requests,
            prompt_tokens_total=prompt,
            generation_tokens_total=generated,
        )


# ---- the process ----------------------------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the API process is gone (killed, crashed): nothing else would ever stop this one."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(2)
        time.sleep(PARENT_POLL_S)


def _zmq_channel(input_addr: str, output_addr: str) -> tuple[Any, Any, Any]:
    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(input_addr)
    push.connect(output_addr)
    return ctx, pull, push


def _receiver(pull: Any) -> Any:
    import zmq

    def receive(timeout_ms: int | None) -> list[m.Message]:
        if not pull.poll(timeout_ms):
            return []
        out = []
        while True:
            try:
                data = pull.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return out
            try:
                out.append(m.decode(data))
            except m.MessageError as e:
                log.error("engine core: dropping a malformed message: %s", e)

    return receive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="small4.core.process")
    p.add_argument("--model", required=True)
    p.add_argument("--engine-config", required=True, help="EngineConfig as JSON")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), name="small4-core-parent", daemon=True).start()
    ctx, pull, push = _zmq_channel(args.input, args.output)

    def send(msg: m.Message) -> None:
        push.send(m.encode(msg), copy=False)

    try:
        engine = Engine.from_model_dir(args.model, EngineConfig(**json.loads(args.engine_config)))
    except BaseException as exc:  # noqa: BLE001 - the client is waiting for Ready: tell it why not
        log.exception("engine core: the engine could not be built")
        send(m.CoreExit(error=f"the engine could not be built: {exc!r}"))
        push.close(linger=2000)
        return 1
    send(m.Ready(os.getpid(), engine.max_model_len, engine.scheduler.config.max_num_seqs, _max_cached(engine)))
    # The loop runs on its own thread, as the in-process engine thread does: on CPU, torch's OpenMP work issued from
    # the main thread ran 20x slower than from a second thread on a loaded 2-core machine (100 tokens: 32 s vs 1.6 s).
    codes: list[int] = []
    core = EngineCore(engine, _receiver(pull), send)
    loop = threading.Thread(target=lambda: codes.append(core.run()), name="small4-core-engine")
    loop.start()
    loop.join()
    code = codes[0] if codes else 1
    push.close(linger=5000)
    pull.close(linger=0)
    ctx.term()
    return code


def _max_cached(engine: Engine) -> int:
    return int(engine.runner.max_cached_tokens)


if __name__ == "__main__":
    sys.exit(main())
