"""Write-protect faults, MINOR faults + CONTINUE (shmem and hugetlbfs), POISON."""

from __future__ import annotations

import mmap
import os
import signal
from collections.abc import Callable

import pytest

from uffd import (
    PAGE_2M,
    FaultFlag,
    Feature,
    Ioctl,
    PageAlreadyPresent,
    RamBlock,
    RegisterMode,
    Userfaultfd,
)
from uffd import memtouch as mt

from .conftest import Toucher, wait_events

PAGE = 4096


def test_wp_fault_then_unprotect(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.PAGEFAULT_FLAG_WP, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    view = b.view()
    view[PAGE : 2 * PAGE] = b"\x10" * PAGE  # populate while nothing is registered
    del view
    ioctls = u.register(b.addr, b.used_length, RegisterMode.WP)
    assert Ioctl.WRITEPROTECT in ioctls
    u.writeprotect(b.addr + PAGE, PAGE, protect=True)
    assert touch(mt.read_byte, b, PAGE + 1).wait() == 0x10  # reads are not blocked
    t = touch(mt.write_byte, b, PAGE + 1, 0x77)
    [ev] = wait_events(u, 1)
    assert ev.address == b.addr + PAGE
    assert ev.flags == FaultFlag.WRITE | FaultFlag.WP
    assert t.is_blocked()
    u.writeprotect(b.addr + PAGE, PAGE, protect=False)  # wakes the writer
    t.wait()
    assert mt.read_byte(b, PAGE + 1) == 0x77
    assert mt.read_byte(b, PAGE + 2) == 0x10


def test_wp_unprotect_dontwake_needs_wake(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(user_mode_only=True)
    b = make_block("pc.ram", PAGE)
    b.view()[0:1] = b"\x01"
    u.register(b.addr, PAGE, RegisterMode.WP)
    u.writeprotect(b.addr, PAGE, protect=True)
    t = touch(mt.write_byte, b, 0, 2)
    wait_events(u, 1)
    u.writeprotect(b.addr, PAGE, protect=False, dontwake=True)
    assert t.is_blocked()
    u.wake(b.addr, PAGE)
    t.wait()
    assert mt.read_byte(b, 0) == 2


def _minor_roundtrip(
    u: Userfaultfd,
    block: RamBlock,
    touch: Callable[..., Toucher],
    fill_page_cache: Callable[[int, bytes], None],
) -> None:
    ioctls = u.register(block.addr, block.used_length, RegisterMode.MINOR)
    assert Ioctl.CONTINUE in ioctls
    host = block.page_size
    fill_page_cache(host, b"M" * 64)  # page cache populated through another mapping
    t = touch(mt.read_byte, block, host + 3)
    [ev] = wait_events(u, 1)
    assert FaultFlag.MINOR in ev.flags
    assert block.addr + host <= ev.address < block.addr + 2 * host
    assert t.is_blocked()
    assert u.continue_(block.addr + host, host) == host
    assert t.wait() == ord("M")
    with pytest.raises(PageAlreadyPresent, match="UFFDIO_CONTINUE"):
        u.continue_(block.addr + host, host)


def test_minor_fault_and_continue_on_memfd(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.MINOR_SHMEM, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE, backing="memfd")
    assert b.fd is not None
    fd = b.fd
    _minor_roundtrip(u, b, touch, lambda off, data: os.pwrite(fd, data, off))


@pytest.mark.hugetlb
def test_minor_fault_and_continue_on_hugetlbfs(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.MINOR_HUGETLBFS, user_mode_only=True)
    b = make_block("pc.ram", 2 * PAGE_2M, PAGE_2M, "hugetlbfs")
    assert b.fd is not None
    # hugetlbfs has no write(): fill through a second, unregistered mapping.
    alias = mmap.mmap(b.fd, b.used_length, mmap.MAP_SHARED)

    def fill(off: int, data: bytes) -> None:
        alias[off : off + len(data)] = data

    try:
        _minor_roundtrip(u, b, touch, fill)
    finally:
        alias.close()


def test_poisoned_page_raises_sigbus_and_copy_replaces_the_marker(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    if Feature.POISON not in uffd.features:
        pytest.fail(f"kernel {os.uname().release} lacks UFFD_FEATURE_POISON (6.6+)")
    b = make_block("pc.ram", 2 * PAGE)
    assert Ioctl.POISON in uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    assert uffd.copy(b.addr + PAGE, b"\x2a" * PAGE, PAGE) == PAGE
    assert uffd.poison(b.addr, PAGE) == PAGE
    # Touch it in a child (fork copies the poison marker, not the uffd
    # registration): the poisoned page raises SIGBUS, its neighbour reads fine.
    _, status = os.waitpid(mt.fork_child_reads(b, 0), 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGBUS
    _, status = os.waitpid(mt.fork_child_reads(b, PAGE), 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0x2A
    # Poisoning a present page is refused; on 6.18 a COPY over the poison
    # marker is accepted (markers count as "none" ptes) and heals the page.
    with pytest.raises(PageAlreadyPresent, match="UFFDIO_POISON"):
        uffd.poison(b.addr + PAGE, PAGE)
    assert uffd.copy(b.addr, b"\x07" * PAGE, PAGE) == PAGE
    assert mt.read_byte(b, 0) == 7
