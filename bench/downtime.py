"""Downtime only: the migration bench's downtime runs (bench/migration.py's ``migrate``),
busy and idle at the guest sizes given, with the phases from the source guest's stop
to PONG 3 that add up to each downtime.

Usage: python3 bench/downtime.py [--sizes 256,1024,4096] [--repeat N] [--two-process] [--json PATH]
(sizes in MiB of 4 KiB pages; --huge adds 2 MiB-page guests of the sizes that fit; --two-process
runs each role in its own process, bench/_growth.py, as two hosts would: no shared GIL, phases
still traced, from both processes' marks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _growth import DowntimeRun, measure_downtime
from migration import MiB, TARGET_DOWNTIME_NS, Run, hugepages_for, migrate, print_downtime

from uffd import PAGE_2M, PAGE_4K, free_hugepages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="guest sizes in MiB, comma-separated (default 256,1024)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size and load (default 1)")
    ap.add_argument("--huge", action="store_true", help="2 MiB-page guests as well")
    ap.add_argument("--two-process", action="store_true", help="each role in its own process")
    ap.add_argument("--json", help="write every run's downtime and phases as JSON")
    args = ap.parse_args(argv)
    sizes = [int(s) * MiB for s in args.sizes.split(",") if s]
    pages = [PAGE_4K, PAGE_2M] if args.huge else [PAGE_4K]
    print(f"downtime bench: load {os.getloadavg()[0]:.2f}, sizes {args.sizes} MiB, {args.repeat} run(s) each, "
          f"{'each role in its own process' if args.two_process else 'both roles in this process'}")
    runs: list[Run | DowntimeRun] = []
    for page in pages:
        for size in sizes:
            if page == PAGE_2M and free_hugepages(PAGE_2M) < hugepages_for(size):
                print(f"2 MiB {size // MiB} MiB skipped: {free_hugepages(PAGE_2M)} free hugepages")
                continue
            for _ in range(args.repeat):
                runs.extend(measure_downtime(size, page, busy) if args.two_process else
                            migrate(size, page, busy=busy, preempt=True, cap=0, profile=False) for busy in (False, True))
    print_downtime(runs)  # type: ignore[arg-type]     # one kind or the other, never mixed
    worst = max(r.downtime_ns for r in runs)
    med = statistics.median(r.downtime_ns for r in runs)
    print(f"  worst {worst / 1e6:.2f} ms, median {med / 1e6:.2f} ms: "
          f"{'ok' if worst <= TARGET_DOWNTIME_NS else 'MISS'} against {TARGET_DOWNTIME_NS / 1e6:g} ms; "
          f"load after {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"size": r.size, "page_size": r.page_size, "busy": r.busy, "downtime_ns": r.downtime_ns,
              "phases_ns": r.phases_ns} for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
