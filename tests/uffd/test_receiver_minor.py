"""A prefilled hugetlbfs block on the destination (RamBlock.prefill): its pages are
written through a second mapping of the file and mapped into the guest with
UFFDIO_CONTINUE, each by the one channel that claims it first.

Real hugetlbfs memfds registered MISSING|MINOR with a real userfaultfd, the
records written by a thread into a socketpair (the receiver tests' Feed)."""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable

import pytest

from postcopy import _datapath as dp
from uffd import PAGE_2M, FaultFlag, Feature, RamBlock, RegisterMode, Userfaultfd
from uffd._memory import free_hugepages
from uffd import memtouch as mt

from .conftest import Toucher, wait_events
from .records import (PAGE, SECTION_PART, Channel, Feed, Record, check_hashes, encode, page, read, receive,
                      receive_on_two_channels)

NTP = PAGE_2M // PAGE

pytestmark = pytest.mark.hugetlb


def host_page(seed: int) -> list[bytes]:
    return [page(seed * NTP + i) for i in range(NTP)]


def records(host_off: int, bodies: list[bytes | None]) -> list[Record]:
    return [("pc.ram", host_off + i * PAGE, body) for i, body in enumerate(bodies)]


@pytest.fixture
def minor_uffd(make_uffd: Callable[..., Userfaultfd]) -> Userfaultfd:
    return make_uffd(Feature.THREAD_ID | Feature.MISSING_HUGETLBFS | Feature.MINOR_HUGETLBFS, user_mode_only=True)


def prefilled(make_block: Callable[..., RamBlock], n: int) -> RamBlock:
    b = make_block("pc.ram", n * PAGE_2M, PAGE_2M, "hugetlbfs")
    b.prefill()
    return b


def test_pages_of_a_prefilled_block_are_written_beside_the_guest_and_mapped_with_continue(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher], chan: Channel
) -> None:
    b = prefilled(make_block, 3)
    path = dp.DestinationPath([b], verify=True)
    assert path.minor == (True,)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    t = touch(mt.read_byte, b, PAGE_2M + 5 * PAGE + 1)
    [ev] = wait_events(minor_uffd, 1)
    # the page is in the file already, only not mapped: a minor fault, served like a missing one
    assert ev.address == b.addr + PAGE_2M
    assert ev.flags & FaultFlag.MINOR
    path.attach_uffd(minor_uffd.fileno())
    pages = [host_page(0), host_page(1), [bytes(PAGE)] * NTP]       # host page 2 all zero
    rx = chan.receive(path, chan.feed(encode([r for i, p in enumerate(pages)
                                              for r in records(i * PAGE_2M, list(p))]),
                                      chunks=[PAGE_2M + 3, 5000, 700000]))
    assert t.wait() == pages[1][5][1]
    assert read(b, 0, 3 * PAGE_2M) == b"".join(b"".join(p) for p in pages)
    c = path.counters()
    assert (c.host_pages_placed, c.zero_host_pages_placed, c.eexist) == (3, 1, 0)
    assert path.received[0].count() == 3 * NTP
    assert rx._rx.c.host_pages_placed == 3
    check_hashes(path, 0, b, range(3 * NTP))


def test_a_second_copy_of_a_placed_page_never_overwrites_what_the_guest_wrote_since(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """The race UFFDIO_COPY settles with EEXIST: the bulk stream's copy of a page arrives after
    the preempt channel placed it and the guest wrote to it."""
    b = prefilled(make_block, 2)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    first = host_page(7)
    receive(path, feeds(encode(records(0, list(first)))))
    mt.write_byte(b, 3 * PAGE + 9, first[3][9] ^ 0xFF)        # the guest, once the page is mapped
    again = receive(path, feeds(encode(records(0, list(first)) + records(PAGE_2M, list(host_page(8))))),
                    dp.RX_PREEMPT)
    assert mt.read_byte(b, 3 * PAGE + 9) == first[3][9] ^ 0xFF
    assert read(b, PAGE_2M, PAGE_2M) == b"".join(host_page(8))
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (2, 1)
    assert again._rx.c.host_pages_placed == 1


def test_a_page_discarded_after_precopy_is_allocated_again(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], touch: Callable[..., Toucher],
    feeds: Callable[..., Feed]
) -> None:
    """Precopy wrote host pages 0 and 1 (nothing registered yet), the switch discarded them (a
    punched hole each): after LISTEN a fault there is a missing one, and placing the page
    allocates it again, a zero page as well as one with data."""
    b = prefilled(make_block, 2)
    path = dp.DestinationPath([b])
    receive(path, feeds(encode(records(0, list(host_page(1))) + records(PAGE_2M, list(host_page(2))))))
    assert read(b, 0, PAGE) == host_page(1)[0]
    assert path.discard_ranges(0, [(0, 2 * PAGE_2M)]) == 1
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    t = touch(mt.read_byte, b, 17)
    [ev] = wait_events(minor_uffd, 1)
    assert not ev.flags & FaultFlag.MINOR        # a hole: missing
    path.attach_uffd(minor_uffd.fileno())
    zero: list[bytes | None] = [None] * NTP
    receive(path, feeds(encode(records(0, zero) + records(PAGE_2M, list(host_page(3))))))
    assert t.wait() == 0
    assert read(b, 0, PAGE_2M) == bytes(PAGE_2M)
    assert read(b, PAGE_2M, PAGE_2M) == b"".join(host_page(3))
    c = path.counters()
    assert (c.host_pages_placed, c.zero_host_pages_placed, c.eexist) == (4, 1, 0)


def test_only_a_prefilled_block_takes_the_second_mapping(make_block: Callable[..., RamBlock]) -> None:
    huge = make_block("huge", PAGE_2M, PAGE_2M, "hugetlbfs")
    small = make_block("small", 16 * PAGE, PAGE, "memfd")
    anon = make_block("anon", 16 * PAGE, PAGE, "anon")
    assert dp.DestinationPath([huge, small, anon]).minor == (False, False, False)
    with pytest.raises(ValueError, match="anon memory cannot be prefilled"):
        anon.prefill()
    huge.prefill()
    assert dp.DestinationPath([huge, small, anon]).minor == (True, False, False)
    small.prefill()
    assert dp.DestinationPath([huge, small, anon]).minor == (True, True, False)


@pytest.mark.parametrize("attempt", range(4))
@pytest.mark.parametrize("other_kind", ["preempt", "main"])
def test_two_channels_bringing_the_same_pages_at_once_place_each_once(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed], other_kind: str,
    attempt: int,
) -> None:
    """The bulk stream and the preempt channel receive the same 16 host pages at the same time
    (two receiver threads): every page is placed by exactly one of them, whole. Both claim a
    page at its first record, and the preempt channel takes over a page the bulk stream is
    writing: the interleavings differ from run to run (``attempt``)."""
    n = 16
    b = prefilled(make_block, n)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    pages = [host_page(20 + attempt * n + i) for i in range(n)]
    data = encode([r for i, p in enumerate(pages) for r in records(i * PAGE_2M, list(p))])
    receive_on_two_channels(path, data, other_kind, feeds)
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (n, n)
    assert read(b, 0, n * PAGE_2M) == b"".join(b"".join(p) for p in pages)


def test_closing_the_block_gives_its_huge_pages_back_while_the_path_lives_on() -> None:
    """The second mapping belongs to the block: a destination's path, kept for its counters
    after the migration, does not hold the guest's huge pages (a bench ran out of them)."""
    before = free_hugepages(PAGE_2M)
    b = RamBlock("pc.ram", 8 * PAGE_2M, PAGE_2M, "hugetlbfs")
    b.prefill()
    path = dp.DestinationPath([b])
    assert path.minor == (True,)
    assert free_hugepages(PAGE_2M) == before - 8
    b.close()
    assert free_hugepages(PAGE_2M) == before
    assert path.counters().host_pages_placed == 0


def mixed_host_page(seed: int) -> list[bytes | None]:
    """A huge page as a guest has them: data, with a ZERO record every third target page."""
    return [None if i % 3 == 2 else page(seed * NTP + i) for i in range(NTP)]


def expected(bodies: list[bytes | None]) -> bytes:
    return b"".join(body if body is not None else bytes(PAGE) for body in bodies)


def test_the_preempt_channel_writes_a_requested_page_as_its_records_arrive(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """A faulting thread waits for the last record of its huge page, not for a copy of the whole
    page after it: the records' bytes are in the page (through the second mapping) while the rest
    is still on its way, and the guest sees the page only once it is whole."""
    b = prefilled(make_block, 2)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    bodies = mixed_host_page(40)
    recs = records(PAGE_2M, bodies)
    head = len(encode(recs[:100], eos=False))
    feed = feeds(encode(recs), chunks=[head], pause=2.0)
    t = threading.Thread(target=receive, args=(path, feed))
    t.start()
    try:
        alias = b.alias()
        first, beyond = PAGE_2M + 0 * PAGE, PAGE_2M + 200 * PAGE
        deadline = time.monotonic() + 1.5
        while ctypes.string_at(alias + first, PAGE) != bodies[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        # during the feed's pause: the first records are written, a later one is not, nothing is placed
        assert ctypes.string_at(alias + first, PAGE) == bodies[0]
        assert ctypes.string_at(alias + PAGE_2M + 97 * PAGE, PAGE) == bodies[97]
        assert ctypes.string_at(alias + beyond, PAGE) == bytes(PAGE)
        assert path.received[0].count() == 0
    finally:
        t.join(30)      # (the feed ends after its pause) the receiver never outlives the block's fixtures
    assert not t.is_alive()
    assert path.counters().host_pages_placed == 1
    assert read(b, PAGE_2M, PAGE_2M) == expected(bodies)


def test_the_bulk_stream_receives_a_huge_page_that_is_all_here_straight_into_place(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """The bulk stream claims a huge page at its first record and its records go from the socket
    into the page's own bytes (no temp page, no copy), then it is mapped. The first page's first
    records came into the receive buffer with the section's header: those are copied from there
    into place, the rest are received there."""
    b = prefilled(make_block, 2)
    path = dp.DestinationPath([b], verify=True)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    pages = [host_page(70), host_page(71)]
    main = Channel("main", feeds)
    feed = main.feed(encode(records(0, pages[0]) + records(PAGE_2M, pages[1])))
    feed.thread.join(10)
    assert not feed.thread.is_alive()       # all of it waits in the socket
    rx = dp.Receiver(path, feed.ours, dp.RX_MAIN, Channel.SECTION)
    assert rx.run() == dp.Receiver.EOF
    assert NTP < rx._rx.c.pages_in_place < 2 * NTP
    assert path.counters().host_pages_placed == 2
    assert read(b, 0, 2 * PAGE_2M) == b"".join(expected(p) for p in pages)
    check_hashes(path, 0, b, range(2 * NTP))


def test_a_requested_copy_takes_over_the_page_the_bulk_stream_is_writing(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """The bulk stream claimed a huge page at its first record and wrote part of it in place, then
    its sender paused (the source does, inside a huge page, while urgent pages go). The copy a
    fault asked for on the preempt channel takes the page over and places it at once; the bulk
    stream's rest is dropped and never lands in the page, which the guest writes meanwhile."""
    b = prefilled(make_block, 1)
    path = dp.DestinationPath([b], verify=True)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    bodies = host_page(80)
    recs = records(0, bodies)
    main = Channel("main", lambda data, chunks, **kw: feeds(data, chunks, pause=2.0, **kw))
    feed = main.feed(encode(recs), chunks=[len(encode(recs[:100], eos=False))])
    t = threading.Thread(target=main.receive, args=(path, feed))
    t.start()
    try:
        alias = b.alias()
        deadline = time.monotonic() + 1.5
        while ctypes.string_at(alias + 99 * PAGE, PAGE) != bodies[99] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctypes.string_at(alias + 99 * PAGE, PAGE) == bodies[99]      # written in place, not placed
        assert path.received[0].count() == 0
        receive(path, feeds(encode(recs)))
        assert (path.counters().host_pages_placed, path.counters().taken_over) == (1, 1)
        assert read(b, 0, PAGE_2M) == expected(bodies)
        check_hashes(path, 0, b, range(NTP))
        mt.write_byte(b, 300 * PAGE + 5, bodies[300][5] ^ 0xFF)            # the guest runs on it
    finally:
        t.join(30)      # (the feed ends after its pause) the receiver never outlives the block's fixtures
    assert not t.is_alive()
    assert mt.read_byte(b, 300 * PAGE + 5) == bodies[300][5] ^ 0xFF
    c = path.counters()
    assert (c.host_pages_placed, c.eexist) == (1, 1)


@pytest.mark.parametrize("kind", ["preempt", "main"])
def test_huge_pages_that_follow_each_other_are_each_received_into_place(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed], kind: str
) -> None:
    """Host pages back to back, in small pieces (the bulk stream's way), and the guest reads every
    one whole. On the bulk stream each is begun from its first header, peeked in the socket when
    the last receive ended with the page before, and received straight into place; the preempt
    channel takes them through its buffer (see direct_plan)."""
    b = prefilled(make_block, 3)
    path = dp.DestinationPath([b], verify=True)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    pages = [mixed_host_page(60 + n) for n in range(3)]
    recs = [r for n, bodies in enumerate(pages) for r in records(n * PAGE_2M, bodies)]
    data = encode(recs)
    channel = Channel(kind, feeds)
    piece = 100 * (8 + PAGE)       # a receive that ends inside a page, another at a page's end
    rx = channel.receive(path, channel.feed(data, chunks=[piece] * (len(data) // piece)))
    assert (rx._rx.c.pages_direct > 0) == (kind == "main")
    assert path.counters().host_pages_placed == 3
    assert read(b, 0, 3 * PAGE_2M) == b"".join(expected(bodies) for bodies in pages)
    check_hashes(path, 0, b, range(3 * NTP))


def test_the_rest_of_a_claimed_page_is_received_straight_into_it_and_a_zero_record_stays_zero(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed]
) -> None:
    """Once the bulk stream's first records of a huge page have claimed it, the rest is received
    into the page's own bytes (no temp page, no copy). A ZERO record among them is not predicted:
    the stream's bytes that one receive put where it and the records after it go are taken back,
    and its part of the page reads zeros (a zero page is never written)."""
    b = prefilled(make_block, 2)
    path = dp.DestinationPath([b], verify=True)
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    zeros = {40, 41, 300, NTP - 1}
    bodies: list[bytes | None] = [None if i in zeros else page(9000 + i) for i in range(NTP)]
    recs = records(PAGE_2M, bodies)
    head = len(encode(recs[:3], eos=False)) + 100       # three records and part of the fourth's header
    main = Channel("main", feeds)
    rx = main.receive(path, main.feed(encode(recs), chunks=[head]))
    assert rx._rx.c.pages_direct > 0
    assert rx._rx.c.pages_in_place > 0
    assert path.counters().host_pages_placed == 1
    assert read(b, PAGE_2M, PAGE_2M) == expected(bodies)
    check_hashes(path, 0, b, range(NTP, 2 * NTP))


@pytest.mark.parametrize("kind", ["preempt", "main"])
def test_a_channel_that_ends_inside_a_page_gives_it_back_as_zeros(
    minor_uffd: Userfaultfd, make_block: Callable[..., RamBlock], feeds: Callable[..., Feed], kind: str
) -> None:
    """The link breaks in the middle of a huge page: half of it was written through the second
    mapping. The page is given back (a hole again, claimable): when the stream brings it again as
    a zero page, the guest reads zeros, not the half page of the broken link."""
    b = prefilled(make_block, 1)
    path = dp.DestinationPath([b])
    minor_uffd.register(b.addr, b.used_length, RegisterMode.MISSING | RegisterMode.MINOR)
    path.attach_uffd(minor_uffd.fileno())
    half = encode(records(0, list(host_page(50))[:NTP // 2]), eos=False)
    if kind == "main":
        half = bytes([SECTION_PART]) + struct.pack(">I", Channel.SECTION) + half
    rx = dp.Receiver(path, feeds(half, close=True).ours, dp.RX_PREEMPT if kind == "preempt" else dp.RX_MAIN,
                     Channel.SECTION)
    with pytest.raises(dp.DataPathError, match="middle of a host page"):
        rx.run()
    assert path.received[0].count() == 0
    main = Channel("main", feeds)
    main.receive(path, main.feed(encode(records(0, [None] * NTP))))
    c = path.counters()
    assert (c.host_pages_placed, c.zero_host_pages_placed, c.eexist) == (1, 1, 0)    # else: never placed
    assert read(b, 0, PAGE_2M) == bytes(PAGE_2M)
