"""The plain C remote fault under bench/migration.py's 2 MiB fault target (netbench.c
pc_nb_remote_fault): every page served is the page asked for (checked page by page after the
call), with one faulting thread or several over the one connection. Shape only, never speed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _floor import plain_remote_fault_ns

from uffd import PAGE_2M, PAGE_4K


@pytest.mark.parametrize("page_size", [PAGE_4K, pytest.param(PAGE_2M, marks=pytest.mark.hugetlb)],
                         ids=["4K", "2M"])
@pytest.mark.parametrize("faulters", [1, 2, 3])
def test_every_page_is_faulted_and_timed(page_size: int, faulters: int) -> None:
    npages = 7 if page_size == PAGE_2M else 301      # not a multiple of the faulters: the last ones get fewer
    lat = plain_remote_fault_ns(npages, page_size, faulters)
    assert len(lat) == npages
    assert all(x > 0 for x in lat), [i for i, x in enumerate(lat) if x <= 0]   # every page was touched and timed


@pytest.mark.parametrize("faulters", [0, 9])
def test_faulters_out_of_range_is_refused(faulters: int) -> None:
    with pytest.raises(ValueError, match="faulters"):
        plain_remote_fault_ns(4, PAGE_4K, faulters)
