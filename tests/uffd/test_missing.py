"""MISSING-mode faults against the real kernel: COPY, ZEROPAGE, EEXIST, wake, errors."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from uffd import (
    CopyMode,
    FaultFlag,
    Ioctl,
    PageAlreadyPresent,
    PageFault,
    RamBlock,
    RegisterMode,
    Userfaultfd,
)
from uffd import memtouch as mt

from .conftest import Toucher, wait_events

PAGE = 4096


def test_read_fault_blocks_until_copy_and_sees_the_data(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 16 * PAGE)
    ioctls = uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    assert Ioctl.COPY in ioctls
    assert Ioctl.ZEROPAGE in ioctls
    assert Ioctl.WAKE in ioctls
    t = touch(mt.sum_range, b, 5 * PAGE, PAGE)
    [ev] = wait_events(uffd, 1)
    assert ev == PageFault(b.addr + 5 * PAGE, FaultFlag(0), t.thread.native_id)
    assert t.is_blocked()
    page = bytes(range(256)) * 16
    assert uffd.copy(b.addr + 5 * PAGE, page, PAGE) == PAGE
    assert t.wait() == sum(page)
    assert uffd.read_events() == []  # nothing else pending


def test_write_fault_has_write_flag_and_write_lands(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    t = touch(mt.write_byte, b, 2 * PAGE + 100, 0xAB)
    [ev] = wait_events(uffd, 1)
    assert FaultFlag.WRITE in ev.flags
    uffd.copy(b.addr + 2 * PAGE, bytes([7]) * PAGE, PAGE)
    t.wait()
    assert mt.read_byte(b, 2 * PAGE + 100) == 0xAB
    assert mt.read_byte(b, 2 * PAGE + 101) == 7


def test_zeropage_resolves_with_zeros(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    t = touch(mt.touch_range, b, PAGE, PAGE, 64)
    wait_events(uffd, 1)
    assert uffd.zeropage(b.addr + PAGE, PAGE) == PAGE
    assert t.wait() == 0


def test_copy_dontwake_then_wake(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    t = touch(mt.read_byte, b, 0)
    wait_events(uffd, 1)
    uffd.copy(b.addr, bytes([9]) * PAGE, PAGE, CopyMode.DONTWAKE)
    assert t.is_blocked()  # placed, but nobody woke the thread
    uffd.wake(b.addr, PAGE)
    assert t.wait() == 9


def test_copy_onto_present_page_is_page_already_present(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    uffd.copy(b.addr + PAGE, bytes([1]) * PAGE, PAGE)
    with pytest.raises(PageAlreadyPresent) as info:
        uffd.copy(b.addr + PAGE, bytes([2]) * PAGE, PAGE)
    assert info.value.errno == errno.EEXIST
    assert str(info.value).startswith(f"UFFDIO_COPY dst=0x{b.addr + PAGE:x} src=0x")
    assert "len=4096 mode=0: File exists" in str(info.value)
    with pytest.raises(PageAlreadyPresent, match="UFFDIO_ZEROPAGE"):
        uffd.zeropage(b.addr + PAGE, PAGE)
    # A two-page COPY stopping at the present page reports how far it got.
    with pytest.raises(PageAlreadyPresent) as info:
        uffd.copy(b.addr, bytes([3]) * 2 * PAGE, 2 * PAGE)
    assert info.value.progress == PAGE
    assert mt.read_byte(b, PAGE) == 1  # untouched by the refused copies
    assert mt.read_byte(b, 0) == 3


def test_fault_on_unregistered_range_is_not_reported(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    registered = make_block("pc.ram", 4 * PAGE)
    plain = make_block("other", 4 * PAGE)
    uffd.register(registered.addr, registered.used_length, RegisterMode.MISSING)
    assert touch(mt.touch_range, plain, 0, 4 * PAGE, PAGE, True).wait() == 0
    assert uffd.read_events() == []
    # ... and after unregistering, the registered block behaves the same.
    uffd.unregister(registered.addr, registered.used_length)
    assert touch(mt.read_byte, registered, PAGE).wait() == 0
    assert uffd.read_events() == []


def test_user_mode_only_refuses_kernel_access_with_efault(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    assert uffd.user_mode_only
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="Bad address") as info:
            mt.write_to_fd(w, b, 0, PAGE)
        assert info.value.errno == errno.EFAULT
    finally:
        os.close(r)
        os.close(w)
    assert uffd.read_events() == []


@pytest.mark.root
def test_kernel_mode_fault_is_served_without_user_mode_only(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(user_mode_only=False)
    assert not u.user_mode_only
    b = make_block("pc.ram", 4 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    r, w = os.pipe()
    try:
        t = touch(mt.write_to_fd, w, b, PAGE, PAGE)  # the kernel's copy_from_user faults
        [ev] = wait_events(u, 1)
        assert ev.address == b.addr + PAGE
        assert t.is_blocked()
        u.copy(b.addr + PAGE, b"k" * PAGE, PAGE)
        assert t.wait() == PAGE
        assert os.read(r, PAGE) == b"k" * PAGE
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.root
def test_device_path_opens_a_working_uffd(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(via="device", user_mode_only=False)
    assert u.opened_via == "device"
    b = make_block("pc.ram", 2 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    t = touch(mt.read_byte, b, 0)
    wait_events(u, 1)
    u.copy(b.addr, b"\x05" * PAGE, PAGE)
    assert t.wait() == 5


def test_many_faulting_threads_are_batched(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 64 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    ts = [touch(mt.read_byte, b, i * PAGE + i) for i in range(0, 64, 4)]
    events = wait_events(uffd, len(ts))
    assert sorted(e.address for e in events) == [b.addr + i * PAGE for i in range(0, 64, 4)]
    src = make_block("src", 64 * PAGE)
    mt.fill_pattern(src, 0, 64 * PAGE, seed=3)
    uffd.copy(b.addr, src.addr, 64 * PAGE)  # one COPY wakes all of them
    for i, t in zip(range(0, 64, 4), ts, strict=True):
        assert t.wait() == (3 + i * 7 + i * PAGE + i) & 0xFF
