"""The source: pushes every page of a running guest to a destination with postcopy.

Sequence on the main channel (QEMU's, see the protocol spec section 2): the
header and configuration, OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE, the "ram"
setup; at the switch the guest stops, then the discards, PING 2, PACKAGED
(LISTEN, the guest's device state, PING 3, RUN), PING 4, and the background
stream of every page still dirty (a C thread), the "ram" END and EOF. With
preempt, the preempt channel is connected right after the main one (QEMU 7.2
style) and ends with an EOS.

The return path is read by a C loop that serves page requests itself; the
other messages (PONG, SHUT, ...) come back here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from uffd import GuestMemory

from . import wire
from ._datapath import (
    CHAN_MAIN,
    CHAN_PREEMPT,
    PC_HEARTBEAT_MASK,
    PC_HEARTBEAT_PING,
    DataPathError,
    SourcePath,
    decoded_items,
    hash_pages,
)
from ._link import Backoff, LinkBroken, background_priority, bound_bulk_buffers, urgent_priority, set_recv_timeout, shutdown_quietly, tune
from .guest import Guest
from .spec import DEVICE_IDSTR, DEVICE_VERSION, GuestSpec, encode_device_state

__all__ = ["Source", "SourceError", "SourceResult"]

log = logging.getLogger("postcopy.source")

RAM_SECTION_ID = 2
DEVICE_SECTION_ID = 3
MACHINE_TYPE = "postcopy-builtin-1"
MAX_DISCARDS_PER_COMMAND = 12      # QEMU's limit
TARGET_PAGE_SIZE = 4096


class _StartOver(Exception):
    """The destination had not started the guest (it answered a recovery with
    SHUT 2): send the whole stream again."""


#: SHUT value our destination sends to a recovery when no guest runs there yet.
SHUT_NOTHING_TO_RECOVER = 2


class SourceError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class SourceResult:
    status: str = "setup"
    stopped_ns: int = 0
    downtime_ns: int = 0            # guest stopped -> PONG 3 (device state loaded on the destination)
    started_ns: int = 0
    finished_ns: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, bytes] = field(default_factory=dict)
    bad_requests: int = 0
    recoveries: int = 0
    paused_ns: int = 0
    recovery_errors: list[str] = field(default_factory=list)
    restarts: int = 0               # whole stream sent again: the link broke before the guest started there
    error: str | None = None


class Source:
    """Migrate ``memory`` (with its running ``guest``) to a destination.

    A channel that fails during postcopy pauses the migration; with
    ``auto_recover`` the source reconnects with bounded backoff, reloads the
    destination's received bitmaps into its dirty bitmaps and resumes. Without
    it (or after :meth:`pause`), it waits for :meth:`resume`.
    """

    def __init__(self, spec: GuestSpec, memory: GuestMemory, guest: Guest, *, preempt: bool = True,
                 bandwidth_cap: int = 0, verify: bool = False,
                 on_status: Callable[[str], None] | None = None, auto_recover: bool = True,
                 link_timeout: float = 3.0, recover_timeout: float = 120.0,
                 heartbeat: float = 0.1, reconnect_timeout: float = 0.1,
                 backoff: tuple[float, float] = (0.01, 0.02)) -> None:
        self.spec = spec
        self._on_status = on_status
        self.memory = memory
        self.guest = guest
        self.preempt = preempt
        self.verify = verify
        self.auto_recover = auto_recover
        self.link_timeout = link_timeout
        self.recover_timeout = recover_timeout
        # Short connect attempts, retried soon: a SYN lost on a dead link is
        # not retransmitted for a second, so a fresh attempt finds a restored
        # link sooner than waiting on the old one.
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff
        self.path = SourcePath(list(memory), RAM_SECTION_ID)
        self.path.configure(preempt=preempt, bandwidth_cap=bandwidth_cap)
        self.path.set_heartbeat(heartbeat)
        self.result = SourceResult()
        self._pongs: dict[int, int] = {}
        self._pong_cv = threading.Condition()
        self._shut = threading.Event()
        self._link_error: str | None = None
        self._address: tuple[str, int] | None = None
        self._main: socket.socket | None = None
        self._preempt_sock: socket.socket | None = None
        self._rp_thread: threading.Thread | None = None
        self._resume = threading.Event()
        self._manual_pause = False
        self._last_heartbeat_pong = 0
        self._last_pong_ns = 0
        self._discard_ranges = 0
        self._switch_events: list[wire.WireEvent] = []
        self._shut_value_ok = True
        self._paused_at = 0

    def migrate(self, address: tuple[str, int], *, connect_timeout: float = 0.0,
                switchover: threading.Event | None = None) -> SourceResult:
        """Run the whole migration.

        ``connect_timeout`` waits for a destination that is still starting;
        ``switchover``, when given, holds the switch to postcopy until it is set
        (QMP's migrate-start-postcopy); otherwise the switch is immediate.
        """
        self._set_status("setup")
        self._address = address
        self._main = bound_bulk_buffers(tune(self._connect(address, connect_timeout), self.link_timeout))
        self.result.started_ns = time.monotonic_ns()
        hasher = None
        try:
            self.path.set_channel(CHAN_MAIN, self._main)
            self.path.set_return_path(self._main)
            self._send(self._preamble())
            if self.preempt:
                # 7.2 style: connect preempt at once; the destination tells it from main by content.
                self._connect_preempt(None)
            self._start_return_path()
            self._set_status("active")
            if switchover is not None:
                switchover.wait()
            self._switchover()
            if self.verify:
                hasher = threading.Thread(target=self._hash_all, name="source-hash", daemon=True)
                hasher.start()
            self._set_status("postcopy-active")
            while True:
                try:
                    self._postcopy_phase()
                    break
                except LinkBroken as exc:
                    self._pause(str(exc))
                    self._recover()
            if hasher:
                hasher.join()
            self.result.counters = self.path.counters()
            self._set_status("completed")
        except (DataPathError, SourceError, OSError, wire.RemoteProtocolError) as exc:
            self.result.error = str(exc)
            self._set_status("failed")
            raise
        finally:
            self.result.finished_ns = time.monotonic_ns()
            self.result.counters = self.path.counters()
            self._close_channels()
        return self.result

    # -- postcopy, pause, recovery -----------------------------------------------

    def _postcopy_phase(self) -> None:
        """Background stream, END and EOF, then SHUT; LinkBroken if a channel fails."""
        box: dict[str, object] = {}

        def bulk() -> None:
            background_priority()
            try:
                box["rc"] = self.path.run_bulk()
            except DataPathError as exc:
                box["error"] = exc

        t = threading.Thread(target=bulk, name="source-bulk", daemon=True)
        self._last_pong_ns = time.monotonic_ns()
        t.start()
        while t.is_alive():
            t.join(0.05)
            self._check_link(streaming=True)
        if "error" in box or box.get("rc") != SourcePath.DONE:
            raise LinkBroken(str(box.get("error") or self._link_error or "background stream stopped"))
        try:
            self._send(self._ending())
            if self._preempt_sock is not None:
                # EOS (a 7.2 destination needs it); no urgent page may follow it
                self.path.finish(CHAN_PREEMPT, (0x10).to_bytes(8, "big"))
        except ConnectionError as exc:
            raise LinkBroken(str(exc)) from None
        deadline = time.monotonic() + 10 * self.link_timeout
        while not self._shut.wait(0.05):
            self._check_link()
            if time.monotonic() > deadline:
                raise LinkBroken("no SHUT from the destination after the end of the stream")
        if self._link_error is not None and not self._shut_value_ok:
            raise SourceError("destination_failed", self._link_error)

    def _check_link(self, streaming: bool = False) -> None:
        """Raise LinkBroken (after breaking the link) when a channel failed or the
        destination stopped answering our heartbeat PINGs. While the background
        stream runs, PINGs go out every heartbeat, so a long silence on the
        return path means the link is gone even if a blocked write keeps the
        next PING from being sent."""
        if self._link_error is not None and not self._shut.is_set():
            self._break_link()
            raise LinkBroken(self._link_error)
        now = time.monotonic_ns()
        sent_seq, sent_ns = self.path.heartbeat()
        unanswered = sent_seq != self._last_heartbeat_pong and now - sent_ns > self.link_timeout * 1e9
        silent = streaming and now - self._last_pong_ns > self.link_timeout * 1e9
        if unanswered or silent:
            self._link_error = f"no PONG for {self.link_timeout:.1f} s"
            self._break_link()
            raise LinkBroken(self._link_error)

    def _break_link(self) -> None:
        self.path.stop()
        shutdown_quietly(self._main)
        shutdown_quietly(self._preempt_sock)

    def pause(self) -> None:
        """Break the link on purpose (QMP migrate-pause); wait for :meth:`resume`."""
        self._manual_pause = True
        self._link_error = self._link_error or "paused by request"
        self._break_link()

    def resume(self, address: tuple[str, int] | None = None) -> None:
        """Recover now, to ``address`` if given (QMP migrate with resume: true)."""
        if address is not None:
            self._address = address
        self._manual_pause = False
        self._resume.set()

    def _pause(self, why: str) -> None:
        log.warning("postcopy paused: %s", why)
        self._paused_at = time.monotonic_ns()
        self._set_status("postcopy-paused")
        self._break_link()
        self._close_channels()

    def _close_channels(self) -> None:
        self.path.stop()
        shutdown_quietly(self._main)
        shutdown_quietly(self._preempt_sock)
        if self._rp_thread is not None:
            self._rp_thread.join(timeout=10)
            self._rp_thread = None
        for sock in (self._main, self._preempt_sock):
            if sock is not None:
                sock.close()
        self._main = self._preempt_sock = None
        self.path.set_channel(CHAN_MAIN, None)
        self.path.set_channel(CHAN_PREEMPT, None)

    def _recover(self) -> None:
        backoff = Backoff(*self.backoff)
        deadline = time.monotonic() + self.recover_timeout
        while True:
            if self._manual_pause or not self.auto_recover:
                self._resume.wait(max(0.0, deadline - time.monotonic()))
                self._resume.clear()
            if time.monotonic() > deadline:
                raise SourceError("recovery_timeout", f"no recovery within {self.recover_timeout:.0f} s")
            try:
                try:
                    self._resume_handshake()
                except _StartOver:
                    log.warning("the destination had not started the guest: sending the whole stream again")
                    self._close_channels()
                    self._start_over()
                break
            except (OSError, LinkBroken, DataPathError, wire.RemoteProtocolError, SourceError) as exc:
                log.warning("recovery attempt failed: %s", exc)
                self.result.recovery_errors.append(str(exc))
                self._close_channels()
                self._set_status("postcopy-paused")
                backoff.wait()
        self.result.recoveries += 1
        self.result.paused_ns += time.monotonic_ns() - self._paused_at
        self._set_status("postcopy-active")

    def _resume_handshake(self) -> None:
        """New channels; RECV_BITMAP for every block; dirty = not received; RESUME; RESUME_ACK."""
        main = self._reconnect_main()
        self._set_status("postcopy-recover")
        set_recv_timeout(main, self.link_timeout)
        # the commands first, then the preempt channel: the destination tells them apart by content
        self._send([wire.RecvBitmapRequest(idstr=b.idstr) for b in self.memory])
        if self.preempt:
            self._connect_preempt(self.reconnect_timeout)
        layout = wire.RamLayout(blocks=tuple(
            wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length, host_page_size=b.page_size)
            for b in self.memory))
        pending = {b.idstr for b in self.memory}
        while pending:
            event = self._next_rp_event(layout)
            match event:
                case wire.RecvBitmap(idstr=idstr, bitmap=bitmap):
                    if idstr not in pending:
                        raise SourceError("unexpected", f"RECV_BITMAP for {idstr!r} twice or unasked")
                    self.path.reload_dirty(self.path.index(idstr), bitmap)
                    pending.discard(idstr)
                case wire.Pong():
                    pass
                case wire.Shut(value=v) if v == SHUT_NOTHING_TO_RECOVER:
                    raise _StartOver()
                case _:
                    raise SourceError("unexpected", f"{type(event).__name__} before every bitmap arrived")
        log.info("recovery: %d pages still to send", self.path.dirty_pages())
        self._send([wire.PostcopyResume()])
        while not isinstance(event := self._next_rp_event(), wire.ResumeAck):
            if not isinstance(event, wire.Pong):
                raise SourceError("unexpected", f"{type(event).__name__} before RESUME_ACK")
        set_recv_timeout(main, 0)
        self._start_return_path()

    def _reconnect_main(self) -> socket.socket:
        """A new main channel (and return path) after a pause: fresh link state,
        the background scan rewound (what to send is set by the caller)."""
        assert self._address is not None
        main = self._main = bound_bulk_buffers(tune(
            socket.create_connection(self._address, timeout=self.reconnect_timeout), self.link_timeout))
        main.settimeout(None)
        self._link_error = None
        self._shut.clear()
        self._last_heartbeat_pong = self.path.heartbeat()[0]    # pings of the old link get no answer
        self.path.restart()
        self.path.set_channel(CHAN_MAIN, main)
        self.path.set_return_path(main)
        return main

    def _connect_preempt(self, timeout: float | None) -> None:
        assert self._address is not None
        self._preempt_sock = tune(socket.create_connection(self._address, timeout=timeout), self.link_timeout)
        self._preempt_sock.settimeout(None)
        self.path.set_channel(CHAN_PREEMPT, self._preempt_sock)

    def _start_over(self) -> None:
        """A fresh migration stream with the same stopped guest: header, setup,
        discards and PACKAGED with the saved device state, then the background
        stream of every page."""
        self._reconnect_main()
        self.path.mark_all_dirty()
        self.path.canonicalize()
        self._send(self._preamble())
        if self.preempt:
            self._connect_preempt(self.reconnect_timeout)
        self._start_return_path()
        self._send(self._switch_events)
        self.result.restarts += 1

    def _next_rp_event(self, layout: wire.RamLayout | None = None) -> wire.WireEvent:
        """One return-path message, decoded from exactly its bytes in the C buffer.

        A fresh decoder each time: the bytes after this message may be page
        requests that the C loop serves.
        """
        return next(decoded_items(self.path.rp, wire.ReturnPathDecoder(layout=layout)))  # type: ignore[no-any-return]

    @staticmethod
    def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection(address)
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _set_status(self, status: str) -> None:
        self.result.status = status
        if self._on_status is not None:
            self._on_status(status)

    def set_bandwidth_cap(self, bytes_per_second: int) -> None:
        """Change the background stream's cap at any time (0 = none)."""
        self.path.configure(preempt=self.preempt, bandwidth_cap=bytes_per_second)

    def snapshot(self) -> dict[str, object]:
        """Live figures, cheap to take at any time (C counters)."""
        c = self.path.counters()
        return {"status": self.result.status, "dirty_pages": self.path.dirty_pages(),
                "total_pages": sum(b.used_length for b in self.memory) // TARGET_PAGE_SIZE,
                "downtime_ns": self.result.downtime_ns, "discard_ranges": self._discard_ranges,
                "recoveries": self.result.recoveries, "paused_ns": self.result.paused_ns, **c}

    # -- the stream -------------------------------------------------------------

    def _send(self, events: list[wire.WireEvent]) -> None:
        self.path.write(CHAN_MAIN, b"".join(wire.encode(e) for e in events))

    def _preamble(self) -> list[wire.WireEvent]:
        summary = 0
        for b in self.memory:
            summary |= b.page_size
        entries = tuple(
            wire.RamBlockEntry(idstr=b.idstr, used_length=b.used_length,
                               page_size=b.page_size if b.page_size != TARGET_PAGE_SIZE else None)
            for b in self.memory
        )
        total = sum(b.used_length for b in self.memory)
        return [
            wire.StreamHeader(),
            wire.Configuration(machine_type=MACHINE_TYPE),
            wire.OpenReturnPath(),
            wire.Ping(value=1),
            wire.PostcopyAdvise(pagesize_summary=summary, target_page_size=TARGET_PAGE_SIZE),
            wire.SectionStart(section_id=RAM_SECTION_ID, idstr="ram", instance_id=0, version_id=4),
            wire.RamSetup(total_bytes=total, blocks=entries),
            wire.RamEos(),
            wire.SectionFooter(section_id=RAM_SECTION_ID),
        ]

    def _switchover(self) -> None:
        """Stop the guest and hand it over: the downtime is from here to PONG 3."""
        self.result.stopped_ns = time.monotonic_ns()
        self.guest.stop()
        state = self.guest.save_state()
        self.path.mark_all_dirty()          # immediate postcopy: nothing was sent before the switch
        self.path.canonicalize()
        events: list[wire.WireEvent] = []
        for b in self.memory:
            ranges = [(0, b.used_length)]
            for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
                self._discard_ranges += len(ranges[i:i + MAX_DISCARDS_PER_COMMAND])
                events.append(wire.PostcopyRamDiscard(idstr=b.idstr, ranges=tuple(ranges[i:i + MAX_DISCARDS_PER_COMMAND])))
        events.append(wire.Ping(value=2))
        device = wire.DeviceSection(
            section_id=DEVICE_SECTION_ID, idstr=DEVICE_IDSTR, instance_id=0, version_id=DEVICE_VERSION,
            payload=encode_device_state(self.spec, state, self.result.stopped_ns),
        )
        events.append(wire.Packaged(events=(
            wire.PostcopyListen(), device, wire.Ping(value=3), wire.PostcopyRun())))
        events.append(wire.Ping(value=4))
        self._switch_events = events
        try:
            self._send(events)
        except ConnectionError as exc:
            # The guest is stopped here: from now on a broken link is paused
            # and recovered (or the stream sent again), never a failure.
            self._link_error = f"switch to postcopy: {exc}"
            self._break_link()

    def _ending(self) -> list[wire.WireEvent]:
        return [
            wire.SectionEnd(section_id=RAM_SECTION_ID),
            wire.RamEos(),
            wire.SectionFooter(section_id=RAM_SECTION_ID),
            wire.EndOfStream(),
        ]

    def _hash_all(self) -> None:
        for b in self.memory:
            self.result.hashes[b.idstr] = hash_pages(b)

    # -- the return path ----------------------------------------------------------

    def _start_return_path(self) -> None:
        self._rp_thread = threading.Thread(target=self._serve_return_path, name="source-rp", daemon=True)
        self._rp_thread.start()

    def _serve_return_path(self) -> None:
        urgent_priority()
        try:
            while True:
                code = self.path.serve_return_path()
                if code == SourcePath.RP_BAD_REQUEST:
                    self.result.bad_requests += 1
                    log.warning("destination sent a bad page request: %s", self.path.last_error())
                    continue
                if code == SourcePath.RP_EOF:
                    if not self._shut.is_set():
                        self._link_error = "return path closed"
                    return
                if code != SourcePath.RP_CONTROL:
                    return
                event = self._next_rp_event()
                match event:
                    case wire.Pong(value=v) if v & PC_HEARTBEAT_MASK == PC_HEARTBEAT_PING:
                        self._last_heartbeat_pong = v & ~PC_HEARTBEAT_MASK
                        self._last_pong_ns = time.monotonic_ns()
                    case wire.Pong(value=v):
                        with self._pong_cv:
                            self._pongs[v] = time.monotonic_ns()
                            if v == 3 and not self.result.downtime_ns:
                                self.result.downtime_ns = self._pongs[v] - self.result.stopped_ns
                            self._pong_cv.notify_all()
                    case wire.Shut(value=v):
                        self._shut_value_ok = v == 0
                        if v != 0:
                            self._link_error = f"the destination shut down with error {v}"
                        self._shut.set()
                        return
                    case _:
                        log.info("return path: %s", event)
        except (DataPathError, wire.RemoteProtocolError, OSError) as exc:
            if not self._shut.is_set():
                self._link_error = f"return path: {exc}"
