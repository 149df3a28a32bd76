"""Micro-benchmarks of the userfaultfd layer, printed in one run (< 1 minute).

1. UFFDIO_COPY cost per 4 KiB and per 2 MiB page: a C loop over many fresh
   missing pages (no Python per page), best of a few rounds.
2. The project's own fault round trip: a C thread reads one byte of each page
   in turn; the Python service waits in poll(), reads the event with
   FaultReader (one C batch read), UFFDIO_COPYs the page (which wakes the
   thread). Latency is measured by the faulting thread itself (p50 / p99).
3. References: the cost of two cross-thread wake-ups (pipe ping-pong between
   two C threads), and memcpy bandwidth.

Usage: python3 bench/uffd_micro.py   (2 MiB figures need free hugepages)
"""

from __future__ import annotations

import os
import select
import statistics
import sys
import threading
import time

from uffd import PAGE_2M, Bitmap, FaultReader, RamBlock, RegisterMode, Userfaultfd, free_hugepages
from uffd import memtouch as mt
from uffd._lowlevel import ffi
from uffd._memory import Backing

PAGE = 4096
ROUNDS = 5


def copy_cost_ns(page_size: int, npages: int) -> float:
    """Best per-page ns of UFFDIO_COPY over ROUNDS rounds of npages fresh pages."""
    backing: Backing = "anon" if page_size == PAGE else "hugetlbfs"
    best = float("inf")
    with (
        Userfaultfd(user_mode_only=True) as u,
        RamBlock("bench.dst", npages * page_size, page_size, backing) as dst,
        RamBlock("bench.src", npages * page_size) as src,  # a fresh source page each time
    ):
        mt.fill_pattern(src, 0, src.used_length, seed=1)
        u.register(dst.addr, dst.used_length, RegisterMode.MISSING)
        for _ in range(ROUNDS):
            ns = mt.bench_copy(u, dst, src, npages)
            best = min(best, ns / npages)
            dst.discard(0, dst.used_length)  # missing again for the next round
    return best


def fault_round_trip_ns(npages: int, busy_poll: bool = False) -> list[int]:
    """Per-fault latency seen by a C thread faulting npages pages one after another.

    busy_poll: spin on the (non-blocking) batch read instead of sleeping in
    poll(), which saves the service thread's wake-up.
    """
    with (
        Userfaultfd(user_mode_only=True) as u,
        RamBlock("pc.ram", npages * PAGE) as ram,
        RamBlock("bench.src", PAGE) as src,
    ):
        mt.fill_pattern(src, 0, PAGE, seed=2)
        u.register(ram.addr, ram.used_length, RegisterMode.MISSING)
        received, requested = Bitmap(npages), Bitmap(npages)
        reader = FaultReader(u, [(ram, received, requested)])
        lat = ffi.new("uint64_t[]", npages)
        guest = threading.Thread(target=mt.fault_sequence, args=(ram, 0, npages, PAGE, lat))
        poller = select.poll()
        poller.register(u.fileno(), select.POLLIN)
        src_addr = src.addr
        guest.start()
        served = 0
        while served < npages:
            if not busy_poll and not poller.poll(1000):
                raise RuntimeError(f"no fault for 1 s after {served} pages")
            batch = reader.read_batch()
            faults = batch.faults
            for i in range(batch.count):  # one fault at a time here: the guest is sequential
                off = faults[i].offset
                u.copy(ram.addr + off, src_addr, PAGE)
                received.set(off // PAGE)
                served += 1
        guest.join()
        return [lat[i] for i in range(npages)]


def memcpy_gbps(nbytes: int) -> float:
    with RamBlock("a", nbytes) as a, RamBlock("b", nbytes) as b:
        mt.fill_pattern(a, 0, nbytes)
        mt.copy_between(b, 0, a, 0, nbytes)  # fault both in first
        best = float("inf")
        for _ in range(ROUNDS):
            t0 = time.perf_counter_ns()
            mt.copy_between(b, 0, a, 0, nbytes)
            best = min(best, time.perf_counter_ns() - t0)
    return nbytes / best  # bytes per ns == GB/s


def pct(values: list[int], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> int:
    t_start = time.monotonic()
    print(f"uffd micro-benchmarks on {os.uname().release}, {os.cpu_count()} CPUs")
    c4k = copy_cost_ns(PAGE, 16384)
    print(
        f"UFFDIO_COPY 4 KiB (C loop, 16384 pages, best of {ROUNDS}): {c4k / 1000:8.2f} us/page  "
        f"({PAGE / c4k:.2f} GB/s)"
    )
    c2m = None
    if free_hugepages(PAGE_2M) >= 32:
        c2m = copy_cost_ns(PAGE_2M, 32)
        print(
            f"UFFDIO_COPY 2 MiB (C loop, 32 pages, best of {ROUNDS}):    {c2m / 1000:8.2f} us/page  "
            f"({PAGE_2M / c2m:.2f} GB/s)"
        )
    else:
        print(
            f"UFFDIO_COPY 2 MiB: skipped, {free_hugepages(PAGE_2M)} free 2 MiB hugepages (need 32)"
        )
    fault_round_trip_ns(500)  # warm up
    lat = fault_round_trip_ns(5000)
    p50, p99 = pct(lat, 50), pct(lat, 99)
    print(
        f"fault round trip (C thread -> poll -> FaultReader -> UFFDIO_COPY+wake), 5000 faults: "
        f"p50 {p50 / 1000:.1f} us, p99 {p99 / 1000:.1f} us, mean {statistics.fmean(lat) / 1000:.1f} us"
    )
    lat = fault_round_trip_ns(5000, busy_poll=True)
    bp50, bp99 = pct(lat, 50), pct(lat, 99)
    print(
        f"  same with the service busy-polling FaultReader (no poll() sleep): p50 {bp50 / 1000:.1f} us, p99 {bp99 / 1000:.1f} us"
    )
    print(
        f"  ratio round trip p50 / C-level 4 KiB COPY: {p50 / c4k:.1f}x "
        f"(overhead over the bare ioctl {(p50 - c4k) / 1000:.1f} us)"
    )
    ping = mt.bench_wakeup_pingpong(20000)
    pp50, pp99 = pct(ping, 50), pct(ping, 99)
    print(
        f"reference: pipe ping-pong between two C threads (two wake-ups, the floor for a fault "
        f"served by another thread): p50 {pp50 / 1000:.1f} us, p99 {pp99 / 1000:.1f} us; "
        f"round trip p50 is {p50 / pp50:.2f}x that"
    )
    gbps = memcpy_gbps(256 << 20)
    print(
        f"memcpy 256 MiB (best of {ROUNDS}): {gbps:.2f} GB/s  "
        f"(4 KiB at that rate: {PAGE / gbps / 1000:.2f} us; 4 KiB COPY is "
        f"{c4k / (PAGE / gbps):.1f}x a memcpy"
        + (f"; 2 MiB COPY is {c2m / (PAGE_2M / gbps):.1f}x" if c2m else "")
        + ")"
    )
    print(f"total {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
