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
from ._datapath import CHAN_MAIN, CHAN_PREEMPT, DataPathError, SourcePath, hash_pages
from .guest import Guest
from .spec import DEVICE_IDSTR, DEVICE_VERSION, GuestSpec, encode_device_state

__all__ = ["Source", "SourceError", "SourceResult"]

log = logging.getLogger("postcopy.source")

RAM_SECTION_ID = 2
DEVICE_SECTION_ID = 3
MACHINE_TYPE = "postcopy-builtin-1"
MAX_DISCARDS_PER_COMMAND = 12      # QEMU's limit
TARGET_PAGE_SIZE = 4096


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
    error: str | None = None


class Source:
    """Migrate ``memory`` (with its running ``guest``) to a destination."""

    def __init__(self, spec: GuestSpec, memory: GuestMemory, guest: Guest, *, preempt: bool = True,
                 bandwidth_cap: int = 0, verify: bool = False,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self._on_status = on_status
        self.memory = memory
        self.guest = guest
        self.preempt = preempt
        self.verify = verify
        self.path = SourcePath(list(memory), RAM_SECTION_ID)
        self.path.configure(preempt=preempt, bandwidth_cap=bandwidth_cap)
        self.result = SourceResult()
        self._pongs: dict[int, int] = {}
        self._pong_cv = threading.Condition()
        self._shut = threading.Event()
        self._rp_error: BaseException | None = None

    def migrate(self, address: tuple[str, int], *, connect_timeout: float = 0.0,
                switchover: threading.Event | None = None) -> SourceResult:
        """Run the whole migration.

        ``connect_timeout`` waits for a destination that is still starting;
        ``switchover``, when given, holds the switch to postcopy until it is set
        (QMP's migrate-start-postcopy); otherwise the switch is immediate.
        """
        self._set_status("setup")
        main = self._connect(address, connect_timeout)
        self.result.started_ns = time.monotonic_ns()
        main.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        preempt = None
        rp_thread = None
        try:
            self.path.set_channel(CHAN_MAIN, main)
            self.path.set_return_path(main)
            self._send(self._preamble())
            if self.preempt:
                # 7.2 style: connect preempt at once; the destination tells it from main by order.
                preempt = socket.create_connection(address)
                preempt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.path.set_channel(CHAN_PREEMPT, preempt)
            rp_thread = threading.Thread(target=self._serve_return_path, name="source-rp", daemon=True)
            rp_thread.start()
            self._set_status("active")
            if switchover is not None:
                switchover.wait()
            self._switchover()
            hasher = threading.Thread(target=self._hash_all, name="source-hash", daemon=True) if self.verify else None
            if hasher:
                hasher.start()
            self._set_status("postcopy-active")
            if self.path.run_bulk() != SourcePath.DONE:
                raise SourceError("stopped", "background stream stopped before every page was sent")
            self._send(self._ending())
            if preempt is not None:
                self.path.write(CHAN_PREEMPT, (0x10).to_bytes(8, "big"))   # EOS: a 7.2 destination needs it
            if hasher:
                hasher.join()
            self._wait_shut()
            self.result.counters = self.path.counters()
            self._set_status("completed")
        except (DataPathError, SourceError, OSError) as exc:
            self.result.error = str(exc)
            self._set_status("failed")
            raise
        finally:
            self.result.finished_ns = time.monotonic_ns()
            self.result.counters = self.path.counters()
            self.path.stop()
            for s in (main, preempt):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if rp_thread is not None:
                rp_thread.join(timeout=10)
            main.close()
            if preempt is not None:
                preempt.close()
        return self.result

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
                "downtime_ns": self.result.downtime_ns, **c}

    # -- the stream -------------------------------------------------------------

    def _send(self, events: list[wire.Event]) -> None:
        self.path.write(CHAN_MAIN, b"".join(wire.encode(e) for e in events))

    def _preamble(self) -> list[wire.Event]:
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
        events: list[wire.Event] = []
        for b in self.memory:
            ranges = [(0, b.used_length)]
            for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
                events.append(wire.PostcopyRamDiscard(idstr=b.idstr, ranges=tuple(ranges[i:i + MAX_DISCARDS_PER_COMMAND])))
        events.append(wire.Ping(value=2))
        device = wire.DeviceSection(
            section_id=DEVICE_SECTION_ID, idstr=DEVICE_IDSTR, instance_id=0, version_id=DEVICE_VERSION,
            payload=encode_device_state(self.spec, state, self.result.stopped_ns),
        )
        events.append(wire.Packaged(events=(
            wire.PostcopyListen(), device, wire.Ping(value=3), wire.PostcopyRun())))
        events.append(wire.Ping(value=4))
        self._send(events)

    def _ending(self) -> list[wire.Event]:
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

    def _serve_return_path(self) -> None:
        dec = wire.ReturnPathDecoder()
        try:
            while True:
                code = self.path.serve_return_path()
                if code == SourcePath.RP_BAD_REQUEST:
                    self.result.bad_requests += 1
                    log.warning("destination sent a bad page request: %s", self.path.last_error())
                    continue
                if code != SourcePath.RP_CONTROL:
                    return
                # one whole message, exactly (RECV_BITMAP bodies are handled in recovery)
                self.path.rp_fill(4)
                head = self.path.rp_peek()
                length = int.from_bytes(head[2:4], "big")
                self.path.rp_fill(4 + length)
                frame = self.path.rp_peek()[: 4 + length]
                dec.receive_data(frame)
                event = dec.next_event()
                self.path.rp_consume(4 + length)
                match event:
                    case wire.Pong(value=v):
                        with self._pong_cv:
                            self._pongs[v] = time.monotonic_ns()
                            if v == 3:
                                self.result.downtime_ns = self._pongs[v] - self.result.stopped_ns
                            self._pong_cv.notify_all()
                    case wire.Shut(value=v):
                        if v != 0:
                            self._rp_error = SourceError("destination_failed", f"the destination shut down with error {v}")
                        self._shut.set()
                        return
                    case _:
                        log.info("return path: %s", event)
        except (DataPathError, wire.RemoteProtocolError, OSError) as exc:
            if not self._shut.is_set():
                self._rp_error = exc
        finally:
            self._shut.set()

    def _wait_shut(self) -> None:
        self._shut.wait()
        if self._rp_error is not None:
            raise SourceError("return_path", f"return path: {self._rp_error}")
