"""A worker rank: ``python -m small4.parallel.worker`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.

It joins the process group, then follows rank 0's control messages (runner.worker_loop) until told to stop
(exit 0). Any error, and the loss of rank 0, ends it with a log line and exit code 1: a collective whose peer is
gone fails within the process-group timeout, and a watchdog notices a parent that died.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

log = logging.getLogger("small4.worker")


def _watch_parent(parent: int) -> None:
    """Exits when the process that started this one is gone (its children are re-parented)."""
    while True:
        if os.getppid() != parent:
            log.error("rank 0 (pid %d) is gone: exiting", parent)
            os._exit(1)
        threading.Event().wait(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="small4.parallel.worker")
    p.add_argument("--device", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="the split this rank expects")
    p.add_argument("--expert-parallel-size", type=int, default=1)
    p.add_argument("--speculative-model", default=None, help="the EAGLE draft this rank expects")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="its drafts per step (give both)")
    args = p.parse_args(argv)
    if (args.speculative_model is None) != (args.num_speculative_tokens is None):
        p.error("--speculative-model and --num-speculative-tokens go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    from small4.config import ConfigError
    from small4.engine.model_runner import resolve_device
    from small4.parallel.config import ParallelConfig
    from small4.parallel.draft import DraftExpectation
    from small4.parallel.runner import RankMismatchError, worker_loop
    from small4.parallel.state import exit_without_teardown, init_distributed

    expect = None
    if args.tensor_parallel_size is not None:
        expect = ParallelConfig(args.tensor_parallel_size, args.expert_parallel_size)
    expect_draft = None
    if args.speculative_model is not None:
        k = args.num_speculative_tokens
        expect_draft = DraftExpectation(args.speculative_model if k else None, k)
    try:
        d = init_distributed(resolve_device(args.device))
        steps = worker_loop(d, str(d.device), expect, expect_draft)
    except (RankMismatchError, ConfigError) as e:  # the message says it all
        log.error("rank %s: %s", os.environ.get("RANK", "?"), e)
        exit_without_teardown(1)  # a plain exit can abort in gloo's teardown (-6), hiding this exit code
    except Exception:  # rank 0 gone (a collective failed), or a real bug: the traceback says which
        log.exception("rank %s failed", os.environ.get("RANK", "?"))
        exit_without_teardown(1)
    log.info("rank %d: stopped after %d steps", d.rank, steps)
    exit_without_teardown(0)


if __name__ == "__main__":
    sys.exit(main())
