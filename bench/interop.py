"""Interop figures against real QEMU, side by side, same boot-sector guest (TCG).

Rows (one run each unless ``--runs``):

* ``QEMU -> QEMU``: qemu-system-x86_64 migrating to itself with postcopy
  (``migrate-start-postcopy`` right after ``migrate``), without and with
  postcopy-preempt; every run checked page by page (tests/interop/qemu.py).
* ``QEMU -> us``: TODO (issue 10) -- QEMU source into ``postcopy dest --save``.
  Add a ``_qemu_to_us`` runner returning the same fields and list it in ROWS.
* ``lazy restore``: TODO (issue 10) -- ``postcopy source --from-snapshot`` into a
  QEMU ``-incoming`` against QEMU's own restore (``migrate`` to a file, then
  ``-incoming`` from it): time from ``migrate`` until the guest runs on B.

Columns: total time and downtime as QEMU's source reports them (query-migrate
``total-time``/``downtime``), wall time from ``migrate`` to both sides
``completed``, bytes transferred and throughput (transferred / total time).

    python3 bench/interop.py [--mem 64M] [--runs 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.interop (a package)

from tests.interop.qemu import MigrationResult, migrate_qemu_to_qemu

Runner = Callable[[Path, str], MigrationResult]


def _qemu_to_qemu(preempt: bool) -> Runner:
    def run(rundir: Path, mem: str) -> MigrationResult:
        return migrate_qemu_to_qemu(rundir, mem=mem, preempt=preempt, passes_before=2)
    return run


#: (label, runner). The "QEMU -> us" and "lazy restore" rows go here (see the module docstring).
ROWS: list[tuple[str, Runner]] = [
    ("QEMU -> QEMU", _qemu_to_qemu(False)),
    ("QEMU -> QEMU preempt", _qemu_to_qemu(True)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="64M", help="guest RAM (default 64M)")
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
                "transferred_mib": round(r.transferred / (1 << 20), 1),
                "throughput_mib_s": round(r.throughput_mib_s, 1), "memory_ok": r.memory.ok,
                "serial_continues": bool(r.dst_letters) and bool(r.src_letters)
                and r.dst_letters[0] == 65 + (r.src_letters[-1] - 65 + 1) % 26,
            })
            print(f"  {label} run {i + 1}: {out[label][-1]}", file=sys.stderr)
    print(f"guest: boot sector, {args.mem}, TCG; {args.runs} run(s) per row, median shown\n")
    print(f"| {'row':<22} | total ms | downtime ms | wall s | MiB sent | MiB/s | checked |")
    print(f"|{'-' * 24}|---------:|------------:|-------:|---------:|------:|---------|")
    for label, runs in out.items():
        def med(k: str, runs: list[dict[str, float | bool]] = runs) -> float:
            return statistics.median(float(r[k]) for r in runs)
        ok = sum(1 for r in runs if r["memory_ok"] and r["serial_continues"])
        print(f"| {label:<22} | {med('total_ms'):8.0f} | {med('downtime_ms'):11.0f} | {med('wall_s'):6.2f} | "
              f"{med('transferred_mib'):8.1f} | {med('throughput_mib_s'):5.0f} | {ok}/{len(runs)} |")
    print("| QEMU -> us             |        - |           - |      - |        - |     - | not yet |")
    print("| lazy restore (1 GiB)   |        - |           - |      - |        - |     - | not yet |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["memory_ok"] and r["serial_continues"] for runs in out.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
