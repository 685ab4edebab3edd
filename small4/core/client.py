"""``CoreClient``: ``AsyncEngine``'s interface in the API process, the engine itself in a core process.

The API process keeps what HTTP needs (parsing, rendering, SSE, the output parser) and nothing of the step: the
core (``small4.core.process``) schedules, runs the model, samples and detokenizes under its own GIL. They talk
over two ZMQ PUSH/PULL pipes on ``ipc://`` sockets in a private temp dir, each message one msgpack map of
``messages.py``. Two threads here own the sockets: the sender drains a ``queue.SimpleQueue`` (so ``abort`` stays
thread-safe and reentrant, as ``AsyncEngine``'s inbox: a stream dropped in a GC finaliser aborts its request) and
the receiver decodes the core's per-step batches and hands each, whole, to the event loop, which fans the deltas
out to the request streams (``_Sink`` / ``RequestStream``, the same as in-process).

Faults: the receiver polls the process every ``POLL_S``; a core that exits without a clean ``CoreExit`` (or
reports its loop died) marks the client dead: every stream and pending add raises ``EngineDeadError``,
``healthy`` turns False and ``on_dead`` runs (``small4 serve`` then stops and exits non-zero). ``shutdown``
drains (``Stop``; after its timeout, ``Stop(abort_all)``), and the process is always reaped: ``close`` (also at
interpreter exit) kills it if it has not exited within ``KILL_AFTER_S``; the core itself exits when its parent
goes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from small4.config import EngineConfig, ModelConfig, load_model_config
from small4.core import messages as m

# the stream machinery is AsyncEngine's own, so a stream behaves the same whichever side the engine runs on
from small4.engine.async_engine import (
    EngineDeadError,
    EngineFront,
    EngineStats,
    RequestFailedError,
    RequestStream,
    _dead_copy,
    _Sink,
)
from small4.engine.engine import TokenMaskFactory
from small4.engine.multimodal import ImageInput
from small4.engine.outputs import RequestOutput
from small4.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the receiver looks at the core process while no message arrives
KILL_AFTER_S = 10.0  # close(): how long a core that was told to stop may take to exit
_CLOSE = object()


@dataclass(frozen=True)
class _RunnerView:
    config: ModelConfig
    max_cached_tokens: int


@dataclass(frozen=True)
class _SchedulerConfigView:
    max_num_seqs: int


@dataclass(frozen=True)
class _SchedulerView:
    config: _SchedulerConfigView


@dataclass(frozen=True)
class CoreEngineView:
    """What the server reads of ``AsyncEngine.engine`` (model config, limits), as the core reported it."""

    runner: _RunnerView
    scheduler: _SchedulerView
    max_model_len: int


class CoreClient(EngineFront):
    """Starts the engine core process (blocking until its engine is built) and serves it to asyncio clients with
    ``AsyncEngine``'s methods: ``start``, ``add`` -> ``RequestStream``, ``abort``, ``abort_all``, ``shutdown``,
    ``healthy``, ``stats`` and the counters."""

    def __init__(
        self,
        model_dir: str | Path,
        engine_cfg: EngineConfig | None = None,
        start_timeout_s: float = 900.0,
        on_dead: Callable[[], None] | None = None,
    ) -> None:
        import zmq

        engine_cfg = engine_cfg or EngineConfig()
        self.on_dead = on_dead
        self._dir = tempfile.mkdtemp(prefix="small4-core-")
        self._zmq = zmq.Context()
        self._push, self._pull = self._zmq.socket(zmq.PUSH), self._zmq.socket(zmq.PULL)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block a send: the core reads everything it is sent
        self._pull.setsockopt(zmq.RCVHWM, 0)
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._push.bind(input_addr)
        self._pull.bind(output_addr)
        cmd = [sys.executable, "-m", "small4.core.process", "--model", str(model_dir)]
        cmd += ["--engine-config", json.dumps(asdict(engine_cfg)), "--input", input_addr, "--output", output_addr]
        self.process = subprocess.Popen([*cmd, "--parent-pid", str(os.getpid())])
        atexit.register(self.close)
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stats = EngineStats()
        self._dead: EngineDeadError | None = None
        self.core_died = False  # the core ended without being told to: what makes `small4 serve` exit non-zero
        self._accepting = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Future[None] | None = None
        self._threads: list[threading.Thread] = []
        self._sinks: dict[str, _Sink] = {}  # event loop only
        self._adds: dict[str, asyncio.Future[None]] = {}  # event loop only: adds the core has not answered
        try:
            ready = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise
        config = load_model_config(model_dir, engine_cfg.attention_scale_mscale)
        self.engine = CoreEngineView(
            _RunnerView(config, ready.max_cached_tokens),
            _SchedulerView(_SchedulerConfigView(ready.max_num_seqs)),
            ready.max_model_len,
        )

    def _wait_ready(self, timeout_s: float) -> m.Ready:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._pull.poll(int(POLL_S * 1000)):
                msg = m.decode(self._pull.recv())
                if isinstance(msg, m.Ready):
                    return msg
                if isinstance(msg, m.CoreExit):
                    raise RuntimeError(f"the engine core did not start: {msg.error}")
            elif self.process.poll() is not None:
                raise RuntimeError(f"the engine core exited with code {self.process.returncode} while starting")
        raise RuntimeError(f"the engine core was not ready within {timeout_s:.0f} s")

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the socket threads; must be called from the event loop that will consume the streams."""
        if self._loop is not None:
            raise RuntimeError("the engine client was already started")
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._accepting = self._dead is None
        for target, name in ((self._send_loop, "small4-core-send"), (self._receive_loop, "small4-core-recv")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (after ``timeout`` s abort them), reap the core."""
        if self._loop is None or self._exited is None:
            self.close()
            return
        self._accepting = False
        self._outbox.put(m.Stop())
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: aborting requests still running after %.1f s", timeout)
            self._outbox.put(m.Stop(abort_all=True))
            await self._exited
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Reap the core (killed if it does not exit by itself within ``KILL_AFTER_S``) and free the sockets.
        Idempotent; blocking."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self.process.poll() is None:
            self._outbox.put(m.Stop(abort_all=True))  # not drained by shutdown (an exit on an error path)
        self._outbox.put(_CLOSE)
        try:
            self.process.wait(timeout=KILL_AFTER_S if self._loop is not None else 0.1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    async def __aenter__(self) -> CoreClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # ---- requests ---------------------------------------------------------------------------------------
    async def add(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        token_mask_factory: TokenMaskFactory | None = None,
        block_hash_extras: list[bytes | None] | None = None,
        images: list[ImageInput] | None = None,
    ) -> RequestStream:
        """As ``AsyncEngine.add``. A token mask must carry its ``GrammarSpec`` (``GrammarMaskFactory``): the core
        builds the matcher from it, since a callable cannot cross the process boundary."""
        self._check_accepting()
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        grammar = None
        if token_mask_factory is not None:
            grammar = getattr(token_mask_factory, "spec", None)
            if grammar is None:
                raise TypeError("a separate engine core needs a GrammarMaskFactory (a grammar spec), not a callable")
        assert self._loop is not None
        sink, accepted = _Sink(params.n), self._loop.create_future()
        self._sinks[request_id], self._adds[request_id] = sink, accepted
        self._outbox.put(
            m.AddRequest(request_id, list(prompt_token_ids), params, grammar, block_hash_extras, images or None)
        )
        stream = RequestStream(self, request_id, sink)  # type: ignore[arg-type]
        try:
            await accepted
        except asyncio.CancelledError:
            stream._leave()  # FIFO: the abort reaches the core after the add
            raise
        except BaseException:
            stream._done = stream._abort_sent = True
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """End a request within one step. Thread-safe, never blocks; unknown or finished ids are ignored."""
        if not self._closed and self._dead is None:
            self._outbox.put(m.Abort(request_id))

    def abort_all(self) -> None:
        """End every request in flight now (streams finish with "abort") and accept no new ones."""
        self._accepting = False
        if not self._closed and self._dead is None:
            self._outbox.put(m.AbortAll())

    def _started(self) -> bool:
        return self._loop is not None

    # ---- socket threads ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (msg := self._outbox.get()) is not _CLOSE:
            try:
                self._send(m.encode(msg))
            except Exception:  # noqa: BLE001 - a message that cannot be encoded must not stop the others
                log.exception("engine client: could not send a %s", type(msg).__name__)
                if isinstance(msg, m.AddRequest):
                    self._post(self._answer_add, msg.request_id, RuntimeError("the request could not be sent"))

    def _send(self, data: bytes) -> None:
        """Send without ever blocking on a core that is gone (a PUSH socket with no peer would wait forever)."""
        import zmq

        while True:
            try:
                self._push.send(data, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if self.process.poll() is not None:
                    return  # nobody to tell; the receiver reports the death
                time.sleep(0.001)

    def _receive_loop(self) -> None:
        """Decode the core's messages and hand each to the loop; notice a core that is gone."""
        while not self._closed:
            if not self._pull.poll(int(POLL_S * 1000)):
                if self.process.poll() is not None:
                    self._post(self._die, f"the engine core exited with code {self.process.returncode}")
                    return
                continue
            try:
                msg = m.decode(self._pull.recv())
            except m.MessageError as e:
                log.error("engine client: dropping a malformed message from the core: %s", e)
                continue
            if isinstance(msg, m.CoreExit):
                self._post(self._on_exit, msg.error)
                return
            if isinstance(msg, m.StepBatch):
                self._post(self._on_batch, msg)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- event-loop side --------------------------------------------------------------------------------
    def _on_batch(self, batch: m.StepBatch) -> None:
        for request_id in batch.accepted:
            self._answer_add(request_id, None)
        for r in batch.rejected:
            self._answer_add(r.request_id, (ValueError if r.error == "value" else RuntimeError)(r.message))
        self._deliver(batch.outputs)
        for failure in batch.failed:
            cause = RuntimeError(failure.message)
            for request_id in failure.request_ids:
                sink = self._sinks.pop(request_id, None)
                if sink is not None:
                    error = RequestFailedError(f"the engine step holding this request failed: {failure.message}")
                    error.__cause__ = cause
                    sink.fail(error)
        if batch.stats is not None:
            self._stats = batch.stats

    def _answer_add(self, request_id: str, error: BaseException | None) -> None:
        accepted = self._adds.pop(request_id, None)
        if error is not None:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink.ended = True
        if accepted is None or accepted.done():  # the caller was cancelled: its abort follows the add
            return
        if error is None:
            accepted.set_result(None)
        else:
            accepted.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None and sink.put(out):
                del self._sinks[out.request_id]

    def _on_exit(self, error: str | None) -> None:
        if error is not None:
            self._die(error)
        self._set_exited()

    def _die(self, reason: str) -> None:
        """The core is gone: fail every stream and pending add, stop accepting, tell ``on_dead``."""
        if self._dead is not None:
            return
        log.error("engine core: %s", reason)
        self._dead = EngineDeadError(reason)
        self.core_died = True
        self._accepting = False
        for request_id in list(self._adds):
            self._answer_add(request_id, _dead_copy(self._dead))
        for sink in self._sinks.values():
            sink.fail(_dead_copy(self._dead))
        self._sinks.clear()
        self._set_exited()
        if self.on_dead is not None:
            self.on_dead()

    def _set_exited(self) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
