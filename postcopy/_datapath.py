"""The C data path of both roles (uffd/csrc/dest.c, source.c), wrapped.

This is the only module of ``postcopy`` that reaches those C objects. Every
call here runs with the GIL released (cffi); the long-running ones
(``Receiver.run``, ``DestinationPath.serve_faults``, ``SourcePath.run_bulk``,
``SourcePath.serve_return_path``) block in C and belong on their own threads.
A C object must outlive every thread inside it: the roles join their threads
before dropping these wrappers.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from uffd import Bitmap, RamBlock
from uffd._native import ffi, lib

from .wire import DEFAULT_TARGET_PAGE_SIZE as TARGET_PAGE_SIZE
from .wire import NEED_DATA

__all__ = [
    "TARGET_PAGE_SIZE",
    "DataPathError",
    "DestinationPath",
    "Receiver",
    "RemoteBlock",
    "RemoteRegion",
    "SockBuf",
    "SourcePath",
    "decoded_items",
]


RX_MAIN = lib.PC_RX_MAIN
RX_PREEMPT = lib.PC_RX_PREEMPT
CHAN_MAIN = lib.PC_CHAN_MAIN
CHAN_PREEMPT = lib.PC_CHAN_PREEMPT


def _deadline_ns(seconds: float) -> int:
    """``seconds`` from now on time.monotonic_ns's clock (pc_now_ns's), 0 for none."""
    return time.monotonic_ns() + int(seconds * 1e9) if seconds > 0 else 0


class SockBuf:
    """A C receive buffer (``pc_sockbuf``) seen from Python: the exact bytes of
    control messages, while the C loops parse everything else in place."""

    def __init__(self, sb: Any, owner: object, what: str) -> None:
        self._sb = sb
        self._owner = owner     # keeps the C object holding the buffer alive
        self._what = what

    def available(self) -> int:
        return int(self._sb.tail - self._sb.head)

    def peek(self, start: int = 0, limit: int | None = None) -> bytes:
        """The buffered bytes from ``start`` (at most ``limit`` of them)."""
        sb = self._sb
        n = sb.tail - sb.head - start
        return bytes(ffi.buffer(sb.buf + sb.head + start, n if limit is None else min(n, limit)))

    def first_byte(self) -> int | None:
        """The next unread byte, or None when nothing is buffered (no copy, no wait)."""
        sb = self._sb
        return int(sb.buf[sb.head]) if sb.tail > sb.head else None

    def spin_for(self, seconds: float) -> None:
        """For ``seconds`` from now, receives wait for data on the CPU, not asleep (0: stop now).
        For the few ms of a switch: each wake-up from sleep there is downtime."""
        lib.pc_sockbuf_spin_until(self._sb, _deadline_ns(seconds))

    def small_reads_for(self, seconds: float) -> None:
        """For ``seconds`` from now, receives read only the bytes asked for (0: stop now). TCP gives
        a receive the arrival time of the last segment it read: for a message whose arrival counts
        (PONG 3, the downtime's end), not the time of one that came in behind it."""
        lib.pc_sockbuf_small_reads_until(self._sb, _deadline_ns(seconds))

    def fill(self, n: int) -> int:
        """Wait until n bytes are buffered: how many are, or 0 at EOF before that."""
        rc = int(lib.pc_sockbuf_fill(self._sb, n))
        if rc < 0:
            raise ConnectionError(-rc, f"{self._what} receive failed")
        return rc

    def consume(self, n: int) -> None:
        lib.pc_sockbuf_consume(self._sb, n)

    @property
    def received(self) -> int:
        return int(self._sb.bytes)


#: The most :func:`decoded_items` hands the decoder at a time: at the switch the C buffer
#: holds megabytes of pages behind the last control item, which Python must not copy.
DECODE_CHUNK = 64 * 1024


def decoded_items(buf: SockBuf, dec: Any) -> Iterator[Any]:
    """Events of a sans-IO decoder fed from ``buf``, each consuming exactly its
    bytes: whatever follows the last event taken stays in the C buffer, for
    the C loop to go on from there. The decoder gets the buffered bytes in
    chunks of at most :data:`DECODE_CHUNK`, as it needs them."""
    fed = 0
    last = dec.offset
    while True:
        event = dec.next_event()
        if event is NEED_DATA:
            if buf.available() <= fed and buf.fill(fed + 1) == 0:
                dec.receive_data(b"")
                continue
            chunk = buf.peek(fed, DECODE_CHUNK)
            dec.receive_data(chunk)
            fed += len(chunk)
            continue
        used = dec.offset - last
        last = dec.offset
        buf.consume(used)
        fed -= used
        yield event


class DataPathError(Exception):
    """The C data path reported an error; ``kind`` is a short stable label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _npages(block: RamBlock) -> int:
    return block.used_length // TARGET_PAGE_SIZE


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """Bytes [block_offset, block_offset + size) of a block live at ``base`` in another process."""

    base: int
    size: int
    block_offset: int


class RemoteBlock(RamBlock):
    """A RAM block that lives in another process, behind that process's
    userfaultfd ``uffd``, at the addresses ``regions`` give (Firecracker's
    GuestRegionUffdMapping: parts of one memory file at unrelated addresses).

    The destination data path places its pages with UFFDIO_COPY/ZEROPAGE
    through ``uffd`` (which acts on the mm of the process that created it) and
    reads that process's faults from it; this process never maps, reads or
    writes the memory. ``addr`` is a placeholder, never dereferenced.
    """

    def __init__(self, idstr: str, used_length: int, page_size: int, uffd: int,
                 regions: Sequence[RemoteRegion], placeholder_addr: int) -> None:
        # not RamBlock.__init__: there is nothing to map here
        self.idstr = idstr
        self.used_length = used_length
        self.page_size = page_size
        self.backing = "anon" if page_size == TARGET_PAGE_SIZE else "hugetlbfs"
        self.fd = None
        self.addr = placeholder_addr
        self.uffd = uffd
        self.regions = tuple(regions)

    def discard(self, offset: int, length: int) -> None:
        """Nothing to do: DestinationPath.discard refuses ranges with placed pages (they
        cannot be zapped through a userfaultfd) and the rest holds nothing yet."""

    def view(self) -> memoryview:
        raise OSError(95, f"block {self.idstr} lives in another process")

    def close(self) -> None:
        self.addr = 0

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<RemoteBlock {self.idstr!r} {self.used_length:#x} bytes in {len(self.regions)} region(s), uffd {self.uffd}>"


@dataclass(frozen=True, slots=True)
class DestinationCounters:
    faults: int
    faults_dropped: int
    faults_outside: int
    requests_sent: int
    requests_failed: int
    host_pages_placed: int
    zero_host_pages_placed: int
    eexist: int
    blocktime_ns: int
    vcpu_blocktime_ns: tuple[int, ...]
    waiting: int
    removes: int = 0
    """Remote memory: UFFD_EVENT_REMOVE/UNMAP events read, pages they covered, faults
    served with a zero page there, host pages no region maps (skipped)."""
    removed_pages: int = 0
    zero_faults: int = 0
    unmapped_host_pages: int = 0
    taken_over: int = 0
    """Huge pages the preempt channel took over from the bulk stream (it was writing them in place)."""


class DestinationPath:
    """RAM blocks as the destination sees them, in the stream's setup order."""

    def __init__(self, blocks: Sequence[RamBlock], *, verify: bool = False) -> None:
        self.blocks = tuple(blocks)
        self.received = [Bitmap(_npages(b)) for b in self.blocks]
        self.requested = [Bitmap(_npages(b)) for b in self.blocks]
        self.hashes = [ffi.new("uint64_t[]", _npages(b)) if verify else ffi.NULL for b in self.blocks]
        self._nvcpus = 0
        self._d = ffi.gc(lib.pc_dst_new(len(self.blocks)), lib.pc_dst_free)
        if self._d == ffi.NULL:
            raise MemoryError("pc_dst_new")
        for i, b in enumerate(self.blocks):
            idstr = b.idstr.encode()
            rc = lib.pc_dst_set_block(
                self._d, i, idstr, len(idstr), b.addr, b.used_length, b.page_size,
                int(b.page_size == TARGET_PAGE_SIZE),  # hugetlbfs has no UFFDIO_ZEROPAGE
                self.received[i].cdata, self.requested[i].cdata, self.hashes[i],
            )
            if rc < 0:
                raise ValueError(f"block {b.idstr}: rejected by the data path ({rc})")
        if lib.pc_dst_finish_setup(self._d) < 0:
            raise ValueError("RAM blocks overlap")
        #: the blocks are another process's memory (RemoteBlock): placed and faulted through its uffd
        self.remote = any(isinstance(b, RemoteBlock) for b in self.blocks)
        if self.remote:
            self._set_remote()
        #: per block: registered MISSING|MINOR, its pages written through a second mapping and
        #: mapped with UFFDIO_CONTINUE (a prefilled hugetlbfs or memfd block, see RamBlock.prefill)
        self.minor = tuple(self._set_alias(i, b) for i, b in enumerate(self.blocks))

    def _set_alias(self, index: int, block: RamBlock) -> bool:
        if self.remote or not block.prefilled or block.fd is None:
            return False
        # the block's own second mapping: it goes with the block (close), as the guest's does
        rc = lib.pc_dst_set_alias(self._d, index, block.alias(), block.fd)
        if rc < 0:
            raise OSError(-rc, f"RAM block {block.idstr!r} cannot take its pages through a second mapping")
        return True

    def _set_remote(self) -> None:
        remote = [b for b in self.blocks if isinstance(b, RemoteBlock)]
        if len(remote) != len(self.blocks) or len({b.uffd for b in remote}) != 1:
            raise ValueError("remote RAM blocks must all live behind one userfaultfd, with no local block besides")
        regions = [(r.base, r.size, r.block_offset, b.page_size, i)
                   for i, b in enumerate(remote) for r in b.regions]
        arr = ffi.new("pc_dst_region[]", len(regions))
        for k, region in enumerate(regions):
            arr[k] = region
        if lib.pc_dst_set_remote(self._d, remote[0].uffd, arr, len(regions)) < 0:
            raise ValueError(f"regions {regions} do not fit the blocks "
                             f"{[(b.idstr, b.used_length, b.page_size) for b in remote]}: each must lie inside its "
                             "block, at multiples of its page size, without overlapping another")

    def index(self, idstr: str) -> int:
        for i, b in enumerate(self.blocks):
            if b.idstr == idstr:
                return i
        raise KeyError(idstr)

    def attach_uffd(self, fd: int) -> None:
        lib.pc_dst_set_uffd(self._d, fd)

    def listen(self, uffd_fd: int, go_fd: int = -1) -> None:
        """LISTEN in one C call: every block registered with the userfaultfd (MISSING, and MINOR
        where :attr:`minor`), the fd attached, then a byte written to ``go_fd`` (the fault
        service's release). In Python, with the flag enums, it took 150 us of the downtime."""
        bad = ffi.new("uint32_t *")
        rc = lib.pc_dst_listen(self._d, uffd_fd, go_fd, bad)
        if rc < 0:
            what = (f"registering RAM block {self.blocks[bad[0]].idstr!r}" if bad[0] < len(self.blocks)
                    else "releasing the fault service")
            raise OSError(-rc, f"LISTEN: {what}: {os.strerror(-rc)}")

    def set_vcpu_threads(self, tids: Sequence[int]) -> None:
        arr = ffi.new("uint32_t[]", list(tids) or [0])
        lib.pc_dst_set_vcpus(self._d, arr, len(tids))
        self._nvcpus = min(len(tids), lib.PC_DST_MAX_VCPUS)

    def set_return_path(self, sock: socket.socket | None) -> None:
        """Attach the return path (None pauses it: requests stay outstanding)."""
        lib.pc_dst_set_rp(self._d, sock.fileno() if sock is not None else -1)

    def set_request_channel(self, sock: socket.socket | None) -> None:
        """Send page requests for 4 KiB pages on ``sock``'s way back (the preempt channel of a
        source that reads them there), or on the return path again (None); a huge page's stay on
        the return path (the preempt channel is busy with urgent huge pages then, and the bulk
        stream stands aside for them). Set it back before ``sock`` closes; a new return path
        sets it back too."""
        lib.pc_dst_set_request_channel(self._d, sock.fileno() if sock is not None else -1)

    def send(self, message: bytes) -> None:
        """Write one whole return-path message (shares a lock with the fault service)."""
        rc = lib.pc_dst_rp_write(self._d, message, len(message))
        if rc < 0:
            raise ConnectionError(-rc, "return path write failed")

    def resend_requests(self) -> int:
        rc = lib.pc_dst_resend_requests(self._d)
        if rc < 0:
            raise ConnectionError(-rc, "return path write failed")
        return int(rc)

    def discard(self, index: int, offset: int, length: int) -> None:
        if self.remote:
            # Pages not placed yet need nothing; a placed page cannot be taken back out of
            # another process's memory (nothing zaps it through a userfaultfd).
            first = offset // TARGET_PAGE_SIZE
            hit = self.received[index].find_next_set(first)
            if hit < first + -(-length // TARGET_PAGE_SIZE) and hit < len(self.received[index]):
                raise OSError(95, f"discard {self.blocks[index].idstr} offset {hit * TARGET_PAGE_SIZE:#x}: the page "
                                  "is already placed in another process's memory and cannot be taken back")
            return
        if lib.pc_dst_discard(self._d, index, offset, length) < 0:
            b = self.blocks[index]
            raise ValueError(f"discard {b.idstr} offset {offset:#x} length {length:#x}: outside the block")

    def discard_ranges(self, index: int, ranges: Sequence[tuple[int, int]]) -> int:
        """All ranges of one discard command in one C call (no Python per range): each is missing
        again, and one with a placed page is dropped from memory (MADV_DONTNEED, or a punched
        hole for a file-backed block). Returns how many ranges held placed pages."""
        if self.remote:
            for start, length in ranges:
                self.discard(index, start, length)
            return 0
        if not ranges:
            return 0
        flat = ffi.new("uint64_t[]", [x for r in ranges for x in r])
        bad = ffi.new("uint32_t *")
        fd = getattr(self.blocks[index], "fd", None)
        rc = int(lib.pc_dst_discard_ranges(self._d, index, flat, len(ranges), -1 if fd is None else fd, bad))
        if rc >= 0:
            return rc
        b = self.blocks[index]
        start, length = ranges[bad[0]] if 0 <= bad[0] < len(ranges) else (0, 0)
        if rc == -errno.ERANGE:
            raise ValueError(f"discard {b.idstr} offset {start:#x} length {length:#x}: outside the block")
        raise OSError(-rc, f"dropping the discarded pages of {b.idstr} offset {start:#x} length {length}: "
                           f"{os.strerror(-rc)}")

    def serve_faults(self, stop_fd: int, go_fd: int = -1) -> int:
        """The fault loop (blocks until stop_fd is readable). ``go_fd``: it first waits, in C,
        until that fd is readable (or stop_fd is: then it returns 0 without serving)."""
        return int(lib.pc_fault_service_run(self._d, stop_fd, go_fd))

    def drain_latencies_ns(self, kind: str = "fault") -> list[int]:
        """Samples since the last drain: "fault" (fault -> placed), "request"
        (fault -> request written), "reply" (request written -> page placed)."""
        code = {"fault": lib.PC_LAT_FAULT, "request": lib.PC_LAT_REQUEST, "reply": lib.PC_LAT_REPLY}[kind]
        out: list[int] = []
        buf = ffi.new("uint64_t[]", 4096)
        while n := lib.pc_dst_drain_latency(self._d, code, buf, 4096):
            out.extend(buf[0:n])
        return out

    def counters(self) -> DestinationCounters:
        c = ffi.new("pc_dst_counters *")
        bt = ffi.new("uint64_t *")
        vb = ffi.new("uint64_t[]", lib.PC_DST_MAX_VCPUS)
        nw = ffi.new("uint32_t *")
        lib.pc_dst_snapshot(self._d, c, bt, vb, nw)
        nv = self._nvcpus
        return DestinationCounters(
            c.faults, c.faults_dropped, c.faults_outside, c.requests_sent, c.requests_failed,
            c.host_pages_placed, c.zero_host_pages_placed, c.eexist, bt[0], tuple(vb[0:nv]), nw[0],
            c.removes, c.removed_pages, c.zero_faults, c.unmapped_host_pages, c.taken_over,
        )

    def received_pages(self) -> int:
        return sum(b.count() for b in self.received)

    def total_pages(self) -> int:
        return sum(len(b) for b in self.received)

    def placed_hashes(self, index: int) -> bytes:
        if self.hashes[index] == ffi.NULL:
            raise ValueError("not verifying")
        return bytes(ffi.buffer(self.hashes[index], _npages(self.blocks[index]) * 8))



class Receiver:
    """One incoming channel: receive, scan, assemble, place (all in C)."""

    CONTROL = lib.PC_RX_CONTROL
    EOF = lib.PC_RX_EOF
    EOS = lib.PC_RX_EOS
    STOPPED = lib.PC_RX_STOPPED
    _ERRORS: ClassVar[dict[int, str]] = {
        lib.PC_RX_E_IO: "io",
        lib.PC_RX_E_PROTO: "protocol",
        lib.PC_RX_E_PLACE: "placement",
        lib.PC_RX_E_TRUNCATED: "truncated",
    }

    def __init__(self, path: DestinationPath | None, sock: socket.socket, kind: int, ram_section_id: int) -> None:
        self.path = path
        self.sock = sock
        d = path._d if path is not None else ffi.NULL
        self._rx = ffi.gc(lib.pc_rx_new(d, sock.fileno(), kind, ram_section_id), lib.pc_rx_free)
        if self._rx == ffi.NULL:
            raise MemoryError("pc_rx_new")
        #: the receive buffer, for Python's exact decoding of control items
        self.input = SockBuf(ffi.addressof(self._rx, "in"), self, "channel")

    @property
    def ram_section_id(self) -> int:
        return int(self._rx.ram_section_id)

    @ram_section_id.setter
    def ram_section_id(self, value: int) -> None:
        self._rx.ram_section_id = value

    @property
    def placer(self) -> bool:
        """Staged runs of 4 KiB pages go to a placer thread while this one receives on (the
        default with PC_RX_PLACER_MIN_CPUS CPUs or more to run on); else this thread places
        them. Set it before :meth:`run`."""
        return bool(self._rx.use_placer)

    @placer.setter
    def placer(self, on: bool) -> None:
        self._rx.use_placer = int(on)

    @property
    def linger(self) -> tuple[float, float]:
        """Seconds a receive that finds nothing waits for it on the CPU before it sleeps:
        always, and while a thread waits for a page. The main channel's bulk stream lingers
        always, the preempt channel while a page is waited for (PC_RX_BULK_LINGER_NS,
        PC_RX_WAITED_LINGER_NS: an idle virtual CPU wakes a sleeping receiver late). Set it
        before :meth:`run`."""
        return self._rx.linger_ns / 1e9, self._rx.waited_linger_ns / 1e9

    @linger.setter
    def linger(self, seconds: tuple[float, float]) -> None:
        lib.pc_rx_set_linger(self._rx, round(seconds[0] * 1e9), round(seconds[1] * 1e9))

    def attach(self, path: DestinationPath) -> None:
        """Place into ``path``'s blocks from now on (a receiver may start before the RAM setup)."""
        if lib.pc_rx_attach(self._rx, path._d) < 0:
            raise MemoryError("pc_rx_attach")
        self.path = path

    def run(self, nice: int | None = None) -> int:
        """Place pages until something needs Python; raises DataPathError on errors.
        ``nice``: the calling thread first takes that nice value, in C (not holding the GIL)."""
        rc = int(lib.pc_rx_run(self._rx) if nice is None else lib.pc_rx_run_niced(self._rx, nice))
        if rc < 0:
            raise DataPathError(self._ERRORS.get(rc, "other"), ffi.string(self._rx.err_msg).decode(errors="replace"))
        return rc

    def run_after(self, go_fd: int) -> int:
        """:meth:`run` once ``go_fd`` is readable (or the channel hangs up), waiting in C."""
        rc = int(lib.pc_rx_run_after(self._rx, go_fd))
        if rc < 0:
            raise DataPathError(self._ERRORS.get(rc, "other"), ffi.string(self._rx.err_msg).decode(errors="replace"))
        return rc

    def stop(self) -> None:
        lib.pc_rx_stop(self._rx)

    def place(self, records: bytes, buffer: bytes) -> None:
        n = len(records) // ffi.sizeof("pc_ram_record")
        recs = ffi.from_buffer("pc_ram_record[]", records)
        rc = lib.pc_rx_place_records(self._rx, recs, n, ffi.from_buffer(buffer))
        if rc < 0:
            raise DataPathError(self._ERRORS.get(rc, "other"), ffi.string(self._rx.err_msg).decode(errors="replace"))


    def counters(self) -> tuple[int, int, int]:
        c = self._rx.c
        return int(c.pages_normal), int(c.pages_zero), self.input.received


class SourcePath:
    """RAM blocks as the source sees them, with their dirty bitmaps."""

    DONE = lib.PC_TX_DONE
    STOPPED = lib.PC_TX_STOPPED
    RP_CONTROL = lib.PC_RP_CONTROL
    RP_EOF = lib.PC_RP_EOF
    RP_STOPPED = lib.PC_RP_STOPPED
    RP_BAD_REQUEST = lib.PC_RP_BAD_REQUEST

    def __init__(self, blocks: Sequence[RamBlock], ram_section_id: int) -> None:
        self.blocks = tuple(blocks)
        self.dirty = [Bitmap(_npages(b)) for b in self.blocks]
        self._s = ffi.gc(lib.pc_src_new(len(self.blocks), ram_section_id), lib.pc_src_free)
        if self._s == ffi.NULL:
            raise MemoryError("pc_src_new")
        for i, b in enumerate(self.blocks):
            idstr = b.idstr.encode()
            if lib.pc_src_set_block(self._s, i, idstr, len(idstr), b.addr, b.used_length, b.page_size,
                                    self.dirty[i].cdata) < 0:
                raise ValueError(f"block {b.idstr}: rejected by the data path")
        #: the return path's receive buffer (non-request messages are decoded in Python)
        self.rp = SockBuf(ffi.addressof(self._s, "rp"), self, "return path")

    def index(self, idstr: str) -> int:
        for i, b in enumerate(self.blocks):
            if b.idstr == idstr:
                return i
        raise KeyError(idstr)

    def set_heartbeat(self, seconds: float) -> None:
        lib.pc_src_set_heartbeat(self._s, int(seconds * 1e9))

    def heartbeat(self) -> tuple[int, int]:
        """(sequence number, monotonic ns) of the last heartbeat PING sent."""
        return int(self._s.ping_seq), int(self._s.ping_sent_ns)

    def reload_dirty(self, index: int, received_le: bytes) -> None:
        """Recovery: dirty = not received by the destination (its LE bitmap)."""
        rc = lib.pc_src_reload_dirty(self._s, index, received_le, len(received_le))
        if rc < 0:
            raise ValueError(f"received bitmap of {self.blocks[index].idstr}: wrong size or padding bits set")

    def mark_all_dirty(self) -> None:
        for bm in self.dirty:
            bm.set_range(0, len(bm))

    def canonicalize(self) -> None:
        lib.pc_src_canonicalize(self._s)

    def set_channel(self, channel: int, sock: socket.socket | None) -> None:
        lib.pc_src_set_channel(self._s, channel, sock.fileno() if sock is not None else -1)

    def set_return_path(self, sock: socket.socket) -> None:
        lib.pc_src_set_rp(self._s, sock.fileno())

    def configure(self, *, preempt: bool, bandwidth_cap: int = 0, section_bytes: int = 0) -> None:
        lib.pc_src_configure(self._s, int(preempt), bandwidth_cap, section_bytes)

    def set_send_once(self, once: bool) -> None:
        """Never send a host page twice (a QEMU destination fails on the second copy)."""
        lib.pc_src_set_send_once(self._s, int(once))

    def set_prefetch(self, max_window: int, min_window: int = 0) -> None:
        """Send ahead of sequential and strided request streams on the preempt channel, in windows
        of ``min_window`` up to ``max_window`` bytes (at least one host page; ``max_window`` 0: off).
        Before the return path runs."""
        lib.pc_src_set_prefetch(self._s, min_window, max_window)

    def set_hot(self, runs: array[int]) -> None:
        """The postcopy bulk stream sends these runs first, in order: flat (block, first, npages)
        triples of target pages (empty: none). Before the bulk stream runs."""
        if len(runs) % 3 or runs.itemsize != 8:
            raise ValueError("hot runs: an array('Q') of (block, first, npages) triples")
        buf = ffi.from_buffer("pc_src_range[]", runs) if runs else ffi.NULL
        rc = lib.pc_src_set_hot(self._s, buf, len(runs) // 3)
        if rc < 0:
            raise ValueError("hot runs: a run lies outside its block" if rc == -errno.ERANGE else f"hot runs: {rc}")

    def record_hot(self, on: bool) -> None:
        """Record the host pages requested or sent ahead, in the order of their first request."""
        if lib.pc_src_record_hot(self._s, int(on)) < 0:
            raise MemoryError("pc_src_record_hot")

    def hot_recorded(self) -> array[int]:
        """What was recorded: flat (block, first, npages) triples of target pages."""
        while True:
            n = lib.pc_src_hot_recorded(self._s, ffi.NULL, 0)
            out = array("Q", bytes(24 * n))
            got = lib.pc_src_hot_recorded(self._s, ffi.from_buffer("pc_src_range[]", out) if n else ffi.NULL, n)
            if got <= n:
                del out[3 * got:]
                return out

    def stop(self) -> None:
        lib.pc_src_stop(self._s)

    def restart(self) -> None:
        lib.pc_src_restart(self._s)

    def write(self, channel: int, data: bytes) -> None:
        rc = lib.pc_src_chan_write(self._s, channel, data, len(data))
        if rc < 0:
            raise ConnectionError(-rc, f"write on {'main' if channel == CHAN_MAIN else 'preempt'} channel failed")

    def finish(self, channel: int, data: bytes) -> None:
        """Write the channel's last bytes; nothing is written on it afterwards."""
        rc = lib.pc_src_chan_finish(self._s, channel, data, len(data))
        if rc < 0:
            raise ConnectionError(-rc, f"write on {'main' if channel == CHAN_MAIN else 'preempt'} channel failed")

    def run_bulk(self, nice: int | None = None) -> int:
        """The background stream; ``nice``: the calling thread first takes that nice value, in C
        (never holding the GIL at background priority)."""
        rc = int(lib.pc_src_bulk_run(self._s) if nice is None else lib.pc_src_bulk_run_niced(self._s, nice))
        if rc < 0:
            raise DataPathError("io", ffi.string(self._s.err_msg).decode(errors="replace"))
        return rc

    def dirty_pages(self) -> int:
        return int(lib.pc_src_dirty_pages(self._s))

    def set_round_mode(self, on: bool) -> None:
        """Precopy: the next :meth:`run_bulk` is one pass from the first page (on), or the
        postcopy stream that looks again until nothing is dirty (off)."""
        lib.pc_src_set_round_mode(self._s, int(on))

    def resume_round(self) -> None:
        """Precopy: the next :meth:`run_bulk` goes on where the ended pass stopped (a sync
        period cut it) and returns DONE at the end of the pass."""
        lib.pc_src_resume_round(self._s)

    def end_round(self) -> None:
        """Cut the precopy pass in progress short (run_bulk returns STOPPED)."""
        lib.pc_src_end_round(self._s)

    def discard_runs(self) -> int:
        """The discard ranges the dirty pages would make now (runs not discarded before)."""
        return int(lib.pc_src_discard_runs(self._s))

    def coarsen_discards(self, max_ranges: int) -> int:
        """Guest stopped: when the pages to discard make more than ``max_ranges`` runs, widen
        them to aligned chunks (marked dirty: sent again); returns the chunk in target pages."""
        return int(lib.pc_src_coarsen_discards(self._s, max_ranges))

    def send_discards(self, *, before_stop: bool = False) -> int:
        """POSTCOPY_RAM_DISCARD on main for every run of dirty pages; returns the ranges.
        ``before_stop`` (guest running, no round after it): remember what was discarded (and
        discard only what was not before: the drain may discard again); the next call (guest
        stopped) discards only the pages dirty since."""
        flags = (lib.PC_SRC_DISCARD_REMEMBER | lib.PC_SRC_DISCARD_NEW_ONLY) if before_stop else lib.PC_SRC_DISCARD_NEW_ONLY
        rc = int(lib.pc_src_send_discards(self._s, flags))
        if rc < 0:
            raise ConnectionError(-rc, "write of the discards on the main channel failed")
        return rc

    def serve_return_path(self) -> int:
        """Serve page requests until a control message, EOF, a bad request or a stop."""
        rc = int(lib.pc_src_rp_run(self._s))
        if rc < 0:
            kind = "io" if rc == lib.PC_RP_E_IO else "protocol"
            raise DataPathError(kind, ffi.string(self._s.err_msg).decode(errors="replace"))
        return rc

    def last_error(self) -> str:
        return ffi.string(self._s.err_msg).decode(errors="replace")

    @property
    def rp_control_ns(self) -> int:
        """CLOCK_MONOTONIC ns when the control message :meth:`serve_return_path` last returned
        for came in: the kernel's receive time of the recv that brought it (SO_TIMESTAMPNS), so a
        PONG that came while this thread sent a requested page counts from its arrival."""
        return int(self._s.rp_control_ns)

    @property
    def preempt_requests_ended(self) -> bool:
        """This connection's preempt channel ended its way back (EOF or an error): page requests
        come on the return path alone from now on (see pc_src_rp_run)."""
        return bool(self._s.req_ended)

    def urgent_pending(self) -> bool:
        """Preempt: requested pages are being sent, or not yet taken in by the destination's
        TCP (the bulk stream stands aside between its batches, at most ``PAUSE_MAX_NS`` at a time)."""
        return bool(lib.pc_src_urgent_pending(self._s))

    #: the longest one pause of the bulk stream for urgent pages
    PAUSE_MAX_NS = lib.PC_SRC_PAUSE_MAX_NS

    def counters(self) -> dict[str, int]:
        s = self._s
        out = {name: int(getattr(s.c, name)) for name in (
            "requests", "request_pages_sent", "request_pages_skipped", "resent_target_pages", "requests_queued",
            "host_pages_sent", "hot_pages_sent", "hot_pages_recorded", "hot_pages_preempt",
            "bulk_pauses", "bulk_pause_ns", "bulk_pauses_capped", "requests_preempt")}
        pf = s.pf.c
        for name in ("hits", "misses", "windows", "pages_sent", "pages_used"):
            out[f"prefetch_{name}"] = int(getattr(pf, name))
        for ch, label in ((0, "main"), (1, "preempt")):
            out[f"{label}_pages_normal"] = int(s.chan[ch].pages_normal)
            out[f"{label}_pages_zero"] = int(s.chan[ch].pages_zero)
            out[f"{label}_bytes"] = int(s.chan[ch].bytes)
        return out


def hash_pages(block: RamBlock) -> bytes:
    """The per-target-page hashes of a block (the source's side of --verify)."""
    out = ffi.new("uint64_t[]", _npages(block))
    lib.pc_hash_pages(block.addr, _npages(block), out)
    return bytes(ffi.buffer(out))
