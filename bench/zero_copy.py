"""Would the kernel's zero-copy send beat the bulk stream's copy on this host?

The source's bulk sender is the bound of an idle 2 MiB migration here (docs/performance.md,
Rounds 21-22), and a third of its CPU is the kernel copying the guest's pages into socket
buffers (``_copy_from_iter``). ``vmsplice`` + ``splice`` would hand the socket references to
the pages instead. This bench sends the same records both ways out of the same RAM block, in C
(netbench.c ``pc_nb_record_stream``: per 4 KiB page an 8-byte header and the page, 512 records
per sendmsg as source.c sends them, or the same iovecs through a 1 MiB pipe), one sender
thread and one receiver thread over loopback TCP, rounds interleaved:

* GB/s (record bytes / time to the last byte read), the sender's and the receiver's CPU ms;
* splice / copy: the paired ratio of GB/s, median of the rounds, for 4 KiB (anonymous) and
  2 MiB (hugetlbfs) pages; above 1 the product should send by reference;
* ``splice-pages``: the pages alone by reference, no headers (not a stream a destination
  reads): the best case of sending by reference, whatever the records cost in it;
* copy / ceiling: the records by copy against the migration bench's throughput ceiling (a
  loopback stream of 1 MiB writes out of one warm buffer, measured in each round): what a
  sender of nothing but the records reaches out of memory no cache holds.

Each way is first checked record by record (header and page against the block). The loopback
receiver copies either way; over a NIC, sending by reference would drop the sender's copy for
good (the NIC reads the pages), which this host cannot measure.

    python3 bench/zero_copy.py [--size 512M] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _floor import RECORD_STREAM_WAYS, record_stream, tcp_stream_bps

from postcopy.spec import SpecError, parse_size
from uffd import PAGE_2M, PAGE_4K, RamBlock, free_hugepages
from uffd import memtouch as mt
from uffd._memory import Backing

MiB = 1 << 20
CHECK_BYTES = 16 * MiB


def block_size(text: str) -> int:
    try:
        n = parse_size(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0 or n % PAGE_2M:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive multiple of 2 MiB")
    return n


def measure(size: int, page_size: int, rounds: int) -> dict[str, Any]:
    """Both ways out of one block of ``size`` bytes, ``rounds`` pairs taking turns going first."""
    backing: Backing = "anon" if page_size == PAGE_4K else "hugetlbfs"
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in RECORD_STREAM_WAYS}
    ceilings: list[float] = []
    with RamBlock("zero-copy.src", size, page_size, backing) as block:
        mt.fill_pattern(block, 0, size, seed=11)
        with RamBlock("zero-copy.check", CHECK_BYTES, page_size, backing) as small:
            mt.fill_pattern(small, 0, CHECK_BYTES, seed=12)
            for way in RECORD_STREAM_WAYS:
                record_stream(small, way, verify=True)     # raises on a wrong record
        ways = list(RECORD_STREAM_WAYS)
        for i in range(rounds):
            ceilings.append(tcp_stream_bps(size) / 1e9)
            for way in ways if i % 2 == 0 else ways[::-1]:
                r = record_stream(block, way)
                runs[way].append({"gbps": r.bps / 1e9, "sender_cpu_ms": r.sender_cpu_ns / 1e6,
                                  "receiver_cpu_ms": r.receiver_cpu_ns / 1e6})
    paired = {way: [s["gbps"] / c["gbps"] for s, c in zip(runs[way], runs["copy"], strict=True)]
              for way in ("splice", "splice-pages")}
    of_ceiling = [c["gbps"] / g for c, g in zip(runs["copy"], ceilings, strict=True)]
    return {"page_size": page_size, "size": size, "rounds": rounds, "runs": runs, "ceiling_gbps": ceilings,
            "copy_over_ceiling": {"median": statistics.median(of_ceiling), "min": min(of_ceiling),
                                  "max": max(of_ceiling)},
            "medians": {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for way, rs in runs.items()},
            "over_copy": {way: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                          for way, r in paired.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=block_size, default=512 * MiB, help="bytes of the RAM block (default 512M)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved pairs per page size (default 5)")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    args = ap.parse_args(argv)
    if args.rounds <= 0:
        ap.error(f"--rounds {args.rounds}: must be positive")
    sizes = [PAGE_4K]
    if free_hugepages(PAGE_2M) * PAGE_2M >= args.size + CHECK_BYTES:
        sizes.append(PAGE_2M)
    else:
        print(f"2 MiB pages: not measured, {free_hugepages(PAGE_2M)} free 2 MiB hugepages "
              f"(needs {(args.size + CHECK_BYTES) // PAGE_2M})")
    print(f"records of a {args.size // MiB} MiB block over loopback TCP, {args.rounds} interleaved round(s), "
          "medians; each way checked record by record first")
    print("| pages | way          | GB/s | sender CPU ms | receiver CPU ms |")
    print("|-------|--------------|-----:|--------------:|----------------:|")
    results = []
    for page_size in sizes:
        m = measure(args.size, page_size, args.rounds)
        results.append(m)
        label = "4 KiB" if page_size == PAGE_4K else "2 MiB"
        for way, med in m["medians"].items():
            print(f"| {label} | {way:12} | {med['gbps']:4.2f} | {med['sender_cpu_ms']:13.1f} | "
                  f"{med['receiver_cpu_ms']:15.1f} |")
    for m in results:
        label = "4 KiB" if m["page_size"] == PAGE_4K else "2 MiB"
        s, best = m["over_copy"]["splice"], m["over_copy"]["splice-pages"]
        print(f"{label}: splice / copy {s['median']:.2f} [{s['min']:.2f}..{s['max']:.2f}] paired GB/s "
              f"(the pages alone: {best['median']:.2f}): "
              f"{'send by reference' if s['median'] > 1 else 'keep the copy'} on this host")
        c = m["copy_over_ceiling"]
        print(f"{label}: copy / ceiling {c['median']:.2f} [{c['min']:.2f}..{c['max']:.2f}] paired "
              f"(ceiling {statistics.median(m['ceiling_gbps']):.2f} GB/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "rounds": args.rounds, "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
