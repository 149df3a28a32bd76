"""The destination: a page-fault service for one incoming postcopy migration.

Threads (the per-page work of each is C, with the GIL released):

* the caller's thread reads the main channel: Python decodes the control
  items (header, commands, PACKAGED) with the sans-IO codec, and the C
  receiver places the pages of every "ram" section;
* ``preempt``: the C receiver of the preempt channel;
* ``faults``: the C fault service (uffd -> REQ_PAGES on the return path);
* the guest's vCPUs (C pthreads) touch guest memory and block in the kernel
  on missing pages.

Python never touches guest memory once it is registered with userfaultfd.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from uffd import Feature, RegisterMode, Userfaultfd

from . import wire
from ._datapath import RX_MAIN, RX_PREEMPT, DataPathError, DestinationPath, Receiver, decoded_items
from ._link import LinkBroken, background_priority, bound_bulk_buffers, urgent_priority, set_recv_timeout, shutdown_quietly, tune
from .guest import Guest, Pattern
from .spec import DEVICE_IDSTR, GuestSpec, SpecError, decode_device_state

__all__ = ["Destination", "DestinationError", "DestinationResult"]

log = logging.getLogger("postcopy.dest")

TARGET_PAGE_SIZE = 4096
#: SHUT value answering a recovery when no guest runs here yet (the source starts over).
SHUT_NOTHING_TO_RECOVER = 2


class DestinationError(Exception):
    """The incoming migration cannot go on; ``kind`` labels it for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class DestinationResult:
    status: str = "setup"
    pages_received: int = 0
    pages_total: int = 0
    pages_normal: int = 0
    pages_zero: int = 0
    preempt_pages: int = 0
    bytes_received: int = 0
    remote_faults: int = 0
    requests_sent: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    blocktime_ns: int = 0
    vcpu_blocktime_ns: tuple[int, ...] = ()
    source_stopped_ns: int = 0
    guest_started_ns: int = 0
    finished_ns: int = 0
    recoveries: int = 0
    paused_ns: int = 0
    restarts: int = 0               # streams taken again because the link broke before RUN
    duplicate_host_pages: int = 0   # arrived twice (a requested page resent on preempt): EEXIST, harmless
    error: str | None = None


class Destination:
    """Serve one incoming migration of ``spec``'s guest."""

    def __init__(self, spec: GuestSpec, *, preempt: bool = True, verify: bool = False,
                 on_status: Callable[[str], None] | None = None, link_timeout: float = 3.0,
                 recover_timeout: float = 120.0) -> None:
        self.spec = spec
        self.link_timeout = link_timeout
        self.recover_timeout = recover_timeout
        self._listener: socket.socket | None = None
        self._recover_listener: socket.socket | None = None
        self._main_sock: socket.socket | None = None
        self._preempt_sock: socket.socket | None = None
        self._preempt_thread: threading.Thread | None = None
        self._broken = threading.Event()
        self._pause_requested = threading.Event()
        self._on_status = on_status
        self._latency_lock = threading.Lock()
        self.preempt = preempt
        self.verify = verify
        self.memory = spec.build_memory()
        self.path = DestinationPath(list(self.memory), verify=verify)
        self.result = DestinationResult(pages_total=self.path.total_pages())
        self.uffd: Userfaultfd | None = None
        self.guest: Guest | None = None
        self._device_state: bytes | None = None
        self._threads: list[threading.Thread] = []
        self._stop_r, self._stop_w = os.pipe()
        self._preempt_rx: Receiver | None = None
        self._main_rx: Receiver | None = None
        self._preempt_done = threading.Event()
        self._preempt_failed = ""
        self._discard_ranges = 0
        self._retired: dict[str, tuple[int, int, int]] = {"main": (0, 0, 0), "preempt": (0, 0, 0)}
        self._errors: list[BaseException] = []
        self._layout: wire.RamLayout | None = None

    # -- the migration ------------------------------------------------------

    def serve(self, listener: socket.socket) -> DestinationResult:
        """Accept the channels on ``listener`` and run the migration to its end.

        A channel that fails after RUN pauses the migration (faulting guest
        threads stay blocked, nothing received is lost) and the source's
        recovery connection is awaited on ``listener`` (or on the address given
        to :meth:`recover`).
        """
        self._listener = listener
        try:
            while True:
                main, preempt = self._accept_channels(recovery=False, deadline=float("inf"))
                try:
                    rx = self._main_rx = self.path.receiver(main, RX_MAIN, 0)
                    self._preamble(rx, main, preempt)
                    break
                except (DataPathError, DestinationError, ConnectionError, wire.RemoteProtocolError) as exc:
                    kind = getattr(exc, "kind", "io")
                    if self.guest is not None or kind not in ("io", "truncated"):
                        raise
                    # No guest runs here yet: nothing can be lost; take the whole stream again.
                    log.warning("the link broke before the switch completed (%s): waiting for the stream again", exc)
                    self._reset_before_run()
            watchdog = threading.Thread(target=self._watch_link, name="dest-watchdog", daemon=True)
            watchdog.start()
            background_priority()   # this thread now places bulk pages: below the fault path
            while True:
                try:
                    self._postcopy(rx)
                    self._wait_preempt_end()
                    break
                except (LinkBroken, DataPathError, ConnectionError) as exc:
                    if isinstance(exc, DataPathError) and exc.kind not in ("io", "truncated"):
                        raise       # a malformed stream is not a broken link
                    rx = self._pause_and_recover(str(exc))
            self._finish()
        except (DataPathError, DestinationError, wire.RemoteProtocolError, SpecError, OSError) as exc:
            self.result.error = str(exc)
            self._set_status("failed")
            raise
        finally:
            self._stop_threads()
            for sock in (self._main_sock, self._preempt_sock, self._recover_listener):
                if sock is not None:
                    sock.close()
        return self.result

    def _accept_channels(self, *, recovery: bool, deadline: float) -> tuple[socket.socket, socket.socket | None]:
        """The source's main and preempt connections, told apart by content: a
        fresh main stream starts with the QEVM header, a recovery one with a
        command, both sent right after connecting; the preempt channel stays
        silent until a page is urgent. A newer main replaces one of an attempt
        that died unfinished; stale connections show EOF at once and are closed.
        A recovery attempt while we wait for a fresh stream (no guest runs here
        yet) is told there is nothing to recover, so the source starts over."""
        wanted = b"\x08" if recovery else b"Q"
        main: socket.socket | None = None
        preempt: socket.socket | None = None
        while main is None or (self.preempt and preempt is None):
            sock = self._accept_until(deadline)
            first = self._first_byte(sock, self.link_timeout if main is None else 0.005)
            if first == wanted:
                for old in (main, preempt):
                    if old is not None:
                        old.close()
                main, preempt = bound_bulk_buffers(sock), None
            elif first == b"\x08":
                self._refuse_recovery(sock)
            elif first is None and main is not None and preempt is None:
                preempt = sock
            else:
                sock.close()
        self._main_sock, self._preempt_sock = main, preempt
        return main, preempt

    @staticmethod
    def _refuse_recovery(sock: socket.socket) -> None:
        """SHUT 2: no guest runs here yet, so there is nothing to recover."""
        try:
            sock.sendall(wire.encode(wire.Shut(value=SHUT_NOTHING_TO_RECOVER)))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            while sock.recv(65536):     # read what it sent, so closing does not reset the SHUT away
                pass
        except OSError:
            pass
        finally:
            sock.close()

    def _reset_before_run(self) -> None:
        """Back to a fresh destination after a link that broke before RUN: no
        guest ran here, so everything received is dropped and taken again."""
        self._stop_threads()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r, self._stop_w = os.pipe()
        self._threads = []
        self._preempt_thread = None
        if self.uffd is not None:
            for b in self.memory:
                self.uffd.unregister(b.addr, b.used_length)
            self.uffd.close()
            self.uffd = None
        for sock in (self._main_sock, self._preempt_sock):
            if sock is not None:
                sock.close()
        self._main_sock = self._preempt_sock = None
        self._main_rx = self._preempt_rx = None
        for b in self.memory:
            b.discard(0, b.used_length)
        self.path = DestinationPath(list(self.memory), verify=self.verify)
        restarts = self.result.restarts + 1
        self.result = DestinationResult(pages_total=self.path.total_pages(), restarts=restarts)
        self._device_state = None
        self._layout = None
        self._preempt_done = threading.Event()
        self._preempt_failed = ""
        self._broken.clear()
        self._errors = []
        self._discard_ranges = 0
        self._retired = {"main": (0, 0, 0), "preempt": (0, 0, 0)}
        self._set_status("setup")

    def _accept(self, listener: socket.socket) -> socket.socket:
        sock, _ = listener.accept()
        return tune(sock, self.link_timeout)

    def _preamble(self, rx: Receiver, main: socket.socket, preempt: socket.socket | None) -> None:
        """Everything up to RUN: header, setup, discards, PACKAGED."""
        huge = {b.idstr: b.page_size for b in self.memory if b.page_size != TARGET_PAGE_SIZE}
        dec = wire.MainStreamDecoder(block_page_sizes=huge)
        for event in decoded_items(rx.input, dec):
            match event:
                case wire.OpenReturnPath():
                    self.path.set_return_path(main)
                case wire.Ping(value=v):
                    self.path.send(wire.encode(wire.Pong(value=v)))
                case wire.PostcopyAdvise(pagesize_summary=summary, target_page_size=tps):
                    self._check_advise(summary, tps)
                case wire.SectionStart(idstr="ram", section_id=sid):
                    rx.ram_section_id = sid
                case wire.RamSetup(blocks=entries):
                    self._check_setup(entries, rx.ram_section_id)
                case wire.RamPages(records=records, buffer=buffer):
                    rx.place(records, bytes(buffer))      # precopy: plain writes, nothing registered yet
                case wire.PostcopyRamDiscard(idstr=idstr, ranges=ranges):
                    self._discard(idstr, ranges)
                case wire.Packaged(events=inner):
                    self._packaged(inner, preempt)
                    return
                case wire.ConnectionClosed():
                    raise DestinationError("truncated", "the source closed the main channel before the switch to postcopy")
                case _:
                    pass

    def _check_advise(self, summary: int | None, tps: int | None) -> None:
        ours = 0
        for b in self.memory:
            ours |= b.page_size
        if tps != TARGET_PAGE_SIZE or summary != ours:
            raise DestinationError(
                "advise_mismatch",
                f"POSTCOPY_ADVISE says target page {tps} and page sizes {summary:#x}; "
                f"this destination has {TARGET_PAGE_SIZE} and {ours:#x} (start both sides with the same memory)",
            )

    def _check_setup(self, entries: tuple[wire.RamBlockEntry, ...], section_id: int) -> None:
        theirs = [(e.idstr, e.used_length) for e in entries]
        ours = [(b.idstr, b.used_length) for b in self.memory]
        if theirs != ours:
            raise DestinationError(
                "ram_layout", f"the source's RAM blocks {theirs} differ from this destination's {ours}")
        self._layout = wire.RamLayout(
            blocks=tuple(wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length, host_page_size=b.page_size)
                         for b in self.memory),
            section_id=section_id,
        )

    def _discard(self, idstr: str, ranges: tuple[tuple[int, int], ...]) -> None:
        try:
            index = self.path.index(idstr)
        except KeyError:
            raise DestinationError("unknown_block", f"discard for unknown RAM block {idstr!r}") from None
        block = self.path.blocks[index]
        self._discard_ranges += len(ranges)
        for start, length in ranges:
            self.path.discard(index, start, length)      # validates the range first
            block.discard(start, length)

    def _packaged(self, inner: tuple[wire.WireEvent, ...], preempt: socket.socket | None) -> None:
        for event in inner:
            match event:
                case wire.PostcopyListen():
                    self._listen(preempt)
                case wire.DeviceSection(idstr=idstr, payload=payload) if idstr == DEVICE_IDSTR:
                    self._device_state = payload
                case wire.Ping(value=v):
                    self.path.send(wire.encode(wire.Pong(value=v)))
                case wire.PostcopyRun():
                    self._run_guest()
                case _:
                    pass

    def _listen(self, preempt: socket.socket | None) -> None:
        """Register guest memory with userfaultfd and start serving faults."""
        features = Feature.THREAD_ID
        if any(b.backing == "hugetlbfs" for b in self.memory):
            features |= Feature.MISSING_HUGETLBFS
        if any(b.backing == "memfd" for b in self.memory):
            features |= Feature.MISSING_SHMEM
        self.uffd = Userfaultfd(features, user_mode_only=True)
        for b in self.memory:
            self.uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
        self.path.attach_uffd(self.uffd.fileno())
        self._start("faults", self._serve_faults)
        if preempt is not None:
            self._start_preempt(preempt)

    def _run_guest(self) -> None:
        if self._device_state is None:
            raise DestinationError("no_device_state", f"PACKAGED carried no {DEVICE_IDSTR!r} section before RUN")
        state, stopped_ns = decode_device_state(self._device_state, self.spec)
        self.result.source_stopped_ns = stopped_ns
        w = self.spec.workload()
        self.guest = Guest(
            [(b.addr, b.used_length, b.page_size) for b in self.memory],
            nvcpus=int(w["vcpus"]), pattern=Pattern[str(w["pattern"]).upper()], seed=int(w["seed"]),
            write_percent=int(w["write_percent"]), rate_limit=int(w["rate_limit"]),
        )
        self.guest.load_state(state)
        self.guest.start()
        self.result.guest_started_ns = time.monotonic_ns()
        self._set_status("postcopy-active")
        tids = self.guest.vcpu_tids() if hasattr(self.guest, "vcpu_tids") else []
        self.path.set_vcpu_threads(tids)

    def _postcopy(self, rx: Receiver) -> None:
        """The main channel after RUN: C places pages; Python answers PINGs and sees EOF."""
        assert self._layout is not None
        while True:
            code = rx.run()
            if code == Receiver.CONTROL:
                dec = wire.MainStreamDecoder(recovery=True, layout=self._layout)
                event = next(decoded_items(rx.input, dec))
                match event:
                    case wire.Ping(value=v):
                        self.path.send(wire.encode(wire.Pong(value=v)))
                    case wire.EndOfStream():
                        return
                    case wire.ConnectionClosed():
                        raise LinkBroken("main channel closed before the end of the stream")
                    case _:
                        raise DestinationError("unexpected", f"unexpected {type(event).__name__} after RUN")
            elif code == Receiver.EOF:
                raise LinkBroken("main channel closed before the end of the stream")
            elif code == Receiver.STOPPED:
                raise LinkBroken("paused")
            else:
                raise DestinationError("unexpected", f"main channel receiver stopped ({code})")

    def _wait_preempt_end(self) -> None:
        """After the main EOF, a 7.2-style source ends the preempt channel with EOS."""
        if not self.preempt:
            return
        self._preempt_done.wait()
        if self._broken.is_set() or self._preempt_failed:
            raise LinkBroken(f"preempt channel failed: {self._preempt_failed or 'link broken'}")

    def _finish(self) -> None:
        if self._errors:
            raise self._errors[0]
        received = self.path.received_pages()
        if received != self.result.pages_total:
            raise DestinationError(
                "incomplete", f"the stream ended with {self.result.pages_total - received} pages never received")
        assert self.uffd is not None
        for b in self.memory:
            self.uffd.unregister(b.addr, b.used_length)
        self.path.send(wire.encode(wire.Shut(value=0)))
        self.result.finished_ns = time.monotonic_ns()
        self._collect()
        self._set_status("completed")

    def _collect(self) -> None:
        c = self.path.counters()
        r = self.result
        r.pages_received = self.path.received_pages()
        r.remote_faults = c.faults
        r.requests_sent = c.requests_sent
        r.duplicate_host_pages = c.eexist
        r.blocktime_ns = c.blocktime_ns
        r.vcpu_blocktime_ns = c.vcpu_blocktime_ns
        self.poll_latencies()

    # -- what operators see -----------------------------------------------------

    def _set_status(self, status: str) -> None:
        self.result.status = status
        if self._on_status is not None:
            self._on_status(status)

    def poll_latency_parts(self) -> tuple[list[int], list[int]]:
        """(fault -> request written, request written -> page placed) samples in ns
        since the last call: the two parts of the fault latency."""
        return self.path.drain_latencies_ns("request"), self.path.drain_latencies_ns("reply")

    def poll_latencies(self) -> list[int]:
        """Fault -> placed latencies (ns) since the last call; all of them stay in ``result``."""
        with self._latency_lock:
            new = self.path.drain_latencies_ns()
            self.result.latencies_ns.extend(new)
        return new

    def _channel_totals(self, name: str, rx: Receiver | None) -> tuple[int, int, int]:
        """(normal pages, zero pages, bytes) over every connection this channel had."""
        now = rx.counters() if rx is not None else (0, 0, 0)
        return tuple(a + b for a, b in zip(self._retired[name], now, strict=True))  # type: ignore[return-value]

    def _retire(self, name: str, rx: Receiver | None) -> None:
        if rx is not None:
            self._retired[name] = self._channel_totals(name, rx)

    def snapshot(self) -> dict[str, object]:
        """Live figures, cheap to take at any time (C counters, no locks on the data path)."""
        c = self.path.counters()
        main = self._channel_totals("main", self._main_rx)
        pre = self._channel_totals("preempt", self._preempt_rx)
        return {
            "status": self.result.status,
            "pages_total": self.result.pages_total,
            "pages_received": self.path.received_pages(),
            "main": {"normal": main[0], "zero": main[1], "bytes": main[2]},
            "preempt": {"normal": pre[0], "zero": pre[1], "bytes": pre[2]},
            "faults": c.faults,
            "requests_sent": c.requests_sent,
            "discard_ranges": self._discard_ranges,
            "recoveries": self.result.recoveries,
            "paused_ns": self.result.paused_ns,
            "waiting": c.waiting,
            "blocktime_ns": c.blocktime_ns,
            "vcpu_blocktime_ns": list(c.vcpu_blocktime_ns),
        }

    # -- threads --------------------------------------------------------------

    def _start(self, name: str, target: object) -> None:
        t = threading.Thread(target=self._guarded, args=(target,), name=f"dest-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _guarded(self, target) -> None:  # type: ignore[no-untyped-def]
        try:
            target()
        except BaseException as exc:  # recorded for the main thread, which re-raises it
            log.error("%s failed: %s", threading.current_thread().name, exc)
            self._errors.append(exc)
            self._preempt_done.set()

    def _serve_faults(self) -> None:
        urgent_priority()
        rc = self.path.serve_faults(self._stop_r)
        if rc < 0:
            raise DestinationError("uffd", f"fault service stopped: {os.strerror(-rc)}")

    def _start_preempt(self, sock: socket.socket) -> None:
        self._preempt_rx = self.path.receiver(sock, RX_PREEMPT, 0)
        self._preempt_done.clear()
        self._preempt_failed = ""
        self._preempt_thread = threading.Thread(target=self._serve_preempt, args=(self._preempt_rx,),
                                                name="dest-preempt", daemon=True)
        self._preempt_thread.start()

    def _serve_preempt(self, rx: Receiver) -> None:
        urgent_priority()
        try:
            code = rx.run()
            if code == Receiver.EOF:
                self._preempt_failed = "closed without EOS"
            elif code == Receiver.STOPPED:
                self._preempt_failed = "stopped"
        except DataPathError as exc:
            self._preempt_failed = str(exc)
            if exc.kind not in ("io", "truncated"):
                self._errors.append(exc)
        finally:
            if self._preempt_failed:
                self._break_link()      # the main loop notices and pauses
            self._preempt_done.set()

    # -- pause and recovery ----------------------------------------------------

    def _watch_link(self) -> None:
        """The link is broken when the source stops sending (but keeps the
        connection), or when it is already knocking with a recovery connection:
        the source noticed first, so do not wait for our own timeout."""
        last_bytes, last_change = -1, time.monotonic()
        while self.result.status not in ("completed", "failed"):
            knocking = self._connection_waiting(min(0.1, self.link_timeout / 10))
            rx = self._main_rx
            if self.result.status != "postcopy-active" or rx is None:
                last_bytes, last_change = -1, time.monotonic()
                if not knocking:
                    continue
                time.sleep(0.01)    # recovery in progress: it accepts; do not spin
                continue
            if knocking:
                log.warning("the source is reconnecting: the link is broken, pausing")
                self._break_link()
                time.sleep(0.05)
                continue
            n = rx.counters()[2]
            if n != last_bytes:
                last_bytes, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > self.link_timeout:
                log.warning("no data from the source for %.1f s: pausing", self.link_timeout)
                self._break_link()
                last_change = time.monotonic()

    def _connection_waiting(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a connection on the listener (not accepting it)."""
        listener = self._recover_listener or self._listener
        if listener is None:
            time.sleep(timeout)
            return False
        try:
            ready, _, _ = select.select([listener], [], [], timeout)
        except (OSError, ValueError):   # closed under us by migrate-recover
            time.sleep(timeout)
            return False
        return bool(ready)

    def _break_link(self) -> None:
        self._broken.set()
        for rx in (self._main_rx, self._preempt_rx):
            if rx is not None:
                rx.stop()
        shutdown_quietly(self._main_sock)
        shutdown_quietly(self._preempt_sock)

    def pause(self) -> None:
        """Break the link on purpose (QMP migrate-pause); the source recovers."""
        self._break_link()

    def recover(self, address: tuple[str, int]) -> None:
        """Await the recovery on a new address (QMP migrate-recover)."""
        listener = socket.create_server(address, backlog=4)
        old, self._recover_listener = self._recover_listener, listener
        if old is not None:
            old.close()

    def _pause_and_recover(self, why: str) -> Receiver:
        log.warning("postcopy paused: %s", why)
        paused_at = time.monotonic_ns()
        self._set_status("postcopy-paused")
        self.path.set_return_path(None)     # faults go on being recorded as outstanding requests
        self._break_link()
        if self._preempt_thread is not None:
            self._preempt_thread.join()
        for sock in (self._main_sock, self._preempt_sock):
            if sock is not None:
                sock.close()
        self._main_sock = self._preempt_sock = None
        self._retire("main", self._main_rx)
        self._retire("preempt", self._preempt_rx)
        self._main_rx = self._preempt_rx = None
        deadline = time.monotonic() + self.recover_timeout
        while True:
            if time.monotonic() > deadline:
                raise DestinationError("recovery_timeout", f"no recovery within {self.recover_timeout:.0f} s ({why})")
            try:
                rx = self._accept_recovery(deadline)
                break
            except (LinkBroken, ConnectionError, OSError, DataPathError, wire.RemoteProtocolError) as exc:
                log.warning("recovery attempt failed: %s", exc)
                for sock in (self._main_sock, self._preempt_sock):
                    if sock is not None:
                        sock.close()
                self._main_sock = self._preempt_sock = None
                self.path.set_return_path(None)
        self.result.recoveries += 1
        self.result.paused_ns += time.monotonic_ns() - paused_at
        self._set_status("postcopy-active")
        return rx

    def _accept_recovery(self, deadline: float) -> Receiver:
        """Take the source's new channels, answer its bitmap requests and RESUME."""
        assert self._layout is not None
        main, preempt = self._accept_channels(recovery=True, deadline=deadline)
        self._broken.clear()
        self._set_status("postcopy-recover")
        set_recv_timeout(main, self.link_timeout)
        rx = self._main_rx = self.path.receiver(main, RX_MAIN, self._layout.section_id or 0)
        dec = wire.MainStreamDecoder(recovery=True, layout=self._layout)
        for event in decoded_items(rx.input, dec):
            match event:
                case wire.RecvBitmapRequest(idstr=idstr):
                    try:
                        bitmap = self.path.received[self.path.index(idstr)].to_le_bytes()
                    except KeyError:
                        raise DestinationError("unknown_block", f"RECV_BITMAP for unknown block {idstr!r}") from None
                    main.sendall(wire.encode(wire.RecvBitmap(idstr=idstr, bitmap=bitmap)))
                case wire.PostcopyResume():
                    main.sendall(wire.encode(wire.ResumeAck(value=1)))
                    break
                case wire.Ping(value=v):
                    main.sendall(wire.encode(wire.Pong(value=v)))
                case wire.ConnectionClosed():
                    raise LinkBroken("the recovery connection closed during the handshake")
                case _:
                    raise DestinationError("unexpected", f"unexpected {type(event).__name__} in the recovery handshake")
        set_recv_timeout(main, 0)
        self.path.set_return_path(main)
        resent = self.path.resend_requests()
        log.info("recovered: %d outstanding page requests sent again", resent)
        if preempt is not None:
            self._start_preempt(preempt)
        return rx

    def _accept_until(self, deadline: float) -> socket.socket:
        """Accept on the recovery listener, in short slices: migrate-recover may
        switch to a new address at any time."""
        while True:
            listener = self._recover_listener or self._listener
            assert listener is not None
            listener.settimeout(0.1)
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                continue
            finally:
                listener.settimeout(None)
            sock.setblocking(True)
            return tune(sock, self.link_timeout)

    @staticmethod
    def _first_byte(sock: socket.socket, wait: float) -> bytes | None:
        """The first byte a new connection sends, b"" at EOF, None if silent for ``wait`` s."""
        sock.settimeout(wait)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return None
        finally:
            sock.settimeout(None)
        return data if data else b""

    def _stop_threads(self) -> None:
        os.write(self._stop_w, b"x")
        if self._preempt_rx is not None:
            self._preempt_rx.stop()
            shutdown_quietly(self._preempt_sock)
        for t in [*self._threads, self._preempt_thread]:
            if t is not None:
                t.join(timeout=10)

    # -- after the migration ---------------------------------------------------

    def close(self) -> None:
        """Tear everything down. After a failed migration vCPUs may be blocked on
        pages that will never come: closing the uffd releases them (the guest is
        being thrown away), so stopping it cannot hang."""
        if self.guest is not None:
            self.guest.request_stop()
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        self.memory.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
