"""FaultReader / pc_read_faults: block mapping, host-page rounding, received/requested filtering."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import pytest

from uffd import (
    PAGE_2M,
    Bitmap,
    FaultReader,
    FaultStatus,
    Feature,
    RamBlock,
    RegisterMode,
    Remove,
    Userfaultfd,
)
from uffd import memtouch as mt
from uffd._lowlevel import ffi, lib

from .conftest import Toucher

PAGE = 4096


def read_until(reader: FaultReader, n: int, timeout: float = 5.0) -> tuple[list, int]:
    faults: list = []
    dropped = 0
    deadline = time.monotonic() + timeout
    while len(faults) + dropped < n:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(
                f"expected {n} faults (kept or dropped), got {faults} and {dropped} dropped"
            )
        select.select([reader.uffd.fileno()], [], [], left)
        batch = reader.read_batch()
        faults.extend(batch)
        dropped += batch.dropped
    return faults, dropped


@pytest.mark.hugetlb
def test_filtering_against_bitmaps(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    small = make_block("pc.ram", 16 * PAGE)
    huge = make_block("huge.ram", 2 * PAGE_2M, PAGE_2M, "hugetlbfs")
    stranger = make_block("not-in-reader", 4 * PAGE)
    for b in (small, huge, stranger):
        uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    rec_s, req_s = Bitmap(16), Bitmap(16)
    rec_h, req_h = Bitmap(2 * PAGE_2M // PAGE), Bitmap(2 * PAGE_2M // PAGE)
    reader = FaultReader(uffd, [(huge, rec_h, req_h), (small, rec_s, req_s)])
    assert {b.idstr for b in reader.blocks} == {"pc.ram", "huge.ram"}
    rec_s.set(5)  # page 5 "already received" (placed later in this test)
    ts = [
        touch(mt.read_byte, small, 3 * PAGE + 1),
        touch(mt.read_byte, small, 5 * PAGE + 2),
        touch(mt.read_byte, huge, PAGE_2M + 5 * PAGE + 3),
        touch(mt.read_byte, stranger, PAGE),
    ]
    faults, dropped = read_until(reader, 4)
    assert dropped == 1
    by_block = {f.block.idstr if f.block else None: f for f in faults}
    s = by_block["pc.ram"]
    assert (s.offset, s.status, s.address) == (3 * PAGE, FaultStatus.NEW, small.addr + 3 * PAGE)
    h = by_block["huge.ram"]
    assert h.offset == PAGE_2M  # rounded down to the host page
    assert h.status == FaultStatus.NEW
    assert req_h.test(PAGE_2M // PAGE)
    assert req_h.count() == 1
    o = by_block[None]
    assert o.status == FaultStatus.OUTSIDE
    assert o.address == stranger.addr + PAGE
    assert list(req_s.iter_set()) == [3]
    assert all(f.t_ns > 0 for f in faults)
    # A second thread on the requested page is ALREADY_REQUESTED.
    again = touch(mt.read_byte, small, 3 * PAGE + 100)
    [dup], dropped = read_until(reader, 1)
    assert dup.status == FaultStatus.ALREADY_REQUESTED
    assert dropped == 0
    # Serve everything; every thread completes.
    uffd.copy(small.addr + 3 * PAGE, b"\x03" * PAGE, PAGE)
    uffd.copy(small.addr + 5 * PAGE, b"\x05" * PAGE, PAGE)
    src = make_block("src", PAGE_2M)
    mt.fill_pattern(src, 0, PAGE_2M, seed=0)
    uffd.copy(huge.addr + PAGE_2M, src.addr, PAGE_2M)
    uffd.zeropage(stranger.addr + PAGE, PAGE)
    assert [t.wait() for t in ts] == [3, 5, (5 * 7 + 5 * PAGE + 3) & 0xFF, 0]
    assert again.wait() == 3
    assert reader.read_batch().count == 0  # nothing pending: empty batch, no error


def test_non_fault_events_come_back_beside_faults(
    make_uffd: Callable[..., Userfaultfd],
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
) -> None:
    u = make_uffd(Feature.EVENT_REMOVE | Feature.THREAD_ID, user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    u.register(b.addr, b.used_length, RegisterMode.MISSING)
    u.copy(b.addr, bytes(PAGE), PAGE)
    reader = FaultReader(u, [(b, None, None)])
    t = touch(b.discard, 0, PAGE)
    deadline = time.monotonic() + 5
    others: list = []
    while not others and time.monotonic() < deadline:
        select.select([u.fileno()], [], [], 1)
        batch = reader.read_batch()
        assert batch.count == 0
        others.extend(batch.other_events)
    assert others == [Remove(b.addr, b.addr + PAGE)]
    t.wait()
    f = touch(mt.read_byte, b, 2 * PAGE)
    [fault], _ = read_until(reader, 1)
    assert fault.tid == f.thread.native_id
    assert fault.status == FaultStatus.NEW  # no bitmaps: nothing filtered
    u.zeropage(b.addr + 2 * PAGE, PAGE)
    assert f.wait() == 0


def test_batch_cdata_is_usable_without_python_objects(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 32 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    req = Bitmap(32)
    reader = FaultReader(uffd, [(b, None, req)], max_batch=8)
    ts = [touch(mt.read_byte, b, i * PAGE) for i in range(12)]
    wait_for = 12
    offsets: list[int] = []
    deadline = time.monotonic() + 5
    while len(offsets) < wait_for and time.monotonic() < deadline:
        select.select([uffd.fileno()], [], [], 1)
        batch = reader.read_batch()
        assert batch.count <= 8
        offsets.extend(batch.faults[i].offset for i in range(batch.count))
    assert sorted(offsets) == [i * PAGE for i in range(12)]
    uffd.zeropage(b.addr, 12 * PAGE)
    for t in ts:
        assert t.wait() == 0


def test_reader_rejects_bad_configuration(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    b = make_block("pc.ram", 16 * PAGE)
    with pytest.raises(
        ValueError, match=r"received bitmap of RAM block 'pc.ram' has 8 bits, needs 16"
    ):
        FaultReader(uffd, [(b, Bitmap(8), None)])
    with pytest.raises(ValueError, match="max_batch=0"):
        FaultReader(uffd, [(b, None, None)], max_batch=0)


def test_find_block_binary_search() -> None:
    desc = ffi.new("pc_block_desc[]", 3)
    for i, (base, length) in enumerate([(0x1000, 0x2000), (0x10000, 0x1000), (0x20000, 0x10000)]):
        desc[i].base, desc[i].length = base, length
    cases = {0: None, 0xFFF: None, 0x1000: 0, 0x2FFF: 0, 0x3000: None, 0x10000: 1, 0x10FFF: 1, 0x11000: None,
             0x20000: 2, 0x2FFFF: 2, 0x30000: None}  # fmt: skip
    for addr, want in cases.items():
        got = lib.pc_find_block(desc, 3, addr)
        assert got == (lib.PC_FAULT_NO_BLOCK if want is None else want), hex(addr)
    assert lib.pc_find_block(desc, 0, 0x1000) == lib.PC_FAULT_NO_BLOCK
