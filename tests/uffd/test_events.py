"""Non-cooperative events (FORK, REMOVE, UNMAP, REMAP) and discard semantics."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable

import pytest

from uffd import (
    Feature,
    Fork,
    MappingChanged,
    PageFault,
    RamBlock,
    RegisterMode,
    Remap,
    Remove,
    Unmap,
    Userfaultfd,
)
from uffd import memtouch as mt
from uffd._lowlevel import ffi, lib

from .conftest import Toucher, wait_events

PAGE = 4096


@pytest.mark.root  # EVENT_FORK needs CAP_SYS_PTRACE
def test_fork_event_gives_the_childs_uffd_which_serves_the_child(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.EVENT_FORK, user_mode_only=False)
    b = make_block("pc.ram", 4 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    u.copy(b.addr, b"\x01" * PAGE, PAGE)
    # fork() itself waits until the monitor has read the FORK event.
    t = touch(mt.fork_child_reads, b, 2 * PAGE + 9)
    [ev] = wait_events(u, 1)
    assert isinstance(ev, Fork)
    assert ev.fd >= 0
    with Userfaultfd.adopt(ev.fd) as child_uffd:
        pid = t.wait()
        [fault] = wait_events(child_uffd, 1)
        assert fault == PageFault(b.addr + 2 * PAGE, fault.flags, None)
        child_uffd.copy(b.addr + 2 * PAGE, b"\x33" * PAGE, PAGE)  # into the child's mm
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0x33
    assert u.read_events() == []  # the parent's page stays missing
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(ev.fd)  # adopt() took ownership and closed it


def test_remove_event_and_page_missing_again(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.EVENT_REMOVE, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    u.copy(b.addr, b"\x05" * 4 * PAGE, 4 * PAGE)
    # madvise() waits for the REMOVE event to be read: discard from a thread.
    t = touch(b.discard, PAGE, 2 * PAGE)
    [ev] = wait_events(u, 1)
    assert ev == Remove(b.addr + PAGE, b.addr + 3 * PAGE)
    t.wait()
    assert mt.read_byte(b, 0) == 5  # outside the discarded range: still there
    r = touch(mt.read_byte, b, 2 * PAGE)
    [fault] = wait_events(u, 1)
    assert fault.address == b.addr + 2 * PAGE
    u.zeropage(b.addr + 2 * PAGE, PAGE)
    assert r.wait() == 0


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_discard_makes_the_page_missing_for_the_uffd(
    backing: str,
    uffd: Userfaultfd,
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    b = make_block("pc.ram", 4 * PAGE, backing=backing)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    uffd.copy(b.addr + PAGE, b"\x09" * PAGE, PAGE)
    assert mt.read_byte(b, PAGE) == 9
    b.discard(PAGE, PAGE)
    t = touch(mt.read_byte, b, PAGE)
    [fault] = wait_events(uffd, 1)
    assert fault.address == b.addr + PAGE
    uffd.copy(b.addr + PAGE, b"\x0a" * PAGE, PAGE)
    assert t.wait() == 10


def test_unmap_event(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.EVENT_UNMAP, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    start, end = b.addr, b.end
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    t = touch(b.close)  # munmap() waits for the UNMAP event to be read
    [ev] = wait_events(u, 1)
    assert ev == Unmap(start, end)
    t.wait()
    assert b.closed


def test_remap_event(make_uffd: Callable[..., Userfaultfd], touch: Callable[..., Toucher]) -> None:
    u = make_uffd(Feature.EVENT_REMAP, user_mode_only=True)
    # RamBlock has no mremap; use the C shims directly on a scratch mapping.
    # A same-size MAYMOVE mremap is a no-op, so move onto a reserved target.
    out = ffi.new("uint64_t *")
    assert lib.pc_mem_map(-1, 4 * PAGE, out) == 0
    old = int(out[0])
    assert lib.pc_mem_map(-1, 4 * PAGE, out) == 0
    target = int(out[0])
    mapped = [old, target]
    try:
        u.register(old, 4 * PAGE, RegisterMode.MISSING)
        t = touch(lib.pc_mem_remap, old, 4 * PAGE, target, out)  # waits for the event read
        [ev] = wait_events(u, 1)
        assert t.wait() == 0
        assert int(out[0]) == target
        mapped = [target]
        assert ev == Remap(old, target, 4 * PAGE)
    finally:
        for addr in mapped:
            lib.pc_mem_unmap(addr, 4 * PAGE)


def test_copy_while_an_event_is_pending_is_mapping_changed(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.EVENT_REMOVE, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    u.copy(b.addr, b"\x01" * PAGE, PAGE)
    t = touch(b.discard, 0, PAGE)
    assert select.select([u.fileno()], [], [], 5)[0]  # REMOVE queued, not yet read
    # The kernel refuses to fill pages while the address space is changing.
    with pytest.raises(
        MappingChanged,
        match=rf"UFFDIO_COPY dst=0x{b.addr + 2 * PAGE:x} .*Resource temporarily unavailable",
    ) as info:
        u.copy(b.addr + 2 * PAGE, b"\x02" * PAGE, PAGE)
    assert info.value.errno == errno.EAGAIN
    assert info.value.progress == 0
    assert u.read_events() == [Remove(b.addr, b.addr + PAGE)]
    t.wait()
    assert u.copy(b.addr + 2 * PAGE, b"\x02" * PAGE, PAGE) == PAGE
    assert mt.read_byte(b, 2 * PAGE) == 2
