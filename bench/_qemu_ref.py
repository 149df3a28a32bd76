"""QEMU 7.2's own postcopy downtime, measured in the bench's run (QEMU -> QEMU, loopback TCP).

The harness is tests/interop/qemu.py: qemu-system-x86_64 under TCG running the
boot-sector guest (it writes every 4 KiB page of its RAM in a loop), QMP on a
unix socket. One run: both QEMUs start with ``-m SIZE``, the source runs one full
pass over its memory (every page written once, as the bench's guest is filled),
then ``migrate`` and ``migrate-start-postcopy`` at once (immediate postcopy, the
bench's own mode), with or without postcopy-preempt.

Two figures per run:

* ``stop_to_resume_us``: the source's STOP event to the destination's RESUME
  event, from the QMP events' own timestamps (microseconds, one host clock): the
  time the guest runs nowhere, which is what the bench's downtime measures for us
  (the source guest's stop -> PONG 3, sent by the destination right before it
  runs the guest).
* ``reported_ms``: query-migrate ``downtime`` on the source (whole ms). In QEMU
  7.2 it ends when the source has written the switch package (postcopy_start):
  the destination's part (loading devices, LISTEN, RUN) is not in it.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.interop (a package)

from tests.interop.qemu import BOOT_IMG, QEMU_BIN, Qemu, run_postcopy

MiB = 1 << 20
MIN_MEM = 64 * MiB      # the boot guest under the pc machine: the interop tests' smallest


@dataclass(frozen=True)
class QemuDowntime:
    size: int
    preempt: bool
    stop_to_resume_us: int
    reported_ms: int
    total_ms: int
    wall_s: float


def qemu_available() -> str | None:
    """None if QEMU and the boot image are here, else why not."""
    if shutil.which(QEMU_BIN) is None:
        return f"{QEMU_BIN} not found"
    if not BOOT_IMG.exists():
        return f"{BOOT_IMG} missing"
    return None


def qemu_size(size: int) -> int:
    """The guest RAM QEMU gets for a bench guest of ``size``: the same, rounded to MiB, >= 64 MiB."""
    return max(MIN_MEM, size - size % MiB)


def _ts_us(event: dict[str, Any]) -> int:
    return int(event["timestamp"]["seconds"]) * 1_000_000 + int(event["timestamp"]["microseconds"])


def _event(vm: Qemu, name: str) -> dict[str, Any]:
    assert vm.qmp is not None
    found = [e for e in vm.qmp.events if e.get("event") == name]
    if len(found) != 1:
        raise RuntimeError(f"QEMU {vm.name}: {len(found)} {name} events, expected one: "
                           f"{[e.get('event') for e in vm.qmp.events]}")
    event: dict[str, Any] = found[0]
    return event


def qemu_downtime(size: int, *, preempt: bool = True, timeout: float = 120.0) -> QemuDowntime:
    """One QEMU -> QEMU immediate postcopy migration of a ``qemu_size(size)`` guest."""
    mem = f"{qemu_size(size) // MiB}M"
    with tempfile.TemporaryDirectory(prefix="pc-qemu-dt-") as d:
        rundir = Path(d)
        src = Qemu("src", rundir, mem=mem)
        dst = Qemu("dst", rundir, mem=mem, incoming=True)
        try:
            # one whole pass before: every page written
            info, _, wall = run_postcopy(src, dst, preempt=preempt, passes_before=1, timeout=timeout)
            status = dst.cmd("query-status").get("status")
            if status != "running":
                raise RuntimeError(f"QEMU destination is {status!r} after the migration, not running")
            gap = _ts_us(_event(dst, "RESUME")) - _ts_us(_event(src, "STOP"))
            if gap <= 0:
                raise RuntimeError(f"QEMU: RESUME {gap} us after STOP")
            return QemuDowntime(size=qemu_size(size), preempt=preempt, stop_to_resume_us=gap,
                                reported_ms=int(info.get("downtime", -1)), total_ms=int(info.get("total-time", 0)),
                                wall_s=wall)
        finally:
            dst.stop()
            src.stop()


def median_us(runs: list[QemuDowntime]) -> float:
    return statistics.median(r.stop_to_resume_us for r in runs)
