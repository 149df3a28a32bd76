"""A preallocated 4 KiB block on the destination (a memfd, RamBlock.prefill): every page is
allocated before the stream, written through a second mapping and mapped into the guest
with UFFDIO_CONTINUE, each by the one channel that claims it first.

Real shmem memfds registered MISSING|MINOR with a real userfaultfd, the records written by
a thread into a socketpair (the receiver tests' Feed)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest

from postcopy import _datapath as dp
from uffd import FaultFlag, Feature, RamBlock, RegisterMode, Userfaultfd
from uffd import memtouch as mt

from .conftest import Toucher, wait_events
from .records import PAGE, Channel, Feed, Record, receive_on_two_channels, check_hashes, encode, page, read, receive


@pytest.fixture
def minor_uffd(make_uffd: Callable[..., Userfaultfd]) -> Userfaultfd:
    return make_uffd(Feature.THREAD_ID | Feature.MISSING_SHMEM | Feature.MINOR_SHMEM, user_mode_only=True)


def prefilled(make_block: Callable[..., RamBlock], n: int) -> RamBlock:
    b = make_block("pc.ram", n * PAGE, PAGE, "memfd")
    b.prefill()
    return b


def mapped_pages(addr: int, length: int) -> int:
    """Pages of [addr, addr+length) this process maps now (present in /proc/self/pagemap)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, length // PAGE * 8, addr // PAGE * 8)
    finally:
        os.close(fd)
    return sum(1 for (e,) in struct.iter_unpack("<Q", raw) if e >> 63)


def records(first: int, bodies: list[bytes | None]) -> list[Record]:
    return [("pc.ram", (first + i) * PAGE, body) for i, body in enumerate(bodies)]


def test_prefill_allocates_every_page_and_maps_them_beside_the_guest(make_block: Callable[..., RamBlock]) -> None:
    b = make_block("pc.ram", 64 * PAGE, PAGE, "memfd")
    assert os.fstat(b.fd).st_blocks == 0
    b.prefill()
    assert os.fstat(b.fd).st_blocks * 512 == 64 * PAGE
    assert b.prefilled
    # the second mapping is populated: every page is there, zeros, before anything touched it
    assert mapped_pages(b.alias(), 64 * PAGE) == 64
    assert mapped_pages(b.addr, 64 * PAGE) == 0        # the guest's mapping: nothing mapped yet
    assert read(b, 0, 64 * PAGE) == bytes(64 * PAGE)


def test_pages_are_written_beside_the_guest_and_mapped_with_continue(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher], chan: Channel
) -> None:
    n = 48
    b = prefilled(make_block, n)
    path = dp.DestinationPath([b], verify=True)
    assert path.minor == (True,)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    t = touch(mt.read_byte, b, 18 * PAGE + 3)
    [ev] = wait_events(minor_uffd, 1)
    # the page is in the file already, only not mapped: a minor fault, served like a missing one
    assert ev.address == b.addr + 18 * PAGE
    assert ev.flags & FaultFlag.MINOR
    path.attach_uffd(minor_uffd.fileno())
    # runs of consecutive pages with ZERO records and zero bodies among them, and a gap
    bodies: list[bytes | None] = [None if i % 7 == 3 else bytes(PAGE) if i % 11 == 5 else page(i) for i in range(n)]
    recs = records(0, bodies[:30]) + records(31, bodies[31:])
    rx = chan.receive(path, chan.feed(encode(recs), chunks=[PAGE + 9, 5000, 70000]))
    assert t.wait() == bodies[18][3]                            # type: ignore[index]
    want = b"".join(body or bytes(PAGE) for body in bodies)
    assert read(b, 0, 30 * PAGE) == want[:30 * PAGE]
    assert read(b, 31 * PAGE, (n - 31) * PAGE) == want[31 * PAGE:]
    c = path.counters()
    zeros = sum(1 for i, body in enumerate(bodies) if i != 30 and (body is None or body == bytes(PAGE)))
    assert (c.host_pages_placed, c.zero_host_pages_placed, c.eexist) == (n - 1, zeros, 0)
    assert rx._rx.c.host_pages_placed == n - 1
    assert path.received[0].count() == n - 1
    assert not path.received[0].test(30)
    check_hashes(path, 0, b, [i for i in range(n) if i != 30])
    # page 30 never came: still not mapped, its next touch faults
    t = touch(mt.read_byte, b, 30 * PAGE)
    [ev] = wait_events(minor_uffd, 1)
    assert ev.address == b.addr + 30 * PAGE
    chan.receive(path, chan.feed(encode(records(30, [page(99)]))))
    assert t.wait() == page(99)[0]


def test_a_second_copy_of_a_placed_page_never_overwrites_what_the_guest_wrote_since(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """The race UFFDIO_COPY settles with EEXIST: a second copy of a page arrives after a channel
    placed it and the guest wrote to it."""
    b = prefilled(make_block, 8)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    first = [page(100 + i) for i in range(4)]
    receive(path, feeds(encode(records(0, list(first)))))
    mt.write_byte(b, 2 * PAGE + 9, first[2][9] ^ 0xFF)          # the guest, once the page is mapped
    again = receive(path, feeds(encode(records(0, list(first)) + records(4, [page(7)] * 4))), dp.RX_PREEMPT)
    assert mt.read_byte(b, 2 * PAGE + 9) == first[2][9] ^ 0xFF
    assert read(b, 4 * PAGE, 4 * PAGE) == page(7) * 4
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (8, 4)
    assert again._rx.c.host_pages_placed == 4


@pytest.mark.parametrize("other_kind", ["preempt", "main+placer"])
def test_two_channels_bringing_the_same_pages_at_once_place_each_once(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed], other_kind: str
) -> None:
    n = 2048
    b = prefilled(make_block, n)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    pages = [page(500 + i) for i in range(n)]
    data = encode(records(0, list(pages)))
    receive_on_two_channels(path, data, other_kind, feeds)
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (n, n)
    assert read(b, 0, n * PAGE) == b"".join(pages)


def test_a_page_discarded_after_precopy_is_allocated_again(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher],
    feeds: Callable[..., Feed]
) -> None:
    """Precopy wrote pages 0-3 (nothing registered yet), the switch discarded them (punched
    holes): after LISTEN a fault there is a missing one, and placing the page allocates it
    again, a zero page as well as one with data."""
    b = prefilled(make_block, 8)
    path = dp.DestinationPath([b])
    receive(path, feeds(encode(records(0, [page(1), page(2), page(3), page(4)]))))
    assert read(b, 0, PAGE) == page(1)
    assert path.discard_ranges(0, [(0, 4 * PAGE)]) == 1
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    t = touch(mt.read_byte, b, PAGE + 17)
    [ev] = wait_events(minor_uffd, 1)
    assert not ev.flags & FaultFlag.MINOR        # a hole: missing
    path.attach_uffd(minor_uffd.fileno())
    receive(path, feeds(encode(records(0, [page(5), None, page(6), None]))))
    assert t.wait() == 0
    assert read(b, 0, 4 * PAGE) == page(5) + bytes(PAGE) + page(6) + bytes(PAGE)
    c = path.counters()
    assert (c.host_pages_placed, c.zero_host_pages_placed, c.eexist) == (8, 2, 0)


def test_a_discarded_range_is_claimable_again_exactly(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """A discard gives back the claims of its pages, whole words of them at once, and no more:
    pages 3-199 (parts of the first and last 64-page words, two whole words) come again and are
    placed again; the pages around them stay as they were placed first."""
    n = 300
    b = prefilled(make_block, n)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    first = [page(i) for i in range(n)]
    receive(path, feeds(encode(records(0, list(first)))))
    assert path.discard_ranges(0, [(3 * PAGE, 197 * PAGE)]) == 1
    assert path.received[0].count() == n - 197
    again = [page(1000 + i) for i in range(n)]
    receive(path, feeds(encode(records(0, list(again)))))
    assert path.received[0].count() == n           # (else reading the guest's mapping would wait)
    assert read(b, 0, n * PAGE) == b"".join(first[:3] + again[3:200] + first[200:])
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (n + 197, n - 197)
