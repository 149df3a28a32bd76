"""The physical floors of a migration on this machine, measured in C (netbench.c,
memtouch.c) so that no Python runs between the timestamps.

* ``tcp_rtt_ns``: loopback TCP round trips of a small message (TCP_NODELAY);
* ``tcp_stream_bps``: loopback TCP throughput, one sender and one receiver thread;
* ``copy_cost_ns``: one UFFDIO_COPY of a fresh page (4 KiB or 2 MiB);
* ``plain_remote_fault_ns``: a minimal C remote fault (fault -> TCP request ->
  page reply -> UFFDIO_COPY), what a bare C client/server does here;
* ``record_stream``: the bulk stream's records over loopback TCP out of a RAM
  block, copied into the kernel's buffers (sendmsg) or referenced (vmsplice + splice).

This module is the only place in bench/ that reaches ``uffd._native``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from uffd import PAGE_4K, RamBlock, RegisterMode, Userfaultfd
from uffd import memtouch as mt
from uffd._lowlevel import ffi, lib

__all__ = [
    "RECORD_STREAM_WAYS",
    "FloorError",
    "RecordStream",
    "copy_batched_bps",
    "copy_cost_ns",
    "first_touch_bps",
    "plain_remote_fault_ns",
    "record_stream",
    "tcp_rtt_ns",
    "tcp_stream_bps",
    "warm_free_memory",
]


class FloorError(OSError):
    """A floor measurement failed in C; the message names the measurement and its operands."""


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise FloorError(-rc, f"{what}: {os.strerror(-rc)}")


def tcp_rtt_ns(iterations: int, msg_size: int = 64) -> list[int]:
    """ns of each of ``iterations`` loopback TCP round trips of ``msg_size`` bytes each way."""
    if iterations <= 0 or not 0 < msg_size <= 1 << 20:
        raise ValueError(f"tcp_rtt_ns: iterations={iterations} must be > 0 and msg_size={msg_size} in 1..1 MiB")
    lat = ffi.new("uint64_t[]", iterations)
    _check(lib.pc_nb_tcp_rtt(iterations, msg_size, lat), f"tcp_rtt_ns(iterations={iterations}, msg_size={msg_size})")
    return list(lat)


def tcp_stream_bps(total_bytes: int, chunk: int = 1 << 20) -> float:
    """Bytes per second of one loopback TCP stream (writes of ``chunk`` bytes)."""
    if total_bytes <= 0 or not 0 < chunk <= 64 << 20:
        raise ValueError(f"tcp_stream_bps: total_bytes={total_bytes} must be > 0 and chunk={chunk} in 1..64 MiB")
    elapsed = ffi.new("uint64_t *")
    _check(lib.pc_nb_tcp_stream(total_bytes, chunk, elapsed),
           f"tcp_stream_bps(total_bytes={total_bytes}, chunk={chunk})")
    return total_bytes * 1e9 / max(int(elapsed[0]), 1)


def copy_cost_ns(page_size: int, npages: int, rounds: int = 3) -> float:
    """Best per-page ns of UFFDIO_COPY (one ioctl per fresh missing page, C loop) over ``rounds``."""
    backing = "anon" if page_size == PAGE_4K else "hugetlbfs"
    best = float("inf")
    with (
        Userfaultfd(user_mode_only=True) as u,
        RamBlock("floor.dst", npages * page_size, page_size, backing) as dst,
        RamBlock("floor.src", npages * page_size) as src,
    ):
        mt.fill_pattern(src, 0, src.used_length, seed=1)
        u.register(dst.addr, dst.used_length, RegisterMode.MISSING)
        for _ in range(rounds):
            best = min(best, mt.bench_copy(u, dst, src, npages) / npages)
            dst.discard(0, dst.used_length)     # missing again for the next round
    return best


def plain_remote_fault_ns(npages: int, page_size: int = PAGE_4K, faulters: int = 1,
                          connections: int = 1) -> list[int]:
    """Per-fault ns of a minimal C client/server remote fault over loopback TCP.

    ``faulters``: threads touching the pages (each every ``faulters``-th page, in order);
    ``connections``: handlers, each with its own connection and server, serving the faults as they
    come, each one fault after the other: two faulters on one connection share it as two vCPUs
    share our preempt channel."""
    if npages <= 0 or not 1 <= faulters <= 8 or not 1 <= connections <= 4:
        raise ValueError(f"plain_remote_fault_ns: npages={npages} must be positive, faulters={faulters} 1-8, "
                         f"connections={connections} 1-4")
    backing = "anon" if page_size == PAGE_4K else "hugetlbfs"
    with (
        Userfaultfd(user_mode_only=True) as u,
        RamBlock("floor.remote", npages * page_size, page_size, backing) as dst,
        RamBlock("floor.origin", npages * page_size) as src,
    ):
        mt.fill_pattern(src, 0, src.used_length, seed=3)
        u.register(dst.addr, dst.used_length, RegisterMode.MISSING)
        lat = ffi.new("uint64_t[]", npages)
        _check(lib.pc_nb_remote_fault(u.fileno(), dst.addr, npages, page_size, src.addr, faulters, connections, lat),
               f"plain_remote_fault_ns(npages={npages}, page_size={page_size}, faulters={faulters}, "
               f"connections={connections})")
        if mt.check_pattern(dst, 0, dst.used_length, seed=3) != -1:
            raise FloorError(0, "plain_remote_fault_ns: a placed page differs from the page served")
        return list(lat)


def copy_batched_bps(total_bytes: int, chunk: int) -> float:
    """Bytes per second of UFFDIO_COPY onto 4 KiB missing pages in ioctls of ``chunk`` bytes (best of 3)."""
    if total_bytes <= 0 or chunk <= 0 or chunk % PAGE_4K or total_bytes % chunk:
        raise ValueError(f"copy_batched_bps: total_bytes={total_bytes} and chunk={chunk} must be positive "
                         f"multiples of 4 KiB, total a multiple of chunk")
    best = float("inf")
    with (
        Userfaultfd(user_mode_only=True) as u,
        RamBlock("floor.dst", total_bytes) as dst,
        RamBlock("floor.src", total_bytes) as src,
    ):
        mt.fill_pattern(src, 0, total_bytes, seed=5)
        u.register(dst.addr, total_bytes, RegisterMode.MISSING)
        for _ in range(3):
            ns = lib.pc_nb_copy_batched(u.fileno(), dst.addr, src.addr, total_bytes, chunk)
            _check(ns, f"copy_batched_bps(total_bytes={total_bytes}, chunk={chunk})")
            best = min(best, ns)
            dst.discard(0, total_bytes)
    return total_bytes * 1e9 / best


def first_touch_bps(nbytes: int) -> float:
    """Bytes per second of writing fresh anonymous memory once (C fill).

    In this VM freed memory is handed back to the host (virtio-balloon free page
    reporting), so memory the process has not touched recently is backed
    lazily again: its first touch is several times slower than a later one.
    """
    if nbytes <= 0 or nbytes % PAGE_4K:
        raise ValueError(f"first_touch_bps: nbytes={nbytes} must be a positive multiple of 4 KiB")
    with RamBlock("floor.fresh", nbytes) as a:
        t0 = time.monotonic_ns()
        mt.fill_pattern(a, 0, nbytes)
        return nbytes * 1e9 / (time.monotonic_ns() - t0)


def warm_free_memory(nbytes: int) -> None:
    """Write ``nbytes`` of fresh memory once and free it: the pages that allocations right after
    get are backed by the host again. In this VM freed memory goes back to the host (virtio-balloon
    free page reporting, 2 MiB blocks, at once), and the first write to it afterwards costs up to
    3x; a migration that happened to get such pages measured the host, not the code (idle 4 KiB
    bulk, 1 GiB, 6 interleaved runs each: 0.49-1.97 GB/s as it came, 1.72-2.05 after this)."""
    if nbytes <= 0 or nbytes % PAGE_4K:
        raise ValueError(f"warm_free_memory: nbytes={nbytes} must be a positive multiple of 4 KiB")
    with RamBlock("floor.warm", nbytes) as a:
        mt.fill_pattern(a, 0, nbytes)


@dataclass(frozen=True)
class RecordStream:
    """One ``record_stream``: wall time to the last byte read, and each thread's CPU time."""
    nbytes: int
    elapsed_ns: int
    sender_cpu_ns: int
    receiver_cpu_ns: int

    @property
    def bps(self) -> float:
        return self.nbytes * 1e9 / max(self.elapsed_ns, 1)


#: how record_stream sends: copied by sendmsg, referenced by vmsplice + splice, or the pages alone
#: referenced (no headers: not a stream a destination reads, the best case of sending by reference)
RECORD_STREAM_WAYS = {"copy": 0, "splice": 1, "splice-pages": 2}


def record_stream(block: RamBlock, way: str, *, verify: bool = False) -> RecordStream:
    """The block's pages as the bulk stream sends them (a header per 4 KiB page, a 2 MiB page's
    records per sendmsg) from one thread to another over loopback TCP, ``way`` one of
    ``RECORD_STREAM_WAYS``. ``verify``: the receiver checks every record (slow; tests)."""
    if way not in RECORD_STREAM_WAYS:
        raise ValueError(f"record_stream: way {way!r} is not one of {', '.join(RECORD_STREAM_WAYS)}")
    length = block.used_length
    out = ffi.new("uint64_t[3]")
    _check(lib.pc_nb_record_stream(block.addr, length, RECORD_STREAM_WAYS[way], int(verify), out, out + 1, out + 2),
           f"record_stream({block.idstr!r}, {length} bytes, {way})")
    header = 0 if way == "splice-pages" else 8
    return RecordStream(length // PAGE_4K * (PAGE_4K + header), int(out[0]), int(out[1]), int(out[2]))
