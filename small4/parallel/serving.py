"""The API process's side of a parallel server: a session of worker ranks behind an ordinary ``AsyncEngine``.

The engine (scheduler, sampler, detokenizers) runs only here, on rank 0, over a ``DriverRunner``; the server
above it cannot tell. The session is closed (workers told to stop, then reaped) when this process exits; a worker
that dies first ends this process (launch.py's watchdog).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

from small4.config import EngineConfig, ModelConfig
from small4.engine.async_engine import AsyncEngine
from small4.engine.engine import Engine
from small4.parallel.config import ParallelConfig
from small4.parallel.launch import Nodes, ParallelSession
from small4.parallel.state import exit_following_rank
from small4.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def parallel_async_engine(
    model_dir: str | Path,
    engine_cfg: EngineConfig,
    parallel: ParallelConfig,
    nodes: Nodes | None = None,
    keep_fp8: bool | None = None,
) -> AsyncEngine:
    """Node 0's side: this process is rank 0 behind the engine."""
    parallel.validate(ModelConfig.from_dir(model_dir).text)  # before any process starts: the split must divide
    session = ParallelSession(parallel.world_size, device=engine_cfg.device, nodes=nodes)
    atexit.register(session.close)
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
    return AsyncEngine(Engine.from_runner(runner, Tokenizer.from_file(model_dir)))


def follow_node(parallel: ParallelConfig, nodes: Nodes, device: str) -> int:
    """Any other node: its ranks load what rank 0 tells them and follow its steps; exit 0 when it stops."""
    session = ParallelSession(parallel.world_size, device=device, nodes=nodes)
    try:
        session.follow(expect=parallel)
    except BaseException:
        session.close()
        raise
    session.close(leave_group=False)
    exit_following_rank(0)
