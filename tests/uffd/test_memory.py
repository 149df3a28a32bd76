"""RamBlock and GuestMemory: backings, page sizes, range checks, lookup, sharing."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import pytest

from uffd import PAGE_1G, PAGE_2M, GuestMemory, RamBlock, UnknownBlockError
from uffd import memtouch as mt

PAGE = 4096


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_block_basics(backing: str) -> None:
    with RamBlock("pc.ram", 8 * PAGE, backing=backing) as b:  # type: ignore[arg-type]
        assert (b.idstr, b.used_length, b.page_size) == ("pc.ram", 8 * PAGE, PAGE)
        assert b.addr % PAGE == 0
        assert b.end == b.addr + 8 * PAGE
        assert (b.fd is None) == (backing == "anon")
        mt.write_byte(b, 8 * PAGE - 1, 0x5A)
        assert b.view()[8 * PAGE - 1] == 0x5A
    assert b.closed
    assert b.fd is None


def test_memfd_block_is_shared_through_its_fd() -> None:
    with RamBlock("pc.ram", 4 * PAGE, backing="memfd") as b:
        assert b.fd is not None
        other = mmap.mmap(b.fd, 4 * PAGE, mmap.MAP_SHARED)  # as another process would map it
        try:
            other[PAGE : PAGE + 3] = b"abc"
            assert bytes(b.view()[PAGE : PAGE + 3]) == b"abc"
            b.discard(PAGE, PAGE)
            assert other[PAGE : PAGE + 3] == b"\0\0\0"  # the hole is seen by every mapping
        finally:
            other.close()


@pytest.mark.hugetlb
def test_hugetlbfs_block() -> None:
    with RamBlock("pc.ram", 2 * PAGE_2M, PAGE_2M, "hugetlbfs") as b:
        assert b.page_size == PAGE_2M
        assert b.addr % PAGE_2M == 0
        assert b.fd is not None
        mt.write_byte(b, PAGE_2M + 7, 1)
        b.discard(PAGE_2M, PAGE_2M)
        assert mt.read_byte(b, PAGE_2M + 7) == 0
        with pytest.raises(
            ValueError,
            match=r"offset=0x1000 length=4096 is not aligned to the host page size 2097152",
        ):
            b.discard(PAGE, PAGE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pc.ram", 4097), r"used_length=4097 must be a positive multiple of the page size 4096"),
        (("pc.ram", 0), r"used_length=0"),
        (
            ("pc.ram", PAGE_2M + PAGE, PAGE_2M, "hugetlbfs"),
            r"used_length=2101248 .* page size 2097152",
        ),
        (
            ("pc.ram", PAGE_2M, PAGE_2M, "anon"),
            r"page_size=2097152 is not valid for backing='anon'",
        ),
        (
            ("pc.ram", PAGE, PAGE, "hugetlbfs"),
            r"page_size=4096 is not valid for backing='hugetlbfs' \(allowed: 2097152, 1073741824\)",
        ),
        (
            ("pc.ram", PAGE, PAGE, "tmpfs"),
            r"backing must be 'anon', 'memfd' or 'hugetlbfs', got 'tmpfs'",
        ),
        (("", PAGE), r"idstr must be 1..255 bytes"),
        (("x" * 256, PAGE), r"idstr must be 1..255 bytes"),
    ],
)
def test_bad_block_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RamBlock(*args)


def test_hugetlbfs_without_enough_pages_says_so() -> None:
    # Far more 1 GiB pages than any test host reserves.
    with pytest.raises(
        OSError, match=r"mmap of RAM block 'big'.*needs 4096 free 1024 MiB hugepages, \d+ free"
    ):
        RamBlock("big", 4096 * PAGE_1G, PAGE_1G, "hugetlbfs")


def test_check_range_and_byte_access_bounds(make_block: Callable[..., RamBlock]) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    b.check_range(0, 4 * PAGE)
    b.check_range(3 * PAGE, PAGE)
    for off, length, msg in [
        (4 * PAGE, PAGE, "outside the block"),
        (3 * PAGE, 2 * PAGE, "outside the block"),
        (-PAGE, PAGE, "outside the block"),
        (0, 0, "outside the block"),
        (100, PAGE, "not aligned"),
        (0, 100, "not aligned"),
    ]:
        with pytest.raises(ValueError, match=rf"RAM block 'pc.ram': .*{msg}"):
            b.check_range(off, length)
    with pytest.raises(ValueError, match="outside the block"):
        mt.write_byte(b, 4 * PAGE, 1)  # never a write outside a RAM block
    with pytest.raises(ValueError, match="outside the block"):
        mt.sum_range(b, PAGE, 4 * PAGE)
    with pytest.raises(ValueError, match="outside the block"):
        b.discard(2 * PAGE, 4 * PAGE)
    b.close()
    with pytest.raises(ValueError, match=r"RAM block 'pc\.ram' is closed"):
        mt.read_byte(b, 0)


def test_guest_memory_lookup(make_block: Callable[..., RamBlock]) -> None:
    a = make_block("pc.ram", 8 * PAGE)
    rom = make_block("pc.rom", 2 * PAGE, backing="memfd")
    mem = GuestMemory([a, rom])
    assert mem.block("pc.rom") is rom
    assert len(mem) == 2
    assert list(mem) == [a, rom]
    assert mem.total_bytes == 10 * PAGE
    assert mem.block_at(a.addr + 5 * PAGE + 3) == (a, 5 * PAGE + 3)
    assert mem.block_at(rom.end - 1) == (rom, 2 * PAGE - 1)
    assert mem.block_at(rom.end) == ((a, 0) if a.addr == rom.end else None)
    assert mem.block_at(0) is None
    with pytest.raises(
        UnknownBlockError, match=r"unknown RAM block 'vga.vram'; known: 'pc.ram', 'pc.rom'"
    ):
        mem.block("vga.vram")
    with pytest.raises(KeyError):
        mem.block("vga.vram")
    with mem:
        pass
    assert a.closed
    assert rom.closed


def test_guest_memory_rejects_duplicates(make_block: Callable[..., RamBlock]) -> None:
    a = make_block("pc.ram", PAGE)
    b = make_block("pc.ram", PAGE)
    with pytest.raises(ValueError, match=r"duplicate RAM block idstr 'pc\.ram'"):
        GuestMemory([a, b])
