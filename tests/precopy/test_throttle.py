"""Throttling the writers during precopy (auto-converge): the built-in guest's vCPUs
sleep in C; another process gets SIGSTOP/SIGCONT duty cycles."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from postcopy.guest import Guest, Pattern
from postcopy.owner import HeadlessMemory, WriterProcess
from uffd import PAGE_4K, RamBlock


def _steps_per_second(guest: Guest, seconds: float) -> float:
    before = guest.stats().total_steps
    t0 = time.monotonic()
    time.sleep(seconds)
    return (guest.stats().total_steps - before) / (time.monotonic() - t0)


def test_the_guest_runs_slower_when_throttled_and_at_full_speed_again() -> None:
    with RamBlock("pc.ram", 8 << 20, PAGE_4K, "anon") as b:
        guest = Guest([(b.addr, b.used_length, PAGE_4K)], nvcpus=1, pattern=Pattern.RANDOM, write_percent=10)
        guest.fill_initial()
        with pytest.raises(ValueError, match="0-99"):
            guest.set_throttle(100)
        guest.start()
        try:
            free = _steps_per_second(guest, 0.3)
            guest.set_throttle(90)
            assert guest.throttle == 90
            time.sleep(0.05)
            throttled = _steps_per_second(guest, 0.5)
            guest.set_throttle(0)
            time.sleep(0.02)
            again = _steps_per_second(guest, 0.3)
        finally:
            t0 = time.monotonic()
            guest.set_throttle(99)
            guest.stop()        # a throttled vCPU still stops promptly (it naps 0.5 ms at a time)
            stop_s = time.monotonic() - t0
            guest.close()
    # 90 %: it runs a tenth of the time (loose bounds: a shared machine)
    assert throttled < 0.35 * free, (throttled, free)
    assert again > 0.5 * free, (again, free)
    assert stop_s < 0.5


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_another_process_is_throttled_by_duty_cycles() -> None:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        owner = HeadlessMemory(writer=WriterProcess(pid=child.pid))
        time.sleep(0.2)
        c0, t0 = _cpu_seconds(child.pid), time.monotonic()
        time.sleep(0.5)
        free = (_cpu_seconds(child.pid) - c0) / (time.monotonic() - t0)
        owner.throttle(80)
        c0, t0 = _cpu_seconds(child.pid), time.monotonic()
        time.sleep(1.0)
        throttled = (_cpu_seconds(child.pid) - c0) / (time.monotonic() - t0)
        owner.throttle(0)
        time.sleep(0.05)
        with open(f"/proc/{child.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state in ("R", "S"), state        # released: not left stopped
        owner.close()
    finally:
        child.kill()
        child.wait()
    assert throttled < 0.5 * free, (throttled, free)


def test_an_owner_without_a_writer_ignores_the_throttle() -> None:
    HeadlessMemory().throttle(50)       # memory nobody else writes (a memory file): nothing to slow down
