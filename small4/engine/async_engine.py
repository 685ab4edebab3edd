"""The asyncio front of the engine: many clients add, stream and abort; one background thread steps.

vLLM v1's split, in one process: the engine core steps (blocking CPU/GPU work, so never on the event loop) and
the front streams and aborts. Exactly one thread, the engine thread, ever touches the ``Engine``: the front
hands it commands (add, abort, stop) through a FIFO inbox and it hands back outputs with
``loop.call_soon_threadsafe``. We chose one owner thread over one lock because a lock would be held for a whole
step (up to a long prefill chunk) and every ``add`` on the event loop would stall all streams behind it; with
an inbox the event loop never waits on the engine. The inbox is a ``queue.SimpleQueue``: its ``put`` is
reentrant, so an abort may be queued from a garbage-collection finaliser, and its FIFO order means an abort
followed by a new request with the same id can never be applied in the wrong order.

A step that raises fails only the requests it held (the engine has already aborted them): their streams raise
``RequestFailedError`` and the loop keeps stepping for everyone else. Only ``MAX_CONSECUTIVE_STEP_FAILURES``
failed steps in a row (a device that is really gone) kill the loop; then every stream and every later ``add``
raises ``EngineDeadError``.

State is split by thread. Engine thread: the engine, the inbox's consuming end, the counters behind
``EngineStats``. Event loop: the registry of request streams and their ``asyncio.Queue``s, the futures that
``add`` awaits. Nothing else is shared except the immutable ``EngineStats`` snapshot (swapped whole, so
reading it is one attribute load) and the ``_dead`` error, written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from small4.config import EngineConfig
from small4.engine.engine import Engine, StepFailedError, TokenMaskFactory
from small4.engine.multimodal import ImageInput
from small4.engine.outputs import RequestOutput
from small4.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


# A device that is really gone fails every step: after this many failed steps in a row the engine is declared
# dead (/health 503) instead of failing each new request forever. A bad request fails one step, not this many.
MAX_CONSECUTIVE_STEP_FAILURES = 8


class EngineDeadError(RuntimeError):
    """The engine loop can no longer serve requests: it raised outside a step, steps kept failing (see
    ``__cause__``), or it was shut down."""


class RequestFailedError(RuntimeError):
    """The engine step that held this request raised (see ``__cause__``); the request was ended and its blocks
    freed. The engine keeps serving the others."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics, refreshed by the engine thread after each step or batch of commands.

    ``num_running`` / ``num_waiting`` count sequences (a request with n=2 counts twice), as the scheduler does.
    ``prompt_tokens_total`` adds each accepted request's prompt once (as OpenAI usage does, whatever n is);
    ``generation_tokens_total`` adds every token emitted by every sequence.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_requests_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # speculative decoding (zeros without a draft model): drafts verified, accepted, sequence-steps that verified
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_verify_steps_total: int = 0


# ---- commands through the inbox (front -> engine thread) --------------------------------------------------
@dataclass(eq=False)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_mask_factory: TokenMaskFactory | None
    block_hash_extras: list[bytes | None] | None
    images: list[ImageInput] | None
    sink: _Sink
    accepted: asyncio.Future[None]


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _AbortAll:
    """End every request in flight (their streams finish with "abort"); the loop keeps running."""


@dataclass(frozen=True)
class _Stop:
    """Finish what is in flight, then exit; ``abort_all`` ends the in-flight requests first."""

    abort_all: bool = False


_Command = _Add | _Abort | _AbortAll | _Stop
_END = object()  # queued after a stream's last output


@dataclass(eq=False)
class _Sink:
    """Event-loop side of one request: where its outputs land. It stays registered until the engine has sent
    the last output of every sequence (even after the consumer left), so the id cannot be reused while stale
    outputs for it may still arrive."""

    n: int
    queue: asyncio.Queue[RequestOutput | BaseException | object] = field(default_factory=asyncio.Queue)
    num_finished: int = 0
    ended: bool = False  # nothing more will arrive: every sequence finished, or the engine died
    detached: bool = False  # the consumer is gone: drop deliveries

    def put(self, out: RequestOutput) -> bool:
        """Queue an output; True when it was the last one of the request."""
        self.num_finished += out.finished
        self.ended = self.num_finished >= self.n
        if not self.detached:
            self.queue.put_nowait(out)
            if self.ended:
                self.queue.put_nowait(_END)
        return self.ended

    def fail(self, error: BaseException) -> None:
        self.ended = True
        if not self.detached:
            self.queue.put_nowait(error)


class RequestStream:
    """The outputs of one request, as an async iterator: ``RequestOutput`` deltas of all its n sequences
    (told apart by ``index``), ending after the last sequence finished.

    Leaving early aborts the request: ``aclose()``, leaving an ``async with`` block, cancelling the task that
    waits on it (an HTTP client disconnect), or dropping the last reference to it. An aborted request's
    sequences that were still running end with an output whose ``finish_reason`` is "abort" (visible to a
    consumer that keeps iterating after ``AsyncEngine.abort``). If the engine dies, iteration raises
    ``EngineDeadError``.
    """

    def __init__(self, front: AsyncEngine, request_id: str, sink: _Sink) -> None:
        self.request_id = request_id
        self._front = front
        self._sink = sink
        self._done = False  # iteration is over for the consumer
        self._abort_sent = False

    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._sink.queue.get()
        except asyncio.CancelledError:
            self._leave()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it is still generating."""
        self._leave()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()

    def __del__(self) -> None:
        # A consumer that breaks out of ``async for`` and drops the stream must not leave the request running.
        # Only queues an abort (SimpleQueue.put is reentrant), so it is safe from any thread, at any time.
        with contextlib.suppress(Exception):
            self._leave()

    def _leave(self) -> None:
        self._done = True
        self._sink.detached = True
        if not self._sink.ended and not self._abort_sent:
            self._abort_sent = True
            self._front.abort(self.request_id)


class StepFailures:
    """Failed steps in a row: a failed step fails only its own requests, until ``MAX_CONSECUTIVE_STEP_FAILURES``
    in a row say the engine itself is broken (then ``record`` re-raises and the loop dies)."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def record(self, exc: StepFailedError) -> None:
        self.in_a_row += 1
        log.error("engine step failed (%d in a row): %r", self.in_a_row, exc.__cause__, exc_info=exc)
        if self.in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise exc

    def reset(self) -> None:
        self.in_a_row = 0


class EngineFront:
    """What every front of an engine reports from its last ``EngineStats`` and how it refuses adds: this
    ``AsyncEngine`` (an engine thread) and ``core.client.CoreClient`` (an engine core process). A subclass sets
    ``_stats``, ``_dead``, ``_accepting`` and says whether it was started."""

    _stats: EngineStats
    _dead: EngineDeadError | None
    _accepting: bool

    def _started(self) -> bool:
        raise NotImplementedError

    # ---- health and stats -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._dead is None

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_running(self) -> int:
        return self._stats.num_running

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._stats.kv_cache_usage

    @property
    def prompt_tokens_total(self) -> int:
        return self._stats.prompt_tokens_total

    @property
    def generation_tokens_total(self) -> int:
        return self._stats.generation_tokens_total

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise _dead_copy(self._dead)
        if not self._started():
            raise RuntimeError("call start() (or use `async with`) before adding requests")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")


class AsyncEngine(EngineFront):
    """Runs one ``Engine`` in a background thread and serves it to asyncio clients.

    ``start()`` inside a running event loop (or ``async with``), ``stream = await add(...)`` then
    ``async for out in stream``, ``abort(id)`` from anywhere, ``await shutdown()``.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._stats = EngineStats()
        self._dead: EngineDeadError | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None
        self._sinks: dict[str, _Sink] = {}  # event loop only
        self._live: dict[str, int] = {}  # engine thread only: request id -> sequences not yet finished
        self._counters = [0, 0, 0]  # engine thread only: requests, prompt tokens, generation tokens
        self._step_failures = StepFailures()  # engine thread only

    def _started(self) -> bool:
        return self._thread is not None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, engine_cfg: EngineConfig | None = None) -> AsyncEngine:
        """Loads the model (blocking: do it before serving, or in a worker thread)."""
        return cls(Engine.from_model_dir(model_dir, engine_cfg))

    @property
    def engine(self) -> Engine:
        """The wrapped engine: read it only while the loop is idle or stopped (tests, post-mortem)."""
        return self._engine

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; must be called from the event loop that will consume the streams."""
        if self._thread is not None:
            raise RuntimeError("the engine loop was already started")
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="small4-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting requests, let in-flight ones finish, join the thread.

        After ``timeout`` seconds (None: no limit) the requests still running are aborted (their streams end
        with finish_reason "abort"). Safe to call twice, and after the engine died."""
        if self._thread is None or self._exited is None:
            return
        self._accepting = False
        self._inbox.put(_Stop())
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: aborting requests still running after %.1f s", timeout)
            self._inbox.put(_Stop(abort_all=True))
            await self._exited
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
        """Queue a request and return its stream once the engine accepted it.

        Rejections raise here, before any streaming: ``ValueError`` for what ``Engine.add_request`` refuses
        (token ids outside the vocabulary, a prompt over max_model_len or over the whole cache, an id already
        in flight), ``EngineDeadError`` if the engine died or is shutting down. The await lasts at most until
        the end of the step in progress. ``token_mask_factory`` and its providers are called on the engine thread.
        """
        self._check_accepting()
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        assert self._loop is not None
        sink = _Sink(params.n)
        cmd = _Add(
            request_id,
            list(prompt_token_ids),
            params,
            token_mask_factory,
            block_hash_extras,
            images,
            sink,
            self._loop.create_future(),
        )
        self._sinks[request_id] = sink
        self._inbox.put(cmd)
        if self._dead is not None:  # died after the check above: the engine thread may never see the command
            self._settle(cmd, _dead_copy(self._dead))
        stream = RequestStream(self, request_id, sink)
        try:
            await cmd.accepted
        except asyncio.CancelledError:
            stream._leave()  # FIFO: the abort reaches the engine after the add, whichever way the add went
            raise
        except BaseException:
            stream._done = stream._abort_sent = True  # rejected: nothing to abort when the stream is dropped
            raise
        return stream

    def abort_all(self) -> None:
        """End every request in flight now (streams finish with "abort") and accept no new ones: what a server
        does when its shutdown timeout runs out, so clients still get a final chunk. Thread-safe."""
        self._accepting = False
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_AbortAll())

    def abort(self, request_id: str) -> None:
        """End a request (all its sequences) and free its blocks within one step. Thread-safe, never blocks;
        unknown or finished ids are ignored."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_Abort(request_id))

    # ---- event-loop side of the hand-over ---------------------------------------------------------------
    def _settle(self, cmd: _Add, error: BaseException | None) -> None:
        """The engine accepted (error None) or refused an add: wake the caller; unregister a refusal."""
        if error is not None:
            cmd.sink.ended = True
            if self._sinks.get(cmd.request_id) is cmd.sink:
                del self._sinks[cmd.request_id]
        if cmd.accepted.done():  # cancelled by the caller, or settled already
            return
        if error is None:
            cmd.accepted.set_result(None)
        else:
            cmd.accepted.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None and sink.put(out):
                del self._sinks[out.request_id]

    def _fail_requests(self, request_ids: list[str], error: StepFailedError) -> None:
        for request_id in request_ids:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                failure = RequestFailedError(f"the engine step holding this request failed: {error.__cause__!r}")
                failure.__cause__ = error.__cause__
                sink.fail(failure)

    def _fail_all(self, error: EngineDeadError) -> None:
        for sink in self._sinks.values():
            sink.fail(_dead_copy(error))
        self._sinks.clear()

    def _on_exit(self) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    # ---- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        """The one engine loop: apply commands, step while there is work, sleep on the inbox when idle."""
        stopping = False
        try:
            while True:
                busy = self._engine.has_unfinished()
                if stopping and not busy and self._inbox.empty():
                    break
                for cmd in self._take_commands(block=not busy and not stopping):
                    stopping |= self._apply(cmd)
                if self._engine.has_unfinished():
                    self._publish(self._step())
                self._refresh_stats()
        except BaseException as exc:  # noqa: BLE001 - any failure must reach every client, or one would hang
            log.exception("engine loop died")
            self._die(exc)
        finally:
            self._post(self._on_exit)

    def _step(self) -> list[RequestOutput]:
        """One step; a failed step fails only its own requests, unless steps keep failing (then re-raised)."""
        try:
            outputs = self._engine.step()
        except StepFailedError as exc:
            self._step_failures.record(exc)
            for request_id in exc.request_ids:
                self._live.pop(request_id, None)
            self._post(self._fail_requests, exc.request_ids, exc)
            return []
        self._step_failures.reset()
        return outputs

    def _take_commands(self, block: bool) -> list[_Command]:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, cmd: _Command) -> bool:
        """Apply one command; True when it asks the loop to stop."""
        if isinstance(cmd, _Add):
            self._add(cmd)
        elif isinstance(cmd, _Abort):
            self._publish(self._engine.abort_request(cmd.request_id))
        elif isinstance(cmd, _AbortAll):
            for request_id in list(self._live):
                self._publish(self._engine.abort_request(request_id))
        else:
            if cmd.abort_all:
                for request_id in list(self._live):
                    self._publish(self._engine.abort_request(request_id))
            return True
        return False

    def _add(self, cmd: _Add) -> None:
        try:
            self._engine.add_request(
                cmd.request_id,
                cmd.prompt_token_ids,
                cmd.params,
                cmd.token_mask_factory,
                cmd.block_hash_extras,
                cmd.images,
            )
        except Exception as exc:  # the caller's to handle (ValueError: rejected); the engine is unchanged
            self._post(self._settle, cmd, exc)
            return
        self._live[cmd.request_id] = cmd.params.n
        self._counters[0] += 1
        self._counters[1] += len(cmd.prompt_token_ids)
        self._post(self._settle, cmd, None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        for out in outputs:
            self._counters[2] += len(out.new_token_ids)
            if out.finished and out.request_id in self._live:
                self._live[out.request_id] -= 1
                if self._live[out.request_id] <= 0:
                    del self._live[out.request_id]
        self._post(self._deliver, outputs)

    def _refresh_stats(self) -> None:
        scheduler, blocks = self._engine.scheduler, self._engine.block_manager
        requests, prompt, generated = self._counters
        self._stats = EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=blocks.usage,
            prefix_cache_hit_rate=blocks.prefix_cache_hit_rate,
            num_requests_total=requests,
            prompt_tokens_total=prompt,
            generation_tokens_total=generated,
            **_spec_stats(self._engine),
        )

    def _die(self, exc: BaseException) -> None:
        """Mark the engine dead first (so a racing ``add`` sees it), then fail whatever is queued or in flight."""
        error = EngineDeadError(f"the engine loop died: {exc!r}")
        error.__cause__ = exc
        self._dead = error
        for cmd in self._take_commands(block=False):
            if isinstance(cmd, _Add):
                self._post(self._settle, cmd, _dead_copy(error))
        self._post(self._fail_all, error)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)


def _dead_copy(error: EngineDeadError) -> EngineDeadError:
    """A fresh exception per receiver: one instance raised in many tasks would share (and grow) a traceback."""
    copy = EngineDeadError(*error.args)
    copy.__cause__ = error.__cause__
    return copy


def _spec_stats(engine: Engine) -> dict[str, int]:
    spec = getattr(engine, "spec", None)
    if spec is None:
        return {}
    s = spec.stats
    return {
        "spec_draft_tokens_total": s.num_drafts,
        "spec_accepted_tokens_total": s.num_accepted,
        "spec_verify_steps_total": s.num_verifies,
    }
