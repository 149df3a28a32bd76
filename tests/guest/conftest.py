"""Guest memory for the synthetic-guest tests: real anonymous (or hugetlb) mappings."""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Iterator

import pytest

from uffd._native import ffi

MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # Python 3.11's mmap lacks the name
HUGE_2M = 2 << 20


class Memory:
    """One private anonymous mapping whose address C code can use."""

    def __init__(self, length: int, huge_page_size: int | None = None) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if huge_page_size is not None:
            flags |= MAP_HUGETLB
        self.length = length
        self.page_size = huge_page_size or mmap.PAGESIZE
        self.map = mmap.mmap(-1, length, flags=flags)
        self._cdata = ffi.from_buffer(self.map)
        self.addr = int(ffi.cast("uintptr_t", self._cdata))

    def region(self) -> tuple[int, int, int]:
        return (self.addr, self.length, self.page_size)

    def close(self) -> None:
        ffi.release(self._cdata)
        self.map.close()


MemoryFactory = Callable[..., Memory]


@pytest.fixture
def memory() -> Iterator[MemoryFactory]:
    """memory(length, huge_page_size=None) -> Memory; all unmapped at teardown."""
    made: list[Memory] = []

    def make(length: int, huge_page_size: int | None = None) -> Memory:
        made.append(Memory(length, huge_page_size))
        return made[-1]

    yield make
    for m in made:
        m.close()


WaitUntil = Callable[..., None]


@pytest.fixture
def wait_until() -> WaitUntil:
    """wait_until(predicate, what, timeout=10): poll instead of trusting a fixed sleep,
    since vCPU threads on a loaded 2-core host may start late."""

    def wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.005)

    return wait
