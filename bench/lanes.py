"""What a second lane buys the plain C remote fault: two faulting threads on one connection
against a connection each, with one faulting thread alone beside them.

The 2 MiB fault target's two busy vCPUs share our one preempt channel; docs/design.md ("Not done:
a second preempt lane") weighs a second one. This measures the same question on the plain C
fault (bench/_floor.py, netbench.c), whose one transfer leaves the CPUs idle between its steps, so
the ratio it prints is an upper bound on what a second lane gives our data path. The three
variants take turns in each round; per round the p50 of each and the two-faulter ratio
(a connection each over one connection).

Usage: python3 bench/lanes.py [--rounds 8] [--pages 64] [--page-size 2M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _floor import plain_remote_fault_ns

from postcopy.spec import parse_size

VARIANTS = (("one faulter, one connection", 1, 1), ("two faulters, one connection", 2, 1),
            ("two faulters, a connection each", 2, 2))


def run(rounds: int, pages: int, page_size: int) -> list[dict[str, Any]]:
    plain_remote_fault_ns(min(pages, 16), page_size)     # untimed: the first pass runs slow (Round 25)
    out = []
    for _ in range(rounds):
        p50 = {name: statistics.median(plain_remote_fault_ns(pages, page_size, faulters, conns))
               for name, faulters, conns in VARIANTS}
        out.append({"p50_ns": p50, "two_lanes_over_one": p50[VARIANTS[2][0]] / p50[VARIANTS[1][0]]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--page-size", default="2M")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    page_size = parse_size(args.page_size)
    rows = run(args.rounds, args.pages, page_size)
    for i, r in enumerate(rows, 1):
        print(f"round {i}: " + ", ".join(f"{name} {v / 1e3:.0f} us" for name, v in r["p50_ns"].items())
              + f"; a connection each over one: {r['two_lanes_over_one']:.2f}x")
    ratios = [r["two_lanes_over_one"] for r in rows]
    print(f"two faulters, a connection each over one connection (p50): median {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}..{max(ratios):.2f}] over {len(ratios)} round(s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"page_size": page_size, "pages": args.pages, "rounds": rows,
                                               "median_ratio": statistics.median(ratios)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
