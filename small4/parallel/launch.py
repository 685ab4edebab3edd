"""One machine's side of a parallel run: start this node's worker processes, join them, load, watch, stop.
On node 0 this process is rank 0 (the driver); on other nodes it is the node's first worker (``follow``).

Workers are plain subprocesses (``python -m small4.parallel.worker``) told their rank through the environment,
as torchrun would: nothing is pickled to start them (torch.multiprocessing's spawn would pickle its arguments).
What to load arrives as a JSON "load" message, so one session can load several checkpoints in turn (the tests
do). A watchdog thread ends this process, with a log line naming the rank and exit code, as soon as any worker
dies: rank 0 would otherwise wait in a collective until its timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from small4.config import EngineConfig
from small4.engine.model_runner import resolve_device
from small4.parallel.channel import send_json
from small4.parallel.config import ParallelConfig
from small4.parallel.draft import DraftExpectation
from small4.parallel.runner import DriverRunner, build_rank, worker_loop
from small4.parallel.state import Dist, close_distributed, init_distributed

log = logging.getLogger(__name__)

WORKER_EXIT_CODE = 3  # what this process exits with when a worker died under it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_message(model_dir: Path, engine_cfg: EngineConfig, parallel: ParallelConfig, keep_fp8: bool | None) -> dict:
    return {
        "op": "load",
        "model": str(model_dir),
        "engine": asdict(engine_cfg),
        "parallel": parallel.to_json(),
        "keep_fp8": keep_fp8,
    }


def _exit_on_failure(reason: str) -> None:
    """A rank is gone or out of step, so no further step can run: end the server now (its /health with it)."""
    log.error("%s: shutting down (exit code %d)", reason, WORKER_EXIT_CODE)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(WORKER_EXIT_CODE)


@dataclass(frozen=True)
class Nodes:
    """Where this machine sits in a multi-node run: ``count`` machines with the same number of ranks each, this
    one ``rank``-th; every rank meets at ``master`` (node 0's address: rank 0, the API, is there)."""

    count: int = 1
    rank: int = 0
    master: tuple[str, int] | None = None


class ParallelSession:
    """``world_size`` ranks: this process is the first rank of this node (rank 0, the driver, on node 0), the
    node's other ranks are worker subprocesses."""

    def __init__(
        self,
        world_size: int,
        device: str = "auto",
        worker_args: list[list[str]] | None = None,
        on_failure: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
        nodes: Nodes | None = None,
    ) -> None:
        """``worker_args``: extra command-line arguments per worker; ``on_failure(reason)``: what to do when a
        worker dies before ``close`` or a step fails half-way (default: log it, exit with ``WORKER_EXIT_CODE``)."""
        nodes = nodes or Nodes()
        if world_size % nodes.count:
            raise ValueError(f"{world_size} ranks do not split evenly over {nodes.count} nodes")
        self.world_size, self.nodes, self.device = world_size, nodes, device
        self.on_failure = on_failure or _exit_on_failure
        self.stopping = False  # the watchdog's: no more failure reports
        self.closed = False
        self.runner: DriverRunner | None = None
        self.master = nodes.master or ("127.0.0.1", free_port())
        self.per_node = world_size // nodes.count
        self.first_rank = nodes.rank * self.per_node
        env = {**os.environ, "MASTER_ADDR": self.master[0], "MASTER_PORT": str(self.master[1])}
        env["WORLD_SIZE"] = str(world_size)
        if timeout_s is not None:
            env["SMALL4_DIST_TIMEOUT"] = str(timeout_s)
        self.timeout_s = timeout_s
        self.workers: list[subprocess.Popen] = []
        for local in range(1, self.per_node):
            extra = worker_args[local - 1] if worker_args else []
            cmd = [sys.executable, "-m", "small4.parallel.worker", "--device", device, *extra]
            rank_env = {"RANK": str(self.first_rank + local), "LOCAL_RANK": str(local)}
            self.workers.append(subprocess.Popen(cmd, env={**env, **rank_env}))
        self._watchdog = threading.Thread(target=self._watch, name="small4-worker-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self.dist: Dist = init_distributed(
                resolve_device(device), self.first_rank, world_size, self.master, timeout_s, local_rank=0
            )
        except BaseException:  # the workers would wait for rank 0 until their join timeout
            self.stopping = True
            for proc in self.workers:
                proc.kill()
                proc.wait()
            raise

    def follow(self, expect: ParallelConfig, expect_draft: DraftExpectation | None = None) -> int:
        """A node other than node 0: this process is one of the workers too, until rank 0 says stop. ``expect`` /
        ``expect_draft``: the split and the draft this node was started for (checked at every load)."""
        steps = worker_loop(self.dist, str(self.dist.device), expect, expect_draft)
        log.info("rank %d: stopped after %d steps", self.dist.rank, steps)
        self.stopping = True  # told to stop: the local workers leave as well
        return steps

    def _watch(self) -> None:
        while not self.stopping:
            for rank, proc in enumerate(self.workers, start=1):
                code = proc.poll()
                if code is not None and not self.stopping:
                    self.stopping = True
                    self.on_failure(f"worker rank {rank} (pid {proc.pid}) exited with code {code}")
                    return
            threading.Event().wait(0.2)

    def load(
        self, model_dir: str | Path, engine_cfg: EngineConfig, parallel: ParallelConfig, keep_fp8: bool | None = None
    ) -> DriverRunner:
        """Every rank loads its shard of ``model_dir``; returns rank 0's runner (the engine's). ``keep_fp8`` None:
        FP8 checkpoints stay FP8 on GPUs (the split exists to fit the model), dequantised on the CPU."""
        if parallel.world_size != self.world_size:
            raise ValueError(f"the split needs {parallel.world_size} ranks, the session has {self.world_size}")
        self.runner = None
        send_json(self.dist, load_message(Path(model_dir), engine_cfg, parallel, keep_fp8))
        self.runner = build_rank(model_dir, engine_cfg, parallel, self.dist, keep_fp8=keep_fp8)
        self.runner.on_failure = self.on_failure
        return self.runner

    def close(self, timeout: float = 30.0, leave_group: bool = True) -> None:
        """Stops the workers (a "stop" message, then a wait, then kill) and leaves the process group (not with
        ``leave_group=False``: a following node about to exit, see ``state.exit_without_teardown``). Idempotent;
        also after a worker died (the watchdog has then stopped watching)."""
        if self.closed:
            return
        self.closed = self.stopping = True
        try:
            if self.dist.is_driver:  # a following node's ranks have been told already
                send_json(self.dist, {"op": "stop"})
        except Exception as e:  # a worker already gone: the others see the error and exit too
            log.warning("could not tell the workers to stop: %s", str(e).splitlines()[0])
        try:
            for proc in self.workers:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.error("worker pid %d did not stop within %.0f s: killed", proc.pid, timeout)
                    proc.kill()
                    proc.wait()
        finally:
            if leave_group:
                close_distributed()

    def __enter__(self) -> ParallelSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
