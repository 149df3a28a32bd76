"""Precopy then postcopy against pure postcopy, and what dirty tracking costs.

Each row is one `postcopy demo` (two processes on loopback, --verify): remote faults
(pages the destination's guest had to fetch), total time (source: connect -> end),
downtime (guest stop -> PONG 3) and the precopy figures. Also:
  * tracking cost: the built-in guest's accesses/s with no tracking, and with
    WP-async tracking scanned every 100 ms (PAGEMAP_SCAN collect + re-protect), as
    during precopy;
  * read-mostly check: --write-percent 10, 2 s of precopy must take fewer than a
    fifth of the remote faults of pure postcopy (prints ok/miss), as it is and with
    --precopy-throttle (auto-converge: QEMU's defaults, and a fast one);
  * downtime after precopy with the drain before the stop (default) and without it
    (--precopy-drain 0 --max-discard-ranges 0: the switch as before the drain).

  * --only read-mostly / --only drain (--runs N, interleaved): the read-mostly rows (pure, precopy
    as default, vCPUs at nice 0, --precopy-throttle fast) and the drain rows (256M hot: resend,
    discard, no drain), with medians and the ratio to pure postcopy.

Usage: python3 bench/precopy.py [--sizes 1G] [--downtime-sizes 256M,1G,4G] [--precopy-seconds 2]
       [--guest-rate N] [--skip-workloads] [--only read-mostly|drain --runs 3] [--json PATH]
The bench prints figures (and JSON); it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postcopy.guest import Guest, Pattern
from postcopy.spec import parse_size
from uffd import PAGE_4K, Bitmap, RamBlock
from uffd._dirty import DirtyTracker


#: the switch as it was before the drain: stop at once, every discard (however many) in the downtime
NO_DRAIN = ["--precopy-drain", "0", "--max-discard-ranges", "0"]
#: auto-converge as QEMU's defaults (20 % first, +10 %, two high 1 s periods)
THROTTLE_QEMU = ["--precopy-throttle"]
#: auto-converge fast enough for 2 s: the preset (95 % after one high 0.25 s period, then 99 %)
THROTTLE_FAST = ["--precopy-throttle", "fast"]
#: the guest's vCPUs keep their priority during precopy (as before --precopy-guest-nice)
NICE_0 = ["--precopy-guest-nice", "0"]
#: the drain discards what the last scan found instead of sending it again
DRAIN_DISCARD = ["--precopy-drain-mode", "discard"]


def demo(size: str, pattern: str, precopy: float, *, write_percent: int = 50, guest_rate: int = 0,
         page_size: str = "4K", extra: list[str] | None = None, label: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        cmd = [sys.executable, "-m", "postcopy", "demo", "--size", size, "--page-size", page_size,
               "--pattern", pattern, "--write-percent", str(write_percent), "--guest-rate", str(guest_rate),
               "--precopy-seconds", str(precopy), "--verify", "--progress", "none", "--json", str(out),
               *(extra or [])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        d: dict[str, Any] = json.loads(out.read_text())
    pre = d.get("precopy") or {}
    return {"size": size, "pattern": pattern, "write_percent": write_percent, "guest_rate": guest_rate,
            "precopy_s": precopy, "variant": label or ("pure" if precopy == 0 else "precopy"), "verified": d["verified"], "remote_faults": d["remote_faults"],
            "total_s": d["total_time_s"], "postcopy_s": d["postcopy_time_s"], "downtime_ms": d["downtime_ms"],
            "bytes": d["bytes_transferred"], "rounds": pre.get("rounds", 0), "precopy_bytes": pre.get("bytes", 0),
            "dirty_last_round": pre.get("dirty_pages_last_round", 0),
            "dirty_rate": pre.get("dirty_rate_pages_per_s", 0.0), "discarded": pre.get("dirty_pages_at_switch", 0),
            "drain": pre.get("drain", ""), "drain_s": pre.get("drain_seconds", 0.0),
            "drain_fallback": pre.get("drain_fallback", ""),
            "discard_ranges": pre.get("discard_ranges", 0),
            "discard_ranges_after_stop": pre.get("discard_ranges", 0) - pre.get("discard_ranges_before_stop", 0),
            "discard_chunk": pre.get("discard_chunk_pages", 1), "throttle": pre.get("throttle_percent", 0),
            "drain_bytes": pre.get("drain_bytes", 0), "writer_nice": pre.get("writer_nice", 0),
            "postcopy_pages": (d["bytes_transferred"] - pre.get("bytes", 0)) // 4096}


def tracking_cost(size: int, seconds: float = 1.0, scan_every: float = 0.1) -> dict[str, float]:
    """Guest accesses/s without and with WP-async tracking (scanned as precopy does)."""
    out: dict[str, float] = {}
    with RamBlock("pc.ram", size, PAGE_4K, "anon") as b:
        guest = Guest([(b.addr, size, PAGE_4K)], nvcpus=2, pattern=Pattern.RANDOM, write_percent=50)
        guest.fill_initial()
        try:
            for label in ("untracked", "wp-async"):
                tracker = None
                if label == "wp-async":
                    bm = Bitmap(size // 4096)
                    tracker = DirtyTracker("wp-async", [(b.addr, size, PAGE_4K, bm)])
                    tracker.start()
                stop = threading.Event()

                def scan(t: DirtyTracker | None = tracker, stop: threading.Event = stop) -> None:
                    while t is not None and not stop.wait(scan_every):
                        t.collect()

                scanner = threading.Thread(target=scan)
                scanner.start()
                before = guest.stats().total_steps
                guest.start()
                time.sleep(seconds)
                guest.stop()
                steps = guest.stats().total_steps - before
                stop.set()
                scanner.join()
                out[label] = steps / seconds
                if tracker is not None:
                    st = tracker.stats()
                    out["scan_ms_avg"] = st["scan_ns"] / max(st["scans"], 1) / 1e6
                    tracker.close()
        finally:
            guest.close()
    out["slowdown"] = out["untracked"] / out["wp-async"] if out["wp-async"] else float("inf")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1G")
    ap.add_argument("--downtime-sizes", default="256M,1G,4G")
    ap.add_argument("--precopy-seconds", type=float, default=2.0)
    ap.add_argument("--guest-rate", type=int, default=0, help="accesses/s per vCPU of the workload rows (0 = flat out)")
    ap.add_argument("--skip-workloads", action="store_true", help="only the downtime and read-mostly rows")
    ap.add_argument("--only", choices=["read-mostly", "drain"],
                    help="read-mostly: pure / precopy / nice 0 / throttle rows, --runs times interleaved; "
                         "drain: 256M hot, resend / discard / no drain, --runs times interleaved")
    ap.add_argument("--runs", type=int, default=1, help="interleaved repetitions of the --only rows")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    print(f"{'size':>5} {'pattern':>7} {'wr%':>4} {'rate':>6} {'variant':>14} {'rounds':>6} {'faults':>7} "
          f"{'total s':>8} {'downtime ms':>11} {'drain':>13} {'ranges':>12} {'thr%':>4} {'verify':>6}")

    def show(r: dict[str, Any]) -> None:
        rows.append(r)
        drain = f"{r['drain']} {r['drain_s'] * 1000:.0f}ms" if r["drain"] else "-"
        ranges = f"{r['discard_ranges']}/{r['discard_ranges_after_stop']}" if r["precopy_s"] else "-"
        print(f"{r['size']:>5} {r['pattern']:>7} {r['write_percent']:>4} {r['guest_rate']:>6} {r['variant']:>14} "
              f"{r['rounds']:>6} {r['remote_faults']:>7} {r['total_s']:>8.2f} {r['downtime_ms']:>11.1f} "
              f"{drain:>13} {ranges:>12} {r['throttle']:>4} {'ok' if r['verified'] else 'FAIL':>6}", flush=True)

    pre_s = args.precopy_seconds
    if args.only:
        return _only(args, show, rows)
    if not args.skip_workloads:
        for size in args.sizes.split(","):
            for pattern in ("hot", "random"):
                for pre in (0.0, pre_s):
                    show(demo(size, pattern, pre, guest_rate=args.guest_rate))
    downtime: dict[str, dict[str, float]] = {}
    for size in args.downtime_sizes.split(","):
        def row(variant: str, pre: float, extra: list[str] | None = None, size: str = size) -> dict[str, Any]:
            r = next((r for r in rows if r["size"] == size and r["pattern"] == "hot" and r["variant"] == variant), None)
            if r is None:
                r = demo(size, "hot", pre, guest_rate=args.guest_rate, extra=extra, label=variant)
                show(r)
            return r
        pure = row("pure", 0.0)
        before = row("no-drain", pre_s, NO_DRAIN)
        after = row("precopy", pre_s)
        downtime[size] = {"postcopy_ms": pure["downtime_ms"], "precopy_no_drain_ms": before["downtime_ms"],
                          "precopy_drain_ms": after["downtime_ms"]}
    print("\ndowntime (hot, 50 % writes, flat out):", json.dumps(downtime))
    cost = tracking_cost(parse_size("1G"))
    print(f"tracking cost (1 GiB, random, 50% writes, scan every 100 ms): {cost['untracked'] / 1e6:.2f} M accesses/s "
          f"untracked, {cost['wp-async'] / 1e6:.2f} M with WP-async ({cost['slowdown']:.2f}x), "
          f"scan {cost['scan_ms_avg']:.1f} ms")
    checks = {}
    for rate in (0, 20000):
        pure = demo("1G", "random", 0.0, write_percent=10, guest_rate=rate)
        show(pure)
        variants = [("precopy", None)] + ([("nice-0", NICE_0), ("throttle-qemu", THROTTLE_QEMU),
                                           ("throttle-fast", THROTTLE_FAST)] if rate == 0 else [])
        for label, extra in variants:
            pre = demo("1G", "random", pre_s, write_percent=10, guest_rate=rate, extra=extra, label=label)
            show(pre)
            ok = pre["remote_faults"] * 5 < pure["remote_faults"]
            checks[f"rate {rate or 'flat out'} {label}"] = ok
            print(f"read-mostly (1G random, 10% writes, guest rate {rate or 'flat out'}, {label}): "
                  f"{pre['remote_faults']} vs {pure['remote_faults']} remote faults: "
                  f"{'ok' if ok else 'miss'} (< 1/5 required)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "downtime": downtime, "tracking_cost": cost,
                                               "read_mostly": checks}, indent=1))
    return 0


def _only(args: argparse.Namespace, show: Any, rows: list[dict[str, Any]]) -> int:
    """The --only rows, each variant once per run, runs interleaved (a loaded machine drifts)."""
    pre_s = args.precopy_seconds
    if args.only == "read-mostly":
        plan: list[tuple[str, str, int, int, float, str, list[str] | None]] = []
        for rate in (0, 20000):
            plan.append(("1G", "random", 10, rate, 0.0, "pure", None))
            plan.append(("1G", "random", 10, rate, pre_s, "precopy", None))
            if rate == 0:
                plan.append(("1G", "random", 10, rate, pre_s, "nice-0", NICE_0))
            plan.append(("1G", "random", 10, rate, pre_s, "throttle-fast", THROTTLE_FAST))
    else:
        plan = [("256M", "hot", 50, 0, 0.0, "pure", None), ("256M", "hot", 50, 0, pre_s, "precopy", None),
                ("256M", "hot", 50, 0, pre_s, "drain-discard", DRAIN_DISCARD),
                ("256M", "hot", 50, 0, pre_s, "no-drain", NO_DRAIN)]
    for _ in range(args.runs):
        for size, pattern, wp, rate, pre, label, extra in plan:
            show(demo(size, pattern, pre, write_percent=wp, guest_rate=rate, extra=extra, label=label))
    print("\nmedians:")
    summary: dict[str, dict[str, float]] = {}
    for size, pattern, wp, rate, _pre, label, _extra in plan:
        mine = [r for r in rows if r["variant"] == label and r["guest_rate"] == rate and r["size"] == size]
        key = f"{size} {pattern} {wp}% rate {rate or 'flat out'} {label}"
        summary[key] = {k: statistics.median(r[k] for r in mine)
                        for k in ("remote_faults", "downtime_ms", "total_s", "postcopy_pages", "drain_s")}
        pure = [r for r in rows if r["variant"] == "pure" and r["guest_rate"] == rate and r["size"] == size]
        ratio = summary[key]["remote_faults"] / max(statistics.median(r["remote_faults"] for r in pure), 1)
        summary[key]["vs_pure"] = ratio
        print(f"  {key}: faults {summary[key]['remote_faults']:.0f} ({ratio:.3f} of pure"
              f"{', target < 0.2 ok' if ratio < 0.2 else ''}), downtime {summary[key]['downtime_ms']:.1f} ms, "
              f"postcopy pages {summary[key]['postcopy_pages']:.0f}, drain {summary[key]['drain_s'] * 1000:.0f} ms",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
