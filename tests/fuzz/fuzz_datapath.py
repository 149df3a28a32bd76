#!/usr/bin/env python3
"""Sanitizer fuzz of the C data path and the decoders (issue 14).

Mutated QEMU 7.2 captures (tests/data/qemu-7.2) go through:

* ``decode``:   the sans-IO decoders with the C record scanner (main stream,
  recovery stream, preempt channel, return path), fed in random pieces. The
  only outcomes allowed are events or a RemoteProtocolError with a known kind.
* ``dest``:     the destination's C data path: a ``Receiver`` reading a
  socketpair, with a small shell that does what postcopy/destination.py does
  (RAM setup -> DestinationPath over real anonymous RAM blocks, precopy pages
  placed with ``Receiver.place``, discards, and after RUN / RESUME the C loop
  ``Receiver.run`` with control items decoded in Python). No userfaultfd is
  registered, so every page is written with a plain memcpy: the bounds checks
  of dest.c are all that keeps a write inside a block.
* ``preempt``:  a preempt-channel ``Receiver`` (pure C) over the same blocks.
* ``rp``:       the source's return-path server ``SourcePath.serve_return_path``
  with mutated return paths; page requests are served on a preempt channel,
  so a request that escaped the checks would read outside guest memory.

Every RAM block sits between PROT_NONE guard pages, so a write or read outside
a block faults (ASan reports the SEGV). Run it against the ASan/UBSan build of
the C core (``bash .ci/fuzz.sh`` builds it and runs this): any sanitizer report
aborts the process with a non-zero status; an invariant break makes this script
exit 1. Iterations are deterministic: iteration ``i`` of ``--seed S`` is always
the same input, and ``--status FILE`` keeps the current one there, so a crash
can be replayed with ``--first I --iterations 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import lzma
import mmap
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CAPS = ROOT / "tests" / "data" / "qemu-7.2"
MiB = 1 << 20
HUGE = 2 * MiB
MAX_TOTAL_RAM = 1 << 30        # mutated RAM setups asking for more are refused by this harness
REC_PAGE = 2                   # pc_ram_record.kind of a record with data (postcopy.wire._events)


class InvariantBroken(Exception):
    """An outcome that is neither events nor a clean protocol error."""


# ---------------------------------------------------------------- guarded memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000


class GuardedBlock:
    """An anonymous RAM block aligned to its host page size, between PROT_NONE guards
    (what DestinationPath / SourcePath read: idstr, addr, used_length, page_size, prefilled)."""

    prefilled = False

    def __init__(self, idstr: str, used_length: int, page_size: int) -> None:
        self.idstr = idstr
        self.used_length = used_length
        self.page_size = page_size
        mapped = -(-used_length // mmap.PAGESIZE) * mmap.PAGESIZE
        guard = max(page_size, 64 * 1024)
        self._total = mapped + 3 * guard
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        raw = _libc.mmap(None, self._total, 0, flags, -1, 0)
        if raw in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {self._total} bytes")
        self._raw = raw
        self.addr = (raw + guard + page_size - 1) // page_size * page_size
        if _libc.mprotect(self.addr, mapped, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def close(self) -> None:
        if self._raw:
            _libc.munmap(self._raw, self._total)
            self._raw = 0


class BlockCache:
    """Blocks of the layouts seen again and again, kept across iterations."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[str, int, int], GuardedBlock] = {}

    def get(self, layout: list[tuple[str, int, int]]) -> tuple[list[GuardedBlock], list[GuardedBlock]]:
        """(blocks, ones to close after the iteration)."""
        out, temp = [], []
        for key in layout:
            b = self._blocks.get(key)
            if b is None:
                b = GuardedBlock(*key)
                if len(self._blocks) < 64:
                    self._blocks[key] = b
                else:
                    temp.append(b)
            out.append(b)
        return out, temp


# ---------------------------------------------------------------- seeds and mutations

@dataclass
class Seed:
    name: str
    target: str                   # decode-main, decode-recovery, decode-preempt, decode-rp, dest, preempt, rp
    data: bytes
    marks: list[int] = field(default_factory=list)   # item and page-record boundaries
    recovery: bool = False


INTERESTING8 = (0x00, 0x01, 0x02, 0x04, 0x05, 0x07, 0x08, 0x10, 0x20, 0x7E, 0x7F, 0x80, 0xFE, 0xFF)
EXTREMES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
            0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 0x3FFFFFFFFFFFF000, 0x7FFFFFFFFFFFFFFF,
            0x8000000000000000, 0xFFFFFFFFFFFFF000, 0xFFFFFFFFFFFFFFFF)


def edge_values(lengths: list[int]) -> list[int]:
    """Offsets at and around the ends of the captures' RAM blocks: an off-by-one in a bounds
    check shows only with an offset right at a block's end."""
    out = set()
    for length in lengths:
        for delta in (-HUGE, -4096, 0, 4096, HUGE):
            if length + delta >= 0:
                out.add(length + delta)
    return sorted(out)


def mutate(rng: random.Random, seed: Seed, others: list[Seed], edges: list[int]) -> bytes:
    data = bytearray(seed.data)
    marks = seed.marks or [0]

    def pos() -> int:
        if rng.random() < 0.6:
            return min(len(data), rng.choice(marks) + rng.choice((0, 0, 0, 1, 2, 3, 4, 5, 7, 8, 9, 12)))
        return rng.randrange(len(data) + 1)

    for _ in range(1 + min(int(rng.expovariate(0.7)), 8)):
        op = rng.randrange(10)
        at = pos()
        if op == 0 and data:                                     # bit flip
            at = min(at, len(data) - 1)
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1 and data:                                   # interesting byte
            data[min(at, len(data) - 1)] = rng.choice(INTERESTING8)
        elif op == 2:                                            # insert random bytes
            data[at:at] = rng.randbytes(rng.choice((1, 1, 2, 4, 8, 13, 100)))
        elif op == 3:                                            # delete bytes
            del data[at : at + rng.choice((1, 1, 2, 4, 8, 9, 64, 4095, 4096, 4104))]
        elif op == 4:                                            # length / offset field set to an extreme
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(EXTREMES) & ((1 << (8 * width)) - 1)
            if rng.random() < 0.3:
                value = (value + rng.choice((-1, 1))) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "big")
        elif op == 5 and len(marks) > 2:                         # duplicate a run of items / records
            i = rng.randrange(len(marks) - 1)
            j = min(len(marks) - 1, i + rng.choice((1, 1, 2, 5)))
            data[at:at] = seed.data[marks[i] : marks[j]]
        elif op == 6 and len(marks) > 2:                         # drop a run of items / records
            i = rng.randrange(len(marks) - 1)
            j = min(len(marks) - 1, i + rng.choice((1, 1, 2)))
            if marks[j] <= len(data):
                del data[marks[i] : marks[j]]
        elif op == 7 and others:                                 # splice in items from another capture
            other = rng.choice(others)
            if len(other.marks) > 2:
                i = rng.randrange(len(other.marks) - 1)
                data[at:at] = other.data[other.marks[i] : other.marks[min(len(other.marks) - 1, i + 3)]]
        elif op == 8:                                            # truncate
            del data[at:]
        elif op == 9 and edges:                                  # an offset at a block's end
            # a page record's header (offset | flags) or a REQ_PAGES start (4 bytes in)
            at = min(rng.choice(marks) + rng.choice((0, 0, 4)), max(0, len(data) - 8))
            old = int.from_bytes(data[at : at + 8].ljust(8, b"\0"), "big")
            value = rng.choice(edges) | (old & 0xFFF if rng.random() < 0.7 else rng.choice((0x2, 0x8, 0x22, 0x28)))
            data[at : at + 8] = value.to_bytes(8, "big")
    return bytes(data)


# ---------------------------------------------------------------- the targets

@dataclass
class Ctx:
    """What the targets share: the modules (imported after the build check), the block cache, stats."""

    wire: Any
    dp: Any
    layout: Any
    blocks: BlockCache
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    target: str = ""

    def count(self, what: str) -> None:
        mine = self.outcomes.setdefault(self.target, {})
        mine[what] = mine.get(what, 0) + 1


def _feed(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    try:
        if rng.random() < 0.2:        # small writes: partial items at every receive
            i = 0
            while i < len(data):
                n = rng.choice((1, 7, 100, 4096, 65536))
                sock.sendall(data[i : i + n])
                i += n
        else:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass    # the reader gave up first


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


class _Pair:
    """A socketpair with a feeder thread writing ``data`` into one end."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.ours, self.theirs = socket.socketpair()
        # a stalled reader shows up as an io error, not a hang
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        own = random.Random(rng.getrandbits(64))    # the thread's draws must not race the caller's
        self.thread = threading.Thread(target=_feed, args=(self.theirs, data, own), daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        """Both ends shut (their readers see the end) and the feeder joined; nothing closed."""
        for s in (self.ours, self.theirs):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.thread.join()

    def close(self) -> None:
        self.shutdown()
        self.ours.close()
        self.theirs.close()


def _layout_key(ctx: Ctx, entries: Any, huge: bool) -> list[tuple[str, int, int]] | None:
    total = sum(e.used_length for e in entries)
    if not entries or len(entries) > 64 or total > MAX_TOTAL_RAM:
        return None
    return [(e.idstr, e.used_length,
             HUGE if huge and e.used_length % HUGE == 0 and e.used_length >= 16 * MiB else 4096) for e in entries]


def _seed_layout(ctx: Ctx, huge: bool) -> list[tuple[str, int, int]]:
    """The captures' own RAM blocks (recovery, preempt and return-path runs have no setup)."""
    key = _layout_key(ctx, ctx.layout.blocks, huge)
    assert key is not None
    return key


def _path(ctx: Ctx, key: list[tuple[str, int, int]], temp: list[Any]) -> Any:
    blocks, more = ctx.blocks.get(key)
    temp.extend(more)
    return ctx.dp.DestinationPath(blocks, verify=True)


def _protocol_error(ctx: Ctx, exc: Exception) -> None:
    wire = ctx.wire
    if isinstance(exc, wire.RemoteProtocolError):
        if exc.kind not in wire.ERROR_KINDS or not str(exc):
            raise InvariantBroken(f"protocol error with kind {exc.kind!r}: {exc}") from exc
        ctx.count(f"protocol:{exc.kind}")
    elif isinstance(exc, ctx.dp.DataPathError):
        if exc.kind not in ("protocol", "truncated"):
            raise InvariantBroken(f"data path error of kind {exc.kind!r}: {exc}") from exc
        ctx.count(f"datapath:{exc.kind}")
    else:
        raise InvariantBroken(f"{type(exc).__name__}: {exc}") from exc


def run_decoder(ctx: Ctx, seed: Seed, data: bytes, rng: random.Random) -> None:
    wire = ctx.wire
    if seed.target == "decode-main":
        dec = wire.MainStreamDecoder(block_page_sizes={"pc.ram": HUGE} if rng.random() < 0.05 else None)
    elif seed.target == "decode-recovery":
        dec = wire.MainStreamDecoder(recovery=True, layout=ctx.layout)
    elif seed.target == "decode-preempt":
        dec = wire.PreemptDecoder(layout=ctx.layout)
    else:
        dec = wire.ReturnPathDecoder(layout=ctx.layout)
    try:
        i = 0
        while i < len(data):
            n = rng.choice((1, 3, 64, 4096, 1 << 20))
            dec.receive_data(data[i : i + n])
            i += n
            while not isinstance(dec.next_event(), wire.NeedData):
                pass
        dec.receive_data(b"")
        for _ in range(100000):
            ev = dec.next_event()
            if isinstance(ev, wire.NeedData):
                raise InvariantBroken("decoder wants data after EOF")
            if isinstance(ev, wire.ConnectionClosed):
                ctx.count("closed")
                return
        raise InvariantBroken("decoder did not finish")
    except wire.RemoteProtocolError as exc:
        _protocol_error(ctx, exc)


def run_dest(ctx: Ctx, seed: Seed, data: bytes, rng: random.Random) -> None:
    """The destination's main channel, as postcopy/destination.py drives it."""
    wire, dp = ctx.wire, ctx.dp
    huge = rng.random() < 0.25
    pair = _Pair(data, rng)
    temp: list[Any] = []
    try:
        path = None
        section = 0
        if seed.recovery:
            path = _path(ctx, _seed_layout(ctx, huge), temp)
            section = ctx.layout.section_id
        rx = dp.Receiver(path, pair.ours, dp.RX_MAIN, section)
        # huge: pc.ram gets 2 MiB host pages in the C path only (the captures' setups say 4 KiB,
        # which a hint to the decoder would refuse): dest.c assembles host pages from the records
        dec = wire.MainStreamDecoder(recovery=seed.recovery, layout=ctx.layout if seed.recovery else None)
        ram_section = None
        pages = False
        for event in dp.decoded_items(rx.input, dec):
            match event:
                case wire.SectionStart(idstr="ram", section_id=sid):
                    ram_section = sid
                case wire.RamSetup(blocks=entries):
                    if path is not None:
                        ctx.count("refused:second-setup")
                        return
                    key = _layout_key(ctx, entries, huge)
                    if key is None:
                        ctx.count("refused:layout-too-big")
                        return
                    try:
                        path = _path(ctx, key, temp)
                    except ValueError:
                        ctx.count("refused:layout")
                        return
                    rx.attach(path)
                    rx.ram_section_id = ram_section or 0
                case wire.RamPages(records=records, buffer=buffer):
                    if path is None:
                        ctx.count("refused:pages-before-setup")
                        return
                    rx.place(bytes(records), bytes(buffer))
                case wire.PostcopyRamDiscard(idstr=idstr, ranges=ranges):
                    if path is None:
                        ctx.count("refused:discard-before-setup")
                        return
                    try:
                        index = path.index(idstr)
                        for start, length in ranges:
                            path.discard(index, start, length)
                    except (KeyError, ValueError):
                        ctx.count("refused:discard")
                        return
                case wire.RecvBitmapRequest(idstr=idstr) if path is not None:
                    try:
                        path.received[path.index(idstr)].to_le_bytes()
                    except KeyError:
                        ctx.count("refused:bitmap-request")
                        return
                case wire.Packaged(events=events) if any(isinstance(e, wire.PostcopyRun) for e in events):
                    pages = True
                case wire.PostcopyRun() | wire.PostcopyResume():
                    pages = True
                case wire.ConnectionClosed() | wire.EndOfStream():
                    ctx.count("stream-ended")
                    return
            if pages:
                break
        else:
            ctx.count("stream-ended")
            return
        if path is None:
            ctx.count("refused:run-before-setup")
            return
        while True:                     # _read_pages: C places pages, Python decodes the rest
            code = rx.run()
            if code != dp.Receiver.CONTROL:
                ctx.count(f"rx:{code}")
                return
            dec = wire.MainStreamDecoder(recovery=True, layout=wire.RamLayout(
                blocks=tuple(wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length,
                                                 host_page_size=b.page_size) for b in path.blocks),
                section_id=rx.ram_section_id))
            event = next(dp.decoded_items(rx.input, dec))
            if isinstance(event, wire.EndOfStream | wire.ConnectionClosed):
                ctx.count("postcopy-ended")
                return
    except (wire.RemoteProtocolError, dp.DataPathError) as exc:
        _protocol_error(ctx, exc)
    finally:
        pair.close()
        for b in temp:
            b.close()


def run_preempt(ctx: Ctx, seed: Seed, data: bytes, rng: random.Random) -> None:
    dp = ctx.dp
    huge = rng.random() < 0.25
    temp: list[Any] = []
    pair = _Pair(data, rng)
    try:
        rx = dp.Receiver(_path(ctx, _seed_layout(ctx, huge), temp), pair.ours, dp.RX_PREEMPT, 0)
        ctx.count(f"rx:{rx.run()}")
    except dp.DataPathError as exc:
        _protocol_error(ctx, exc)
    finally:
        pair.close()
        for b in temp:
            b.close()


def _end_after_the_preempt_way(path: Any, feeder: threading.Thread, rp_far: socket.socket,
                               done: threading.Event) -> None:
    """Close the return path once the preempt channel's way back is read to its end (its feeder
    done, the C loop past its EOF), so that run_rp's loop ends; or once that loop is ``done``."""
    feeder.join()
    deadline = time.monotonic() + 10.0
    while not path.preempt_requests_ended and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.0005)
    with contextlib.suppress(OSError):
        rp_far.shutdown(socket.SHUT_RDWR)


def run_rp(ctx: Ctx, seed: Seed, data: bytes, rng: random.Random) -> None:
    """The source's return path: requests served in C, the rest decoded in Python. With preempt,
    now and then the bytes come the preempt channel's way back instead (page requests only)."""
    wire, dp = ctx.wire, ctx.dp
    huge = rng.random() < 0.25
    blocks, temp = ctx.blocks.get(_seed_layout(ctx, huge))
    layout = wire.RamLayout(blocks=tuple(wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length,
                                                             host_page_size=b.page_size) for b in blocks))
    preempt = rng.random() < 0.75
    preempt_way = preempt and rng.random() < 0.3
    pair = _Pair(data, rng)
    out, sink = socket.socketpair()
    drains = [threading.Thread(target=_drain, args=(sink,), daemon=True)]
    rp_near, rp_far = socket.socketpair()
    done = threading.Event()
    try:
        path = dp.SourcePath(blocks, ctx.layout.section_id)
        path.mark_all_dirty()
        path.configure(preempt=preempt)
        path.set_channel(dp.CHAN_MAIN, out)
        if preempt_way:
            # the bytes come back on the preempt channel, whose pages are drained off the far end
            drains.append(threading.Thread(target=_drain, args=(pair.theirs,), daemon=True))
            drains.append(threading.Thread(target=_end_after_the_preempt_way,
                                           args=(path, pair.thread, rp_far, done), daemon=True))
            path.set_channel(dp.CHAN_PREEMPT, pair.ours)
            path.set_return_path(rp_near)
        else:
            if preempt:
                path.set_channel(dp.CHAN_PREEMPT, out)
            path.set_return_path(pair.ours)
        for t in drains:
            t.start()
        for _ in range(100000):
            code = path.serve_return_path()
            if code == dp.SourcePath.RP_BAD_REQUEST:
                ctx.count("rp:bad-request")
                continue
            if code != dp.SourcePath.RP_CONTROL:
                ctx.count(f"rp:{code}{':preempt-way' if preempt_way else ''}")
                return
            event = next(dp.decoded_items(path.rp, wire.ReturnPathDecoder(layout=layout, page_size=4096)))
            if isinstance(event, wire.RecvBitmap):
                try:
                    path.reload_dirty(path.index(event.idstr), event.bitmap)
                except ValueError:
                    ctx.count("refused:bitmap")
            if isinstance(event, wire.Shut | wire.ConnectionClosed):
                ctx.count("rp:shut")
                return
        raise InvariantBroken("return path did not finish")
    except (wire.RemoteProtocolError, dp.DataPathError) as exc:
        _protocol_error(ctx, exc)
    finally:
        done.set()
        pair.shutdown()
        out.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            rp_far.shutdown(socket.SHUT_RDWR)
        # the drains end on the shutdowns; only then their sockets close (a drain between two
        # recvs would meet a closed socket, or a new one reusing its fd number)
        for t in drains:
            if t.ident is not None:     # started
                t.join()
        pair.close()
        for s in (out, sink, rp_near, rp_far):
            s.close()
        for b in temp:
            b.close()


TARGETS: dict[str, Callable[[Ctx, Seed, bytes, random.Random], None]] = {
    "decode-main": run_decoder, "decode-recovery": run_decoder, "decode-preempt": run_decoder,
    "decode-rp": run_decoder, "dest": run_dest, "preempt": run_preempt, "rp": run_rp,
}


# ---------------------------------------------------------------- seeds from the captures

def _read(rel: str, n: int = -1) -> bytes:
    with lzma.open(CAPS / rel) as f:
        return f.read(n)


def _items(wire: Any, dec: Any, data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(start, end, event) of every item of an unmutated seed."""
    dec.receive_data(data)
    dec.receive_data(b"")
    start = 0
    while True:
        ev = dec.next_event()
        if isinstance(ev, wire.NeedData | wire.ConnectionClosed):
            return
        yield start, dec.offset, ev
        start = dec.offset


def _marks(wire: Any, make: Callable[[], Any], data: bytes) -> list[int]:
    """Item boundaries and, inside page runs, every record boundary."""
    marks = [0]
    try:
        for start, end, ev in _items(wire, make(), data):
            if isinstance(ev, wire.RamPages):
                marks.extend(start + rec.data_pos + (ev.target_page_size if rec.kind == REC_PAGE else 1)
                             for rec in ev.iter_records())
            marks.append(end)
    except wire.RemoteProtocolError:
        pass        # a seed cut in the middle of an item: marks up to there
    return sorted(set(m for m in marks if m <= len(data)))


def _cut(marks: list[int], at: int) -> int:
    return max(m for m in marks if m <= at)


def make_seeds(wire: Any, layout: Any, size: int) -> list[Seed]:
    main = lambda: wire.MainStreamDecoder()                               # noqa: E731
    recovery = lambda: wire.MainStreamDecoder(recovery=True, layout=layout)  # noqa: E731
    preempt = lambda: wire.PreemptDecoder(layout=layout)                   # noqa: E731
    rp = lambda: wire.ReturnPathDecoder(layout=layout)                     # noqa: E731
    tail = struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", layout.section_id) + b"\x00"  # EOS, footer, EOF
    seeds: list[Seed] = []

    def main_seed(name: str, raw: bytes, make: Callable[[], Any], is_recovery: bool = False) -> None:
        marks = _marks(wire, make, raw)
        body = raw[: _cut(marks, size)] + tail
        marks = _marks(wire, make, body)
        seeds.extend(Seed(name, target, body, marks, recovery=is_recovery)
                     for target in ("dest", "decode-recovery" if is_recovery else "decode-main"))

    main_seed("immediate", _read("64M-postcopy-immediate/capture/conn0.s2d.bin.xz", 20000 + 2 * size), main)
    pre = _read("64M-precopy1s-then-postcopy/capture/conn0.s2d.bin.xz", 18479948 + 2 * size)
    main_seed("precopy", pre[: 2 * size], main)
    # the RAM setup, then the end of precopy: discards, PACKAGED(LISTEN, devices, RUN), postcopy pages
    setup_end = next(end for _, end, ev in _items(wire, main(), pre[:4096]) if isinstance(ev, wire.SectionFooter))
    main_seed("precopy-postcopy", pre[:setup_end] + pre[18466204:], main)
    main_seed("recovery", _read("64M-postcopy-recover-pause-cap16M/capture-resume/conn0.s2d.bin.xz", 2 * size),
              recovery, is_recovery=True)
    raw = _read("64M-postcopy-preempt-cap16M/capture/conn1.s2d.bin.xz")
    marks = _marks(wire, preempt, raw)
    body = raw[: _cut(marks, size)] + struct.pack(">Q", 0x10)
    marks = _marks(wire, preempt, body)
    seeds.extend(Seed("preempt-channel", target, body, marks) for target in ("preempt", "decode-preempt"))
    for name, rel in (("rp-resume", "64M-postcopy-recover-pause-cap16M/capture-resume/conn0.d2s.bin.xz"),
                      ("rp-preempt", "64M-postcopy-preempt-cap16M/capture/conn0.d2s.bin.xz"),
                      ("rp-pause", "64M-postcopy-recover-pause-cap16M/capture/conn0.d2s.bin.xz")):
        raw = _read(rel)
        marks = _marks(wire, rp, raw)
        seeds.extend(Seed(name, target, raw, marks) for target in ("rp", "decode-rp"))
    return seeds


# ---------------------------------------------------------------- main

def _check_sanitized(native_file: str) -> str | None:
    """Why this is not an ASan/UBSan run, or None."""
    if b"__asan_report" not in Path(native_file).read_bytes():
        return f"{native_file} is not built with -fsanitize=address (build with: bash .ci/fuzz.sh)"
    if "libasan" not in Path("/proc/self/maps").read_text():
        return "libasan is not loaded: run with LD_PRELOAD=$(gcc -print-file-name=libasan.so)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    ap.add_argument("--iterations", type=int, default=0, help="stop after this many (0: only the time bound)")
    ap.add_argument("--first", type=int, default=0, help="index of the first iteration (to replay one)")
    ap.add_argument("--seed", type=int, default=14, help="the run's seed (default 14)")
    ap.add_argument("--size", type=int, default=48 * 1024, help="bytes of each main-stream seed (default 48 KiB)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--status", type=Path, help="keep the current iteration in this file (for a crash)")
    ap.add_argument("--save-input", type=Path, help="write each input to this file before running it")
    ap.add_argument("--build", type=Path,
                    help="the sanitized build made by `python3 uffd/_build.py --sanitize DIR` (DIR)")
    ap.add_argument("--allow-unsanitized", action="store_true", help="run on the normal build (no ASan)")
    ap.add_argument("--canary", choices=("guard", "heap"),
                    help="die on purpose, to check that the sanitizer reports it: 'guard' writes into a "
                         "guard page, 'heap' has the C core read past a 16-byte heap buffer")
    args = ap.parse_args()
    # this tree's postcopy, and uffd from the sanitized build when one is named
    sys.path[:0] = [str(args.build.resolve()), str(ROOT)] if args.build else [str(ROOT)]

    import postcopy._datapath as dp
    import uffd._native
    from postcopy import wire

    why = _check_sanitized(uffd._native.__file__)
    if why and not args.allow_unsanitized:
        print(f"fuzz_datapath: {why}", file=sys.stderr)
        return 2
    print(f"fuzz_datapath: C core {uffd._native.__file__} ({'unsanitized' if why else 'ASan+UBSan'}); "
          f"postcopy from {Path(wire.__file__).parents[1]}", flush=True)
    if args.canary == "guard":
        b = GuardedBlock("canary", 4096, 4096)
        ctypes.memset(b.addr + 4096, 1, 1)      # the guard page after the block
        print("fuzz_datapath: the guard page did not fault", file=sys.stderr)
        return 3
    if args.canary == "heap":
        small = uffd._native.ffi.new("uint8_t[]", 16)
        out = uffd._native.ffi.new("uint64_t[]", 1)
        addr = int(uffd._native.ffi.cast("uintptr_t", small))
        uffd._native.lib.pc_hash_pages(addr, 1, out)     # hashes 4096 bytes of the 16
        print("fuzz_datapath: the C core read past a heap buffer unnoticed", file=sys.stderr)
        return 3

    setup = next(ev for _, _, ev in _items(wire, wire.MainStreamDecoder(),
                                            _read("64M-postcopy-immediate/capture/conn0.s2d.bin.xz", 4096))
                 if isinstance(ev, wire.RamSetup))
    layout = wire.RamLayout(blocks=tuple(wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length)
                                         for b in setup.blocks), section_id=2)
    chosen = set(args.targets.split(","))
    unknown = chosen - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    all_seeds = make_seeds(wire, layout, args.size)
    edges = edge_values([b.used_length for b in layout.blocks])
    seeds = [s for s in all_seeds if s.target in chosen]
    ctx = Ctx(wire=wire, dp=dp, layout=layout, blocks=BlockCache())
    status = os.open(args.status, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if args.status else -1
    per_target: dict[str, int] = {}
    t0 = time.monotonic()
    last = t0
    i = args.first
    done = 0
    try:
        while True:
            now = time.monotonic()
            if now - t0 >= args.seconds or (args.iterations and done >= args.iterations):
                break
            if now - last >= 10:
                print(f"  {done} iterations, {done / (now - t0):.0f}/s", flush=True)
                last = now
            rng = random.Random(f"{args.seed}:{i}")
            seed = rng.choice(seeds)
            others = [s for s in all_seeds if s.target == seed.target and s is not seed]
            data = mutate(rng, seed, others, edges)
            if status >= 0:
                line = f"--seed {args.seed} --first {i} --iterations 1 --targets {seed.target} ({seed.name})\n"
                os.pwrite(status, line.encode().ljust(96), 0)
            if args.save_input:
                args.save_input.write_bytes(data)
            ctx.target = seed.target
            try:
                TARGETS[seed.target](ctx, seed, data, rng)
            except InvariantBroken as exc:
                print(f"fuzz_datapath: INVARIANT BROKEN at iteration {i} ({seed.target}, seed {seed.name}): {exc}\n"
                      f"  replay: {sys.argv[0]} --seed {args.seed} --first {i} --iterations 1 "
                      f"--targets {seed.target}", file=sys.stderr)
                return 1
            per_target[seed.target] = per_target.get(seed.target, 0) + 1
            i += 1
            done += 1
    finally:
        if status >= 0:
            os.close(status)
    elapsed = time.monotonic() - t0
    print(f"fuzz_datapath: {done} iterations in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f}/s), "
          f"seed {args.seed}, no sanitizer report, no invariant broken")
    for target, n in sorted(per_target.items()):
        seen = sorted(ctx.outcomes.get(target, {}).items(), key=lambda kv: -kv[1])
        print(f"  {target} {n}: " + ", ".join(f"{k} {v}" for k, v in seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
