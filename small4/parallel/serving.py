"""The API process's side of a parallel server: a session of worker ranks behind an ordinary ``AsyncEngine``.

The engine (scheduler, sampler, detokenizers) runs only here, on rank 0, over a ``DriverRunner``; the server
above it cannot tell. After the server has stopped, ``end_serving_process`` closes the session (workers told to
stop, then reaped) and ends the process without tearing the process group down (``state.exit_without_teardown``);
an exit on any other path closes it at exit. A worker that dies first ends this process (launch.py's watchdog).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import NoReturn

from small4.config import EngineConfig, load_model_config
from small4.engine.async_engine import AsyncEngine
from small4.engine.engine import Engine
from small4.parallel.config import ParallelConfig
from small4.parallel.draft import DraftExpectation
from small4.parallel.launch import Nodes, ParallelSession
from small4.parallel.state import exit_without_teardown
from small4.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_open_sessions: list[ParallelSession] = []


def parallel_async_engine(
    model_dir: str | Path,
    engine_cfg: EngineConfig,
    parallel: ParallelConfig,
    nodes: Nodes | None = None,
    keep_fp8: bool | None = None,
) -> AsyncEngine:
    """Node 0's side: this process is rank 0 behind the engine."""
    parallel.validate(load_model_config(model_dir).text)  # before any process starts: the split must divide
    session = ParallelSession(parallel.world_size, device=engine_cfg.device, nodes=nodes)
    atexit.register(session.close)  # the fallback on exits other than end_serving_process (errors, Ctrl-C)
    _open_sessions.append(session)
    try:
        runner = session.load(model_dir, engine_cfg, parallel, keep_fp8=keep_fp8)
    except BaseException:
        session.close(timeout=5)
        raise
    log.info(
        "%d ranks (tensor parallel %d, expert parallel %d); rank 0 read %d bytes of weights",
        parallel.world_size,
        parallel.tensor_parallel_size,
        parallel.expert_parallel_size,
        runner.bytes_read,
    )
    return AsyncEngine(Engine(runner, Tokenizer.from_file(model_dir)))


def end_serving_process(code: int = 0) -> NoReturn:
    """Rank 0 after a clean stop: stop and reap the workers, then exit with ``code``, leaving the group as is."""
    while _open_sessions:
        _open_sessions.pop().close(leave_group=False)
    exit_without_teardown(code)


def follow_node(parallel: ParallelConfig, nodes: Nodes, device: str, engine_cfg: EngineConfig | None = None) -> int:
    """Any other node: its ranks load what rank 0 tells them and follow its steps; exit 0 when it stops.
    ``engine_cfg``: this node's own settings, whose draft (files and drafts per step) must be rank 0's."""
    session = ParallelSession(parallel.world_size, device=device, nodes=nodes)
    expect_draft = None if engine_cfg is None else DraftExpectation.of(engine_cfg)
    try:
        session.follow(expect=parallel, expect_draft=expect_draft)
    except BaseException:
        session.close()
        raise
    session.close(leave_group=False)
    exit_without_teardown(0)
