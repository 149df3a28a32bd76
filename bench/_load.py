"""Waiting for a quiet machine before a bench run (2 cores: other jobs move every figure), and
how much of the run the hypervisor took (a VM's CPUs stolen for other guests stall every thread
at once: a downtime then has every phase slow together)."""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["StealLog", "add_load_options", "host_steal_s", "wait_for_load"]


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


def host_steal_s() -> float:
    """CPU seconds the hypervisor gave this VM's CPUs to others since boot (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()      # cpu user nice system idle iowait irq softirq steal ...
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


class StealLog:
    """Steal by section of a run: :meth:`mark` closes the section that ran since the last mark."""

    def __init__(self) -> None:
        self._last = host_steal_s()
        self.sections: dict[str, float] = {}

    def mark(self, section: str) -> None:
        now = host_steal_s()
        self.sections[section] = self.sections.get(section, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.sections.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.sections.items())
        return f"{self.total:.1f} s ({parts})"
