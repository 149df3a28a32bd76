"""Touch guest memory from C with the GIL released (tests and benches).

A Python thread calling these on a missing uffd-registered page blocks inside
the kernel, not while holding the GIL, so the fault can be served from another
Python thread. Every function takes a RamBlock and an offset and checks the
range, so nothing reads or writes outside a block.
"""

from __future__ import annotations

import os
from typing import Any

from ._lowlevel import ffi, lib
from ._fd import Userfaultfd
from ._memory import RamBlock

__all__ = [
    "bench_copy",
    "bench_wakeup_pingpong",
    "check_pattern",
    "copy_between",
    "fault_sequence",
    "fill_pattern",
    "fork_child_reads",
    "read_byte",
    "sum_range",
    "touch_range",
    "write_byte",
    "write_to_fd",
]


def read_byte(block: RamBlock, offset: int) -> int:
    return int(lib.pc_mt_read_byte(block.host_addr(offset)))


def write_byte(block: RamBlock, offset: int, value: int) -> None:
    if not 0 <= value <= 255:
        raise ValueError(f"write_byte: value={value} is not a byte")
    lib.pc_mt_write_byte(block.host_addr(offset), value)


def touch_range(
    block: RamBlock, offset: int, length: int, stride: int = 4096, write: bool = False
) -> int:
    """Read (and with write, increment) one byte every ``stride``; sum of bytes read."""
    if stride <= 0:
        raise ValueError(f"touch_range: stride={stride} must be positive")
    return int(lib.pc_mt_touch_range(block.host_addr(offset, length), length, stride, int(write)))


def sum_range(block: RamBlock, offset: int, length: int) -> int:
    return int(lib.pc_mt_sum(block.host_addr(offset, length), length))


def fill_pattern(block: RamBlock, offset: int, length: int, seed: int = 0) -> None:
    """Byte k of the range = (seed + (k // 4096) * 7 + k) & 0xff."""
    lib.pc_mt_fill_pattern(block.host_addr(offset, length), length, seed)


def check_pattern(block: RamBlock, offset: int, length: int, seed: int = 0) -> int:
    """-1 when the range holds fill_pattern(seed), else the first mismatching index."""
    return int(lib.pc_mt_check_pattern(block.host_addr(offset, length), length, seed))


def copy_between(
    dst: RamBlock, dst_offset: int, src: RamBlock, src_offset: int, length: int
) -> None:
    lib.pc_mt_memcpy(dst.host_addr(dst_offset, length), src.host_addr(src_offset, length), length)


def write_to_fd(fd: int, block: RamBlock, offset: int, length: int) -> int:
    """write(fd, block memory): the kernel reads the page (a kernel-mode access)."""
    n = lib.pc_mt_write_to_fd(fd, block.host_addr(offset, length), length)
    if n < 0:
        raise OSError(
            -n,
            f"write(fd={fd}) from RAM block {block.idstr!r} offset=0x{offset:x}: {os.strerror(-n)}",
        )
    return int(n)


def fault_sequence(
    block: RamBlock, offset: int, npages: int, page_size: int, lat_ns: Any = None
) -> int:
    """Read one byte of each of npages pages in turn; lat_ns (a uint64_t[] cdata) gets each touch's ns."""
    if npages <= 0 or page_size <= 0:
        raise ValueError(
            f"fault_sequence: npages={npages} and page_size={page_size} must be positive"
        )
    addr = block.host_addr(offset, (npages - 1) * page_size + 1)
    if lat_ns is not None and len(lat_ns) < npages:
        raise ValueError(
            f"fault_sequence: lat_ns has {len(lat_ns)} slots, fewer than npages={npages}"
        )
    return int(
        lib.pc_mt_fault_sequence(addr, npages, page_size, ffi.NULL if lat_ns is None else lat_ns)
    )


def fork_child_reads(block: RamBlock, offset: int) -> int:
    """fork() from C; the child reads the byte and _exit()s with it. Returns the pid."""
    pid = lib.pc_mt_fork_child_reads(block.host_addr(offset))
    if pid < 0:
        raise OSError(-pid, f"fork: {os.strerror(-pid)}")
    return int(pid)


def bench_copy(uffd: Userfaultfd, dst: RamBlock, src: RamBlock, npages: int) -> int:
    """UFFDIO_COPY npages pages from src onto npages missing pages of dst (both
    from offset 0), one ioctl per page in a C loop; returns the elapsed ns."""
    page = dst.page_size
    if npages <= 0:
        raise ValueError(f"bench_copy: npages={npages} must be positive")
    dst.check_range(0, npages * page)
    ns = lib.pc_mt_bench_copy(
        uffd.fileno(), dst.addr, src.host_addr(0, npages * page), page, npages
    )
    if ns < 0:
        raise OSError(
            -ns, f"bench_copy: UFFDIO_COPY into RAM block {dst.idstr!r}: {os.strerror(-ns)}"
        )
    return int(ns)


def bench_wakeup_pingpong(iterations: int) -> list[int]:
    """ns of each of ``iterations`` round trips between two C threads over pipes
    (two cross-thread wake-ups): the floor for a fault served by another thread."""
    if iterations <= 0:
        raise ValueError(f"bench_wakeup_pingpong: iterations={iterations} must be positive")
    lat = ffi.new("uint64_t[]", iterations)
    rc = lib.pc_mt_bench_wakeup_pingpong(iterations, lat)
    if rc < 0:
        raise OSError(-rc, f"bench_wakeup_pingpong: {os.strerror(-rc)}")
    return list(lat)
