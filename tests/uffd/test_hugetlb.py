"""Huge pages: a whole host page assembled in a temp buffer and placed with one COPY."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from uffd import PAGE_1G, PAGE_2M, Feature, RamBlock, RegisterMode, UffdError, Userfaultfd
from uffd import memtouch as mt

from .conftest import Toucher, wait_events

PAGE = 4096


def _place_huge_page(
    u: Userfaultfd,
    make_block: Callable[..., RamBlock],
    touch: Callable[..., Toucher],
    page_size: int,
    npages: int,
) -> None:
    assert Feature.MISSING_HUGETLBFS in u.features
    dst = make_block("pc.ram", npages * page_size, page_size, "hugetlbfs")
    assert dst.page_size == page_size
    u.register(dst.addr, dst.used_length, RegisterMode.MISSING)
    target = (npages - 1) * page_size  # the last host page of the block
    probe = target + page_size // 2 + 12345
    t = touch(mt.read_byte, dst, probe)
    [ev] = wait_events(u, 1)
    assert dst.addr + target <= ev.address < dst.addr + target + page_size
    # Assemble the host page in a temp buffer from pieces arriving out of
    # order (64 C calls, last piece first), as a receiver would ...
    temp = make_block("temp", page_size)
    piece = page_size // 64
    for o in reversed(range(0, page_size, piece)):
        mt.fill_pattern(temp, o, piece, seed=(11 + (o >> 12) * 7 + o) & 0xFF)
    assert mt.check_pattern(temp, 0, page_size, seed=11) == -1
    # ... a 4 KiB COPY into a huge page is refused (it must be one atomic host page)
    with pytest.raises(
        UffdError, match=rf"UFFDIO_COPY dst=0x{dst.addr + target:x} .*len=4096.*Invalid argument"
    ) as info:
        u.copy(dst.addr + target, temp.addr, PAGE)
    assert info.value.errno == errno.EINVAL
    assert t.is_blocked()
    # ... then one COPY places the whole host page and wakes the reader.
    assert u.copy(dst.addr + target, temp.addr, page_size) == page_size
    assert t.wait() == (11 + (probe >> 12) * 7 + probe) & 0xFF
    assert mt.check_pattern(dst, target, page_size, seed=11) == -1


@pytest.mark.hugetlb
def test_2m_page_placed_atomically(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    _place_huge_page(uffd, make_block, touch, PAGE_2M, 2)


@pytest.mark.hugetlb_1g
def test_1g_page_placed_atomically(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    _place_huge_page(uffd, make_block, touch, PAGE_1G, 1)


@pytest.mark.hugetlb
def test_hugetlb_zeropage_is_refused_and_discard_makes_page_missing_again(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher]
) -> None:
    b = make_block("pc.ram", 2 * PAGE_2M, PAGE_2M, "hugetlbfs")
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    # The kernel has no huge zero page for hugetlbfs: ZEROPAGE is EINVAL there.
    with pytest.raises(UffdError, match=r"UFFDIO_ZEROPAGE.*Invalid argument"):
        uffd.zeropage(b.addr, PAGE_2M)
    src = make_block("src", PAGE_2M)
    mt.fill_pattern(src, 0, PAGE_2M, seed=1)
    uffd.copy(b.addr + PAGE_2M, src.addr, PAGE_2M)
    assert touch(mt.read_byte, b, PAGE_2M + 1).wait() == 2
    assert uffd.read_events() == []
    b.discard(PAGE_2M, PAGE_2M)  # hole punch: missing again for the uffd
    t = touch(mt.read_byte, b, PAGE_2M + 1)
    [ev] = wait_events(uffd, 1)
    assert b.addr + PAGE_2M <= ev.address < b.end
    mt.fill_pattern(src, 0, PAGE_2M, seed=5)
    uffd.copy(b.addr + PAGE_2M, src.addr, PAGE_2M)
    assert t.wait() == 6
