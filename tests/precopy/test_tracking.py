"""Kernel dirty tracking (uffd/_dirty.py, uffd/csrc/dirty.c) on real memory.

WP-async + PAGEMAP_SCAN on 4 KiB and hugetlbfs pages, in this process and in
another one (its userfaultfd received over SCM_RIGHTS); no write is lost while
a guest writes during the scans. Soft-dirty: this kernel's build decides.
"""

from __future__ import annotations

import gzip
import mmap
import os
import socket
import struct
from pathlib import Path

import pytest

from postcopy.guest import Guest, Pattern
from uffd import PAGE_2M, PAGE_4K, Bitmap, Feature, RamBlock, Userfaultfd
from uffd._dirty import DirtyTracker, available_method, method_available

pytestmark = pytest.mark.root

TP = 4096


def _block(page_size: int, size: int) -> RamBlock:
    return RamBlock("pc.ram", size, page_size, "anon" if page_size == PAGE_4K else "hugetlbfs")


@pytest.mark.parametrize("page_size", [PAGE_4K, pytest.param(PAGE_2M, marks=pytest.mark.hugetlb)], ids=["4k", "2m"])
def test_wp_async_finds_exactly_the_written_pages(page_size: int) -> None:
    size = 32 << 20
    with _block(page_size, size) as b:
        view = b.view()
        view[:] = b"\x01" * size                       # populated: the protection lies on real pages
        bm = Bitmap(size // TP)
        t = DirtyTracker("wp-async", [(b.addr, size, page_size, bm)])
        try:
            t.start()
            assert t.collect() == 0
            assert bm.count() == 0
            offsets = [5 * TP, 3 * page_size + 7 * TP, size - 1]
            for off in offsets:
                view[off] = 9
            found = t.collect()
            per = page_size // TP
            expect = {(off // page_size) * per + i for off in offsets for i in range(per)}
            assert set(bm.iter_set()) == expect
            assert found == len(expect)
            bm.clear_range(0, len(bm))
            assert t.collect() == 0, "written pages are protected again by the same scan"
            view[offsets[0]] = 10                        # a write after the scan is seen by the next one
            assert t.collect() == per
            assert t.stats()["scans"] == 4
        finally:
            t.close()
            del view


def test_no_write_is_lost_while_a_guest_writes() -> None:
    """Snapshot after each scan; at the end every page that differs from the snapshot
    of scan k was reported by a later scan."""
    size = 16 << 20
    with _block(PAGE_4K, size) as b:
        guest = Guest([(b.addr, size, PAGE_4K)], nvcpus=2, pattern=Pattern.RANDOM, write_percent=20)
        guest.fill_initial()
        bm = Bitmap(size // TP)
        t = DirtyTracker("wp-async", [(b.addr, size, PAGE_4K, bm)])
        t.start()
        guest.start()
        try:
            snaps: list[tuple[bytes, set[int]]] = []
            for _ in range(5):
                bm.clear_range(0, len(bm))
                t.collect()
                snap = bytes(b.view())
                later: set[int] = set()
                snaps.append((snap, later))
                for _, s in snaps[:-1]:
                    s |= set(bm.iter_set())
            bm.clear_range(0, len(bm))
            guest.stop()
            t.collect()
            final_dirty = set(bm.iter_set())
            for _, s in snaps:
                s |= final_dirty
            now = bytes(b.view())
            for snap, reported in snaps:
                changed = {p for p in range(size // TP) if snap[p * TP:(p + 1) * TP] != now[p * TP:(p + 1) * TP]}
                assert changed, "the guest wrote nothing: the test proves nothing"
                assert changed <= reported, f"{len(changed - reported)} written pages never reported"
        finally:
            guest.close()
            t.close()


def _child(sock: socket.socket, size: int) -> None:
    """Another process: its own memory and its own userfaultfd, handed to the parent."""
    mem = mmap.mmap(-1, size)
    mem[:] = b"\x02" * size
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    u = Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM)
    socket.send_fds(sock, [struct.pack("Q", addr)], [u.fileno()])
    while True:
        cmd = sock.recv(16)
        if not cmd:
            os._exit(0)
        page = struct.unpack("Q", cmd[:8])[0]
        mem[page * TP] = 7
        sock.send(b"k")


def test_wp_async_on_another_process() -> None:
    size = 8 << 20
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent.close()
        try:
            _child(child, size)
        finally:
            os._exit(1)
    child.close()
    try:
        msg, fds, _, _ = socket.recv_fds(parent, 8, 1)
        addr = struct.unpack("Q", msg)[0]
        bm = Bitmap(size // TP)
        t = DirtyTracker("wp-async", [(addr, size, PAGE_4K, bm)], pid=pid, uffd=fds[0])
        os.close(fds[0])
        t.start()
        assert t.collect() == 0
        for page in (3, 100, 2047):
            parent.send(struct.pack("Q", page))
            assert parent.recv(1) == b"k"
        assert t.collect() == 3
        assert set(bm.iter_set()) == {3, 100, 2047}
        t.close()
    finally:
        parent.close()
        os.waitpid(pid, 0)


def test_wp_async_on_another_process_needs_its_uffd() -> None:
    with pytest.raises(OSError, match="needs a userfaultfd made by that process"):
        DirtyTracker("wp-async", [], pid=1)


def _kernel_has_soft_dirty() -> bool:
    cfg = Path("/proc/config.gz")
    if cfg.exists():
        return b"CONFIG_MEM_SOFT_DIRTY=y" in gzip.decompress(cfg.read_bytes())
    return method_available("soft-dirty")[0]


def test_soft_dirty_probe_matches_the_kernel() -> None:
    ok, why = method_available("soft-dirty")
    assert ok == _kernel_has_soft_dirty()
    if not ok:
        assert "soft-dirty" in why
        with pytest.raises(OSError, match="soft-dirty"):
            available_method("soft-dirty")
        assert available_method("auto") == "wp-async"
        return
    size = 8 << 20
    with _block(PAGE_4K, size) as b:        # soft-dirty where the kernel has it
        view = b.view()
        view[:] = b"\x01" * size
        bm = Bitmap(size // TP)
        t = DirtyTracker("soft-dirty", [(b.addr, size, PAGE_4K, bm)])
        t.start()
        view[7 * TP] = 3
        assert t.collect() >= 1
        assert bm.test(7)
        t.close()
        del view


def test_wp_async_available_here() -> None:
    assert method_available("wp-async") == (True, "")
