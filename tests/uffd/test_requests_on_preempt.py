"""Page requests on the preempt channel's way back. The return path is the main channel's
socket read backwards, and the bulk stream holds that socket's lock through each send (and
the destination's bulk receiver through each receive): a request read or written there waits
for it. Our source reads requests on the preempt channel too, and our destination sends them
there once told (PREEMPT_REQUESTS_PING, tests/session), for 4 KiB pages (a huge page's stays
on the return path). Each way names its own block; only requests may come the preempt way;
once that way closes, requests come on the return path.
Real TCP over loopback and socketpairs, a real userfaultfd and a faulting thread; C threads."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from postcopy import _datapath as dp
from postcopy._datapath import CHAN_MAIN, CHAN_PREEMPT, SourcePath
from postcopy.wire import RpMessage
from uffd import PAGE_2M, Feature, RamBlock, Userfaultfd
from uffd import memtouch as mt
from uffd.memtouch import write_byte

from .conftest import Toucher, drain, serving, tcp_pair, wait_until
from .records import encode, page, read

PAGE = 4096
PAGES = 64


def _request(sock: socket.socket, first: int, npages: int = 1, idstr: bytes | None = b"pc.ram") -> None:
    """REQ_PAGES_ID (naming ``idstr``) or REQ_PAGES (``idstr`` None: the way's last block)."""
    if idstr is None:
        sock.sendall(struct.pack(">HHQI", RpMessage.REQ_PAGES, 12, first * PAGE, npages * PAGE))
    else:
        body = struct.pack(">QIB", first * PAGE, npages * PAGE, len(idstr)) + idstr
        sock.sendall(struct.pack(">HH", RpMessage.REQ_PAGES_ID, len(body)) + body)


class _Source:
    """A SourcePath (every page dirty) with its return path (a socketpair), both channels over
    loopback (their readers drain them), and its return-path thread running (``preempt_later``:
    started before the preempt channel is set, as in a recovery)."""

    def __init__(self, blocks: list[RamBlock], preempt_later: bool = False) -> None:
        self.path = SourcePath(blocks, 2)
        for bm in self.path.dirty:
            bm.set_range(0, PAGES)
        self.path.configure(preempt=True)
        self.main_w, self.main_r = tcp_pair()
        self.pre_w, self.pre_r = tcp_pair()
        self.rp_src, self.rp_dst = socket.socketpair()
        self.path.set_channel(CHAN_MAIN, self.main_w)
        if not preempt_later:
            self.path.set_channel(CHAN_PREEMPT, self.pre_w)
        self.path.set_return_path(self.rp_src)
        self.pre_got = [0]
        self.readers = [threading.Thread(target=drain, args=(self.pre_r, self.pre_got), daemon=True),
                        threading.Thread(target=drain, args=(self.main_r, [0]), daemon=True)]
        for t in self.readers:
            t.start()
        self.codes: list[int] = []
        self.failed: dp.DataPathError | None = None
        self.rp = threading.Thread(target=self._serve, daemon=True)
        self.rp.start()

    def _serve(self) -> None:
        while True:
            try:
                code = self.path.serve_return_path()
            except dp.DataPathError as exc:
                self.failed = exc
                return
            self.codes.append(code)
            if code == SourcePath.RP_CONTROL:
                self.path.rp.consume(len(self.path.rp.peek()))
                continue
            if code != SourcePath.RP_BAD_REQUEST:
                return

    def close(self) -> None:
        self.path.stop()
        for s in (self.main_w, self.main_r, self.pre_w, self.pre_r, self.rp_src, self.rp_dst):
            with contextlib.suppress(OSError):     # (one the test shut already)
                s.shutdown(socket.SHUT_RDWR)
        # the readers see the shutdown's end before their sockets close (a recv on a closed
        # socket would raise in them)
        for t in [self.rp, *self.readers]:
            t.join(5.0)
            assert not t.is_alive()
        for s in (self.main_w, self.main_r, self.pre_w, self.pre_r, self.rp_src, self.rp_dst):
            s.close()


def _quiet(sock: socket.socket) -> bool:
    """Nothing to read on ``sock`` within 50 ms."""
    return not select.select([sock], [], [], 0.05)[0]


def _blocks(make: Callable[..., RamBlock]) -> list[RamBlock]:
    out = [make("pc.ram", PAGES * PAGE), make("other.ram", PAGES * PAGE)]
    for b in out:
        for p in range(PAGES):
            write_byte(b, p * PAGE, 0x5A)
    return out


def test_the_source_serves_requests_from_both_ways(make_block: Callable[..., RamBlock]) -> None:
    src = _Source(_blocks(make_block))
    path = src.path
    try:
        _request(src.pre_r, 3)                                   # the preempt channel's way back
        wait_until(lambda: path.counters()["request_pages_sent"] == 1, "the request read the preempt way")
        _request(src.rp_dst, 7)                                  # the return path, as ever
        wait_until(lambda: path.counters()["request_pages_sent"] == 2, "the request on the return path")
        c = path.counters()
        assert (c["requests"], c["requests_preempt"]) == (2, 1)
        wait_until(lambda: src.pre_got[0] >= 2 * PAGE, "both pages on the preempt channel")
        # each way names its own block: other.ram on the return path leaves the preempt way's pc.ram
        _request(src.rp_dst, 9, idstr=b"other.ram")
        _request(src.pre_r, 11, idstr=None)
        wait_until(lambda: path.counters()["request_pages_sent"] == 4, "both requests")
        assert not path.dirty[0].test(11)
        assert path.dirty[1].test(11)
        assert not path.dirty[1].test(9)
        assert path.dirty[0].test(9)
        # control messages still come on the return path (back to Python)
        src.rp_dst.sendall(struct.pack(">HHI", RpMessage.PONG, 4, 77))
        wait_until(lambda: SourcePath.RP_CONTROL in src.codes, "the PONG handed to Python")
        # the preempt way closes: requests still come on the return path
        src.pre_r.shutdown(socket.SHUT_WR)
        _request(src.rp_dst, 13)
        wait_until(lambda: path.counters()["request_pages_sent"] == 5, "a request after the preempt way closed")
        assert path.counters()["requests_preempt"] == 2
        assert src.rp.is_alive()
    finally:
        src.close()


def test_a_preempt_channel_set_after_the_return_path_started_is_read(make_block: Callable[..., RamBlock]) -> None:
    """A recovery starts the return path before its preempt channel connects: the return-path
    thread, waiting on the return path alone then, still finds the preempt channel once it is
    set, with nothing coming on the return path to wake it."""
    src = _Source(_blocks(make_block), preempt_later=True)
    try:
        time.sleep(0.05)        # the thread waits on the return path
        src.path.set_channel(CHAN_PREEMPT, src.pre_w)
        _request(src.pre_r, 3)
        wait_until(lambda: src.path.counters()["requests_preempt"] == 1, "the request read the preempt way", 5.0)
    finally:
        src.close()


def test_the_preempt_way_carries_requests_only(make_block: Callable[..., RamBlock]) -> None:
    src = _Source(_blocks(make_block))
    try:
        _request(src.pre_r, 2, idstr=None)          # REQ_PAGES before this way named a block
        wait_until(lambda: SourcePath.RP_BAD_REQUEST in src.codes, "the request refused")
        assert "before any REQ_PAGES_ID" in src.path.last_error()
        assert src.path.counters()["request_pages_sent"] == 0
        src.pre_r.sendall(struct.pack(">HHI", RpMessage.PONG, 4, 5))
        src.rp.join(5.0)
        assert src.failed is not None
        assert src.failed.kind == "protocol"
        assert "on the preempt channel" in str(src.failed)
    finally:
        src.close()


class _PreemptReceiver:
    """A preempt channel's receiver of ``path`` on its thread, over a socketpair: ``ours`` is the
    destination's end (what set_request_channel takes), ``theirs`` the source's."""

    def __init__(self, path: dp.DestinationPath) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.theirs.settimeout(5.0)
        self.rx = dp.Receiver(path, self.ours, dp.RX_PREEMPT, 0)
        self.codes: list[int] = []
        self.failed: dp.DataPathError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.codes.append(self.rx.run())
        except dp.DataPathError as exc:     # (a test that failed mid-page: its close cut the record)
            self.failed = exc

    def ended(self) -> list[int]:
        self.thread.join(5.0)
        assert self.failed is None, self.failed
        return self.codes

    def close(self) -> None:
        self.theirs.shutdown(socket.SHUT_RDWR)      # a receiver still running sees the end
        self.thread.join(5.0)
        assert not self.thread.is_alive()
        self.ours.close()
        self.theirs.close()


def _header(sock: socket.socket) -> tuple[int, int, int]:
    """A page request read off ``sock``: (type, first page, pages)."""
    kind, length = struct.unpack(">HH", sock.recv(4, socket.MSG_WAITALL))
    start, size = struct.unpack(">QI", sock.recv(length, socket.MSG_WAITALL)[:12])
    return kind, start // PAGE, size // PAGE


@contextlib.contextmanager
def _requests_on_preempt(block: RamBlock, make_uffd: Callable[..., Userfaultfd], pipes: Callable[[], tuple[int, int]],
                         ) -> Iterator[tuple[dp.DestinationPath, socket.socket, _PreemptReceiver]]:
    """``block``'s destination after LISTEN (its fault service on a thread), a preempt receiver,
    and page requests sent on that channel: (the path, the return path's far end, the receiver)."""
    path = dp.DestinationPath([block])
    uffd = make_uffd(Feature.THREAD_ID, user_mode_only=True)
    with serving(path, pipes) as (go, rp_far):
        path.listen(uffd.fileno(), go)
        pre = _PreemptReceiver(path)
        try:
            path.set_request_channel(pre.ours)
            yield path, rp_far, pre
        finally:
            pre.close()


def test_the_destination_sends_requests_on_the_request_channel(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    block = make_block("pc.ram", 16 * PAGE)
    with _requests_on_preempt(block, make_uffd, pipes) as (path, rp_far, pre):
        toucher = Toucher(mt.read_byte, block, 3 * PAGE)
        assert _header(pre.theirs) == (RpMessage.REQ_PAGES_ID, 3, 1)     # the first there names its block
        pre.theirs.sendall(encode([("pc.ram", 3 * PAGE, page(3))], eos=False))
        assert toucher.wait() == page(3)[0]
        toucher = Toucher(mt.read_byte, block, 4 * PAGE)
        assert _header(pre.theirs) == (RpMessage.REQ_PAGES, 4, 1)
        pre.theirs.sendall(encode([("pc.ram", 4 * PAGE, page(4))], eos=False))
        assert toucher.wait() == page(4)[0]
        assert _quiet(rp_far)                                   # nothing came on the return path
        # back on the return path (the preempt channel ended): it names its block there too
        path.set_request_channel(None)
        toucher = Toucher(mt.read_byte, block, 5 * PAGE)
        assert _header(rp_far) == (RpMessage.REQ_PAGES_ID, 5, 1)
        pre.theirs.sendall(encode([("pc.ram", 5 * PAGE, page(5))], eos=False))
        assert toucher.wait() == page(5)[0]
        # a new return path (a new connection) sets it back too, until told again
        path.set_request_channel(pre.ours)
        new_near, new_far = socket.socketpair()
        with new_near, new_far:
            new_far.settimeout(5.0)
            path.set_return_path(new_near)
            toucher = Toucher(mt.read_byte, block, 6 * PAGE)
            assert _header(new_far) == (RpMessage.REQ_PAGES_ID, 6, 1)
            pre.theirs.sendall(encode([("pc.ram", 6 * PAGE, page(6))], eos=True))
            assert toucher.wait() == page(6)[0]
            assert _quiet(pre.theirs)
        assert read(block, 3 * PAGE, 4 * PAGE) == page(3) + page(4) + page(5) + page(6)
        assert pre.ended() == [dp.Receiver.EOS]


@pytest.mark.hugetlb
def test_a_huge_pages_request_stays_on_the_return_path(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    """The preempt channel then carries megabytes of urgent pages (its receiver holding that
    socket through each read), while the bulk stream stands aside for them: main's socket is
    the quiet way for a huge page's request."""
    block = make_block("huge.ram", 2 * PAGE_2M, PAGE_2M, "hugetlbfs")
    with _requests_on_preempt(block, make_uffd, pipes) as (_, rp_far, pre):
        toucher = Toucher(mt.read_byte, block, PAGE_2M + 5 * PAGE)
        assert _header(rp_far) == (RpMessage.REQ_PAGES_ID, PAGE_2M // PAGE, PAGE_2M // PAGE)
        assert _quiet(pre.theirs)
        bodies = [page(100 + i) for i in range(PAGE_2M // PAGE)]
        pre.theirs.sendall(encode([("huge.ram", PAGE_2M + i * PAGE, b) for i, b in enumerate(bodies)]))
        assert toucher.wait() == bodies[5][0]
        assert pre.ended() == [dp.Receiver.EOS]
