"""Waiting for a quiet machine before a bench run (2 cores: other jobs move every figure)."""

from __future__ import annotations

import os
import time

__all__ = ["wait_for_load"]


def wait_for_load(max_load: float, max_wait: float, poll: float = 2.0) -> float:
    """Wait until the 1-minute load average is below ``max_load`` or ``max_wait`` s have
    passed; the load at the end (recorded with the row it precedes)."""
    deadline = time.monotonic() + max_wait
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() >= deadline:
            return load
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
