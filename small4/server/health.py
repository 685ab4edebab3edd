"""Waiting for a server to answer ``/health``: the one loop that the main job, the serving benchmark, the held-out
evaluation and the tests use to know a `small4 serve` they started is ready (a process or an in-process thread)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_healthy(
    base: str, alive: Callable[[], bool] = lambda: True, timeout_s: float = 300.0, interval_s: float = 0.05
) -> None:
    """Return once ``GET {base}/health`` answers 200; raise if ``alive()`` turns false (the server process or
    thread has ended: waiting longer would only hide why) or after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive():
            raise RuntimeError(f"the server at {base} ended before it became healthy")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base} did not become healthy in {timeout_s:.0f} s")
        time.sleep(interval_s)
