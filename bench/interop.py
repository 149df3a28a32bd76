"""Interop figures against real QEMU, side by side, same boot-sector guest (TCG).

Rows (one run each unless ``--runs``; median shown):

* ``QEMU -> QEMU``: qemu-system-x86_64 migrating to itself with postcopy
  (``migrate-start-postcopy`` right after ``migrate``), without and with
  postcopy-preempt; every run checked page by page (tests/interop/qemu.py).
* ``QEMU -> us``: the same QEMU source into ``postcopy dest --save DIR``; checked by
  restoring the snapshot into a second QEMU (``postcopy source --from-snapshot``) and
  comparing it with the stopped source page by page, its serial continuing.
* ``lazy restore`` (``--restore-mem``, default 1G): the time from ``migrate`` until
  the guest runs on B, for ``postcopy source --from-snapshot`` (driven over QMP as
  QEMU's source would be: capabilities, ``migrate``, ``migrate-start-postcopy``) into a
  QEMU ``-incoming``, against QEMU's own restore of the same saved VM
  (``migrate`` to ``exec:cat > FILE``, then ``-incoming exec:cat FILE``).

Columns: total time and downtime as QEMU's source reports them (query-migrate
``total-time``/``downtime``; a postcopy downtime under 1 ms shows as 0, which QEMU 7.2
itself reports as milliseconds since boot), wall time from ``migrate`` to completed, bytes
transferred and throughput (transferred / total time).

Targets, printed with ok/miss: receiving from QEMU at least as fast as QEMU -> QEMU
(throughput, same preempt setting); the lazy restore runs the guest in under a tenth
of QEMU's restore time.

    python3 bench/interop.py [--mem 64M] [--restore-mem 1G] [--runs 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.interop (a package)

from tests.interop.qemu import (
    MiB,
    compare_guest_memory,
    migrate_qemu_to_qemu,
    migrate_qemu_to_us,
    qemu_file_restore,
    restore_into_qemu,
)


@dataclass(frozen=True)
class Row:
    total_ms: int
    downtime_ms: int
    wall_s: float
    transferred: int
    memory_ok: bool
    serial_continues: bool

    @property
    def throughput_mib_s(self) -> float:
        return self.transferred / MiB / max(self.total_ms / 1000, 1e-9)


Runner = Callable[[Path, str], Row]


def _next(c: int) -> int:
    return 65 + (c - 65 + 1) % 26


def _qemu_to_qemu(preempt: bool) -> Runner:
    def run(rundir: Path, mem: str) -> Row:
        r = migrate_qemu_to_qemu(rundir, mem=mem, preempt=preempt, passes_before=2)
        return Row(r.total_ms, r.downtime_ms, r.wall_s, r.transferred, r.memory.ok,
                   bool(r.dst_letters) and bool(r.src_letters) and r.dst_letters[0] == _next(r.src_letters[-1]))
    return run


def _qemu_to_us(preempt: bool) -> Runner:
    def run(rundir: Path, mem: str) -> Row:
        r = migrate_qemu_to_us(rundir, mem=mem, preempt=preempt)
        b = restore_into_qemu(r.snapshot, rundir, mem=mem, preempt=preempt)
        check = compare_guest_memory(r.src_dump, b.dst_dump, r.src_regs, b.dst_regs, len(r.src_dump.read_bytes()))
        return Row(r.total_ms, r.downtime_ms, r.wall_s, r.transferred, check.ok,
                   bool(b.dst_letters) and bool(r.src_letters) and b.dst_letters[0] == _next(r.src_letters[-1]))
    return run


ROWS: list[tuple[str, Runner]] = [
    ("QEMU -> QEMU", _qemu_to_qemu(False)),
    ("QEMU -> us", _qemu_to_us(False)),
    ("QEMU -> QEMU preempt", _qemu_to_qemu(True)),
    ("QEMU -> us preempt", _qemu_to_us(True)),
]


def _restore(mem: str) -> dict[str, float | bool]:
    """Our lazy restore and QEMU's file restore of the same guest, ``mem`` of RAM."""
    with tempfile.TemporaryDirectory(prefix="pc-interop-") as d:
        rundir = Path(d)
        r = migrate_qemu_to_us(rundir, mem=mem)
        b = restore_into_qemu(r.snapshot, rundir, mem=mem, via_qmp=True, timeout=300)
        check = compare_guest_memory(r.src_dump, b.dst_dump, r.src_regs, b.dst_regs, len(r.src_dump.read_bytes()))
        r.src_dump.unlink()
        b.dst_dump.unlink()
        save_s, qemu_run_s = qemu_file_restore(rundir, mem=mem)
    return {"lazy_run_s": round(b.run_s, 3), "lazy_complete_s": round(b.wall_s, 3), "memory_ok": check.ok,
            "serial_continues": bool(b.dst_letters) and b.dst_letters[0] == _next(r.src_letters[-1]),
            "qemu_save_s": round(save_s, 3), "qemu_restore_run_s": round(qemu_run_s, 3)}


def _verdict(ok: bool) -> str:
    return "ok" if ok else "miss"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="64M", help="guest RAM of the migration rows (default 64M)")
    ap.add_argument("--restore-mem", default="1G", help="guest RAM of the lazy restore row (default 1G; '' skips it)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    out: dict[str, list[dict[str, float | bool]]] = {}
    for label, runner in ROWS:
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="pc-interop-") as d:
                r = runner(Path(d), args.mem)
            out.setdefault(label, []).append({
                "total_ms": r.total_ms, "downtime_ms": r.downtime_ms, "wall_s": round(r.wall_s, 3),
                "transferred_mib": round(r.transferred / MiB, 1),
                "throughput_mib_s": round(r.throughput_mib_s, 1), "memory_ok": r.memory_ok,
                "serial_continues": r.serial_continues,
            })
            print(f"  {label} run {i + 1}: {out[label][-1]}", file=sys.stderr)
    restores: list[dict[str, float | bool]] = []
    if args.restore_mem:
        for i in range(args.runs):
            restores.append(_restore(args.restore_mem))
            print(f"  restore run {i + 1}: {restores[-1]}", file=sys.stderr)

    def med(runs: list[dict[str, float | bool]], k: str) -> float:
        return statistics.median(float(r[k]) for r in runs)

    print(f"guest: boot sector, {args.mem}, TCG; {args.runs} run(s) per row, median shown\n")
    print(f"| {'row':<22} | total ms | downtime ms | wall s | MiB sent | MiB/s | checked |")
    print(f"|{'-' * 24}|---------:|------------:|-------:|---------:|------:|---------|")
    for label, runs in out.items():
        ok = sum(1 for r in runs if r["memory_ok"] and r["serial_continues"])
        print(f"| {label:<22} | {med(runs, 'total_ms'):8.0f} | {med(runs, 'downtime_ms'):11.0f} | "
              f"{med(runs, 'wall_s'):6.2f} | {med(runs, 'transferred_mib'):8.1f} | "
              f"{med(runs, 'throughput_mib_s'):5.0f} | {ok}/{len(runs)} |")
    print()
    good = all(r["memory_ok"] and r["serial_continues"] for runs in out.values() for r in runs)
    for suffix in ("", " preempt"):
        theirs, ours = out[f"QEMU -> QEMU{suffix}"], out[f"QEMU -> us{suffix}"]
        ratio = med(ours, "throughput_mib_s") / max(med(theirs, "throughput_mib_s"), 1e-9)
        print(f"receiving from QEMU{suffix or ' (no preempt)'}: {ratio:.2f}x QEMU -> QEMU's throughput "
              f"(target >= 1): {_verdict(ratio >= 1.0)}")
    if restores:
        lazy, full = med(restores, "lazy_run_s"), med(restores, "qemu_restore_run_s")
        ok = sum(1 for r in restores if r["memory_ok"] and r["serial_continues"])
        print(f"\nsaved VM of {args.restore_mem}, from migrate until the guest runs on B:")
        print(f"| {'restore':<38} | run after s | complete s | checked |")
        print(f"|{'-' * 40}|------------:|-----------:|---------|")
        print(f"| {'lazy: postcopy source --from-snapshot':<38} | {lazy:11.3f} | "
              f"{med(restores, 'lazy_complete_s'):10.3f} | {ok}/{len(restores)} |")
        print(f"| {'QEMU: -incoming exec:cat FILE':<38} | {full:11.3f} | {full:10.3f} | - |")
        print(f"lazy / QEMU's restore: {lazy / full:.3f} (target < 0.10): {_verdict(lazy / full < 0.10)}"
              f"  (QEMU's save to the file took {med(restores, 'qemu_save_s'):.2f} s)")
        good = good and ok == len(restores)
    if args.json:
        args.json.write_text(json.dumps({"rows": out, "restore": restores}, indent=2) + "\n")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
