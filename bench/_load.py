"""Waiting for a quiet machine before a bench run (2 cores: other jobs move every figure)."""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["add_load_options", "wait_for_load"]


def add_load_options(ap: argparse.ArgumentParser, max_wait: float) -> None:
    """--max-load and --max-wait, what :func:`wait_for_load` takes (1.5 and ``max_wait`` s)."""
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="start a run once the 1-minute load average is below this (default 1.5)")
    ap.add_argument("--max-wait", type=float, default=max_wait,
                    help=f"... or after this many seconds (default {max_wait:g})")


def wait_for_load(max_load: float, max_wait: float, poll: float = 2.0) -> float:
    """Wait until the 1-minute load average is below ``max_load`` or ``max_wait`` s have
    passed; the load at the end (recorded with the row it precedes)."""
    deadline = time.monotonic() + max_wait
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() >= deadline:
            return load
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
