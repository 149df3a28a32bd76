"""Page records for the receiver tests: QEMU's RAM record format encoded by hand, fed
into a socketpair by a thread in chosen chunks, and received on a chosen channel."""

from __future__ import annotations

import ctypes
import fcntl
import random
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from postcopy import _datapath as dp
from uffd import RamBlock
from uffd._native import ffi, lib

PAGE = 4096
FLAG_ZERO, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x08, 0x10, 0x20
SECTION_PART, SECTION_FOOTER = 0x02, 0x7E

Record = tuple[str, int, bytes | None]  # (block idstr, offset, body or None for a ZERO record)


def encode(records: Sequence[Record], *, eos: bool = True) -> bytes:
    """QEMU's RAM record format, CONTINUE whenever the block is the previous one's."""
    out = bytearray()
    last = None
    for idstr, off, body in records:
        flags = FLAG_PAGE if body is not None else FLAG_ZERO
        if idstr == last:
            flags |= FLAG_CONTINUE
        out += struct.pack(">Q", off | flags)
        if idstr != last:
            out += bytes([len(idstr)]) + idstr.encode()
            last = idstr
        out += body if body is not None else b"\0"
    if eos:
        out += struct.pack(">Q", FLAG_EOS)
    return bytes(out)


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE)


def read(block: RamBlock, off: int, n: int) -> bytes:
    return ctypes.string_at(block.addr + off, n)


class Feed:
    """Writes data into a socketpair in the given chunk sizes (then the rest)."""

    def __init__(self, data: bytes, chunks: Sequence[int] = (), pause: float = 0.002, close: bool = False) -> None:
        self.ours, self.theirs = socket.socketpair()
        for s in (self.ours, self.theirs):  # room for a whole small stream before the receiver starts
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._data, self._chunks, self._pause, self._close = data, chunks, pause, close
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos = 0
        try:
            for n in self._chunks:
                self.theirs.sendall(self._data[pos:pos + n])
                pos += n
                self._drained()  # the receiver's receive got this chunk and no more
                time.sleep(self._pause)
            self.theirs.sendall(self._data[pos:])
            if self._close:
                self.theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver stopped at an error and its socket was closed

    def _drained(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            queued = struct.unpack("i", fcntl.ioctl(self.theirs, termios.TIOCOUTQ, b"\0" * 4))[0]
            if not queued:
                return
            time.sleep(0.0005)

    def close(self) -> None:
        self.ours.close()  # a writer still blocked (the receiver stopped early) gets EPIPE
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.theirs.close()


def receive(path: dp.DestinationPath, feed: Feed, kind: int = dp.RX_PREEMPT, section: int = 0,
            placer: bool | None = None) -> dp.Receiver:
    """A receiver whose buffer is a big guest's (PC_RX_BUF_MAX): a stream that waits whole in the
    socket is one receive into the buffer, whatever the size of these tests' small blocks.
    ``placer``: its runs go to a placer thread or not (None: the default for this host)."""
    rx = dp.Receiver(path, feed.ours, kind, section)
    if placer is not None:
        rx.placer = placer
    assert lib.pc_sockbuf_grow(ffi.addressof(rx._rx, "in"), lib.PC_RX_BUF_MAX) == 0
    code = rx.run()
    assert code == (dp.Receiver.EOS if kind == dp.RX_PREEMPT else dp.Receiver.EOF)
    return rx


class Channel:
    """The channel the records arrive on: preempt (records, EOS) or main (a RAM
    section around them, then EOF); "main" places runs on its receiving thread,
    "main+placer" on a placer thread (the default with 4 CPUs or more)."""

    SECTION = 7

    def __init__(self, kind: str, feeds: Callable[..., Feed]) -> None:
        self.kind = kind
        self._feeds = feeds

    @property
    def placer(self) -> bool:
        return self.kind == "main+placer"

    def feed(self, data: bytes, chunks: Sequence[int] = ()) -> Feed:
        if self.kind == "preempt":
            return self._feeds(data, chunks)
        head = bytes([SECTION_PART]) + struct.pack(">I", self.SECTION)
        tail = bytes([SECTION_FOOTER]) + struct.pack(">I", self.SECTION)
        chunks = [chunks[0] + len(head), *chunks[1:]] if chunks else []
        return self._feeds(head + data + tail, chunks, close=True)

    def receive(self, path: dp.DestinationPath, feed: Feed) -> dp.Receiver:
        if self.kind == "preempt":
            return receive(path, feed)
        return receive(path, feed, dp.RX_MAIN, self.SECTION, self.placer)


def receive_on_two_channels(path: dp.DestinationPath, data: bytes, other_kind: str,
                            feeds: Callable[..., Feed]) -> None:
    """The same stream received at once by a preempt channel and a channel of ``other_kind``
    (two receiver threads), as when the bulk stream and a request bring the same pages."""
    other_chan = Channel(other_kind, feeds)
    feed_a, feed_b = feeds(data), other_chan.feed(data)
    other = threading.Thread(target=other_chan.receive, args=(path, feed_b))
    other.start()
    receive(path, feed_a)
    other.join(30)
    assert not other.is_alive()


def check_hashes(path: dp.DestinationPath, i: int, block: RamBlock, pages: Iterable[int]) -> None:
    """--verify: the hash recorded at placement is the hash of the page as it is now."""
    placed = path.placed_hashes(i)
    out = ffi.new("uint64_t[]", 1)
    for p in pages:
        lib.pc_hash_pages(block.addr + p * PAGE, 1, out)
        assert placed[8 * p:8 * p + 8] == bytes(ffi.buffer(out)), f"hash of page {p}"
