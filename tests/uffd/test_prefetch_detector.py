"""The prefetch detector (uffd/csrc/prefetch.c) driven directly: page requests in,
the host pages it wants sent ahead out. No sockets, no threads."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from uffd._native import ffi, lib

KIB = 1024


class Detector:
    def __init__(self, npages: int | list[int] = 1 << 16, *, page_size: int = 4096, min_window: int = 64 * KIB,
                 max_window: int = 4096 * KIB) -> None:
        sizes = [npages] if isinstance(npages, int) else npages
        self.p = ffi.new("pc_prefetch *")
        assert lib.pc_pf_init(self.p, len(sizes)) == 0
        for i, n in enumerate(sizes):
            assert lib.pc_pf_set_block(self.p, i, n, page_size) == 0
        lib.pc_pf_configure(self.p, min_window, max_window)

    def close(self) -> None:
        lib.pc_pf_release(self.p)

    def request(self, page: int, block: int = 0) -> bool:
        return bool(lib.pc_pf_request(self.p, block, page))

    def due(self, *, mark: bool = True) -> Iterator[tuple[int, int]]:
        """Every (block, page) due now, marked sent (as the source does when it claims them)."""
        block = ffi.new("uint32_t *")
        page = ffi.new("uint64_t *")
        while lib.pc_pf_next(self.p, block, page):
            if mark:
                lib.pc_pf_mark_sent(self.p, block[0], page[0])
            yield int(block[0]), int(page[0])

    def pages(self) -> list[int]:
        return [p for _, p in self.due()]

    @property
    def c(self) -> dict[str, int]:
        return {k: int(getattr(self.p.c, k)) for k in
                ("requests", "hits", "misses", "windows", "pages_due", "pages_sent", "pages_used")}

    def zone(self, i: int) -> tuple[int, int, int] | None:
        block = ffi.new("uint32_t *")
        lo = ffi.new("uint64_t *")
        hi = ffi.new("uint64_t *")
        if not lib.pc_pf_zone(self.p, i, block, lo, hi):
            return None
        return int(block[0]), int(lo[0]), int(hi[0])


@pytest.fixture
def det() -> Iterator[Detector]:
    d = Detector()
    yield d
    d.close()


def test_sequential_stream_is_confirmed_on_the_third_request(det: Detector) -> None:
    assert not det.request(100)
    assert det.pages() == []            # one request says nothing
    assert not det.request(101)
    assert det.pages() == []            # a candidate stride, not trusted yet
    assert det.request(102)
    assert det.pages() == list(range(103, 103 + 16))    # the first window: 64 KiB of 4 KiB pages
    assert not lib.pc_pf_pending(det.p)


def test_window_doubles_while_the_guess_pays_up_to_the_cap() -> None:
    det = Detector(min_window=64 * KIB, max_window=512 * KIB)      # 16 .. 128 pages
    try:
        for q in (0, 1, 2):
            det.request(q)
        sent = det.pages()
        windows = [len(sent)]
        last = 2
        for _ in range(6):
            q = last + windows[-1]          # the guest walked through the window and faults at its end
            assert det.request(q)
            got = det.pages()
            sent += got
            windows.append(got[-1] - q)
            last = q
        assert windows == [16, 32, 64, 128, 128, 128, 128]
        assert sent == list(range(3, sent[-1] + 1)), "every page handed out once, in order"
    finally:
        det.close()


def test_request_inside_the_window_only_tops_it_up(det: Detector) -> None:
    for q in (10, 11, 12):
        det.request(q)
    first = det.pages()                 # 13..28
    assert det.request(15)              # the guest caught up with what is on its way
    more = det.pages()
    assert more == list(range(29, 15 + 32 + 1))     # up to 15 + 32 (the window doubled), nothing twice
    assert not set(first) & set(more)


def test_strided_and_backward_streams() -> None:
    det = Detector()
    try:
        for q in (1000, 1004, 1008):
            det.request(q)
        assert det.pages() == [1008 + 4 * k for k in range(1, 17)]
        for q in (5000, 4998, 4996):
            det.request(q)
        assert det.pages() == [4996 - 2 * k for k in range(1, 17)]
    finally:
        det.close()


def test_two_interleaved_walkers_are_two_streams(det: Detector) -> None:
    for a, b in zip(range(100, 103), range(40000, 40003), strict=True):
        det.request(a)
        det.request(b)
    due = det.pages()
    assert sorted(due) == list(range(103, 119)) + list(range(40003, 40019))
    assert due[:2] in ([103, 40003], [40003, 103]), "round-robin between streams"


def test_random_requests_send_nothing_ahead(det: Detector) -> None:
    rng = random.Random(7)
    for _ in range(5000):
        det.request(rng.randrange(1 << 16))
        assert det.pages() == []
    assert det.c["hits"] == 0
    assert det.c["misses"] == 5000


def test_a_jump_along_the_line_halves_the_window(det: Detector) -> None:
    for q in (0, 1, 2):
        det.request(q)
    det.pages()                         # 3..18
    det.request(18)
    det.pages()                         # window 32: up to 50
    assert not det.request(70)          # further along, within a window: the guest skipped what was sent for it
    got = det.pages()
    assert got == list(range(71, 70 + 16 + 1))      # halved back to 16
    assert not det.request(5000)        # far away: another stream
    assert det.c["misses"] == 4


def test_used_and_wasted_accounting(det: Detector) -> None:
    for q in (0, 1, 2):
        det.request(q)
    sent = det.pages()                  # 3..18
    assert det.c["pages_sent"] == len(sent) == 16
    det.request(10)                     # the guest passed 3..10
    assert det.c["pages_used"] == 8
    det.pages()
    det.request(30000)                  # the guest went elsewhere: the rest is never passed
    assert det.c["pages_used"] == 8
    assert det.c["pages_sent"] == 16 + 24          # then 19..42: a window of 32 past 10
    assert det.c["pages_sent"] - det.c["pages_used"] == 40 - 8


def test_a_request_for_a_page_sent_ahead_counts_it_used(det: Detector) -> None:
    for q in (0, 1, 2):
        det.request(q)
    det.pages()
    det.request(5000)                   # another stream
    det.request(7)                      # on its way, asked for: used
    assert det.c["pages_used"] >= 1


def test_unmark_takes_a_page_back(det: Detector) -> None:
    for q in (0, 1, 2):
        det.request(q)
    det.pages()
    lib.pc_pf_unmark_sent(det.p, 0, 3)
    lib.pc_pf_unmark_sent(det.p, 0, 3)  # twice: counted once
    assert det.c["pages_sent"] == 15


def test_windows_stop_at_the_block_end() -> None:
    det = Detector(100)
    try:
        for q in (90, 91, 92):
            det.request(q)
        assert det.pages() == list(range(93, 100))
        assert not det.request(100)     # outside the block: ignored
    finally:
        det.close()


def test_huge_pages_windows_are_in_bytes() -> None:
    det = Detector(512, page_size=2 << 20, min_window=64 * KIB, max_window=8 << 20)
    try:
        for q in (5, 6, 7):
            det.request(q)
        assert det.pages() == [8]       # at least one host page
        det.request(8)
        assert det.pages() == [9, 10]
        assert det.c["pages_sent"] == 3 * 512      # counters are in 4 KiB pages
    finally:
        det.close()


def test_off_sends_nothing() -> None:
    det = Detector(max_window=0)
    try:
        for q in range(100):
            det.request(q)
        assert det.pages() == []
        assert det.c["requests"] == 0
    finally:
        det.close()


def test_zone_covers_the_walk_ahead(det: Detector) -> None:
    assert all(det.zone(i) is None for i in range(lib.PC_PF_STREAMS))
    for q in (0, 1, 2):
        det.request(q)
    zones = [z for z in (det.zone(i) for i in range(lib.PC_PF_STREAMS)) if z is not None]
    assert zones == [(0, 2, 2 + 16 + 16 + 1)]        # from the last request to a window past what is due


def test_a_strided_walk_has_no_zone(det: Detector) -> None:
    # The prefetch sends only the pages on a strided line; a zone would make the bulk stream
    # skip the pages between them too, and nobody would send those before its next pass.
    for q in (0, 8, 16):
        det.request(q)
    assert det.pages()[:2] == [24, 32]          # the walker is followed
    assert all(det.zone(i) is None for i in range(lib.PC_PF_STREAMS))


def test_reset_forgets_streams_but_not_counters(det: Detector) -> None:
    for q in (0, 1, 2):
        det.request(q)
    lib.pc_pf_reset(det.p)
    assert det.pages() == []
    assert not det.request(3)           # a new stream: no hit
    assert det.c["hits"] == 1


def test_lru_replacement_keeps_the_active_streams(det: Detector) -> None:
    for q in (100, 101, 102):
        det.request(q)
    det.pages()
    rng = random.Random(3)
    for i in range(lib.PC_PF_STREAMS * 4):     # noise, interleaved with the walker
        det.request(rng.randrange(10000, 1 << 16))
        if i % 2 == 0:
            det.request(103 + i // 2)
    assert det.request(103 + lib.PC_PF_STREAMS * 2)
