"""The C bench helpers really do what the benchmark reports."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from uffd import RamBlock, RegisterMode, Userfaultfd
from uffd import memtouch as mt

PAGE = 4096


def test_bench_copy_places_every_page(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    dst = make_block("dst", 64 * PAGE)
    src = make_block("src", 64 * PAGE)
    mt.fill_pattern(src, 0, src.used_length, seed=4)
    uffd.register(dst.addr, dst.used_length, RegisterMode.MISSING)
    assert mt.bench_copy(uffd, dst, src, 64) > 0
    assert mt.check_pattern(dst, 0, dst.used_length, seed=4) == -1
    with pytest.raises(
        OSError, match=r"bench_copy: UFFDIO_COPY into RAM block 'dst': File exists"
    ) as info:
        mt.bench_copy(uffd, dst, src, 1)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(ValueError, match="outside the block"):
        mt.bench_copy(uffd, dst, src, 65)


def test_wakeup_pingpong_measures_round_trips() -> None:
    lat = mt.bench_wakeup_pingpong(100)
    assert len(lat) == 100
    assert all(0 < ns < 10**9 for ns in lat)
