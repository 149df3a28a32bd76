"""The destination shell: sockets, threads, userfaultfd and the C data path
around a :class:`DestinationSession`.

Threads (the per-page work of each is C, with the GIL released):

* the caller of :meth:`Destination.serve` runs the connection loop: it accepts,
  peeks each new connection's first byte and wakes the session's timers;
* one reader per main channel: Python decodes the control items with the
  sans-IO codec; after RUN the C receiver places pages and hands back only
  control items;
* the C receiver of the preempt channel; the C fault service (uffd -> REQ_PAGES);
* whatever the memory owner runs (the built-in guest's vCPUs), which blocks in
  the kernel on missing pages.

Every input goes to the session under one lock, and its actions are carried out
under it, in order; none of them waits for another thread (a retired channel's
C objects are kept until :meth:`close`), so no thread ever waits on the lock
while holding something the lock's owner needs. Python never touches guest
memory once it is registered with userfaultfd.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from uffd import Feature, RamBlock, Userfaultfd

from . import wire
from ._datapath import RX_MAIN, RX_PREEMPT, DataPathError, DestinationPath, Receiver, decoded_items
from ._link import (
    BACKGROUND_NICE,
    SWITCH_NICE,
    bound_bulk_buffers,
    close_after_peer,
    hold_gc,
    name_os_thread,
    one_malloc_arena,
    quick_gil_handoff,
    set_recv_timeout,
    set_thread_nice,
    shutdown_quietly,
    thread_nice,
    touch_stack,
    tune,
    urgent_priority,
)
from .owner import DestinationMemory
from .session import (
    SWITCH_PRELUDE_PINGS,
    SWITCH_SPIN_SECONDS,
    AcceptPreempt,
    Action,
    AnswerBitmapRequest,
    AttachReturnPath,
    BreakLink,
    ChannelEnded,
    ChannelStats,
    CheckComplete,
    CloseConnection,
    CollectConnections,
    ConnectionAccepted,
    ConnectionsCollected,
    ConnectionClosed,
    ConnectionSpoke,
    DataPathFailed,
    DestinationSession,
    Discard,
    Finish,
    HoldStream,
    Input,
    MigrationFailed,
    MigrationStats,
    MigrationStatus,
    PauseRequested,
    PlacePages,
    PrepareMemory,
    ReceivePages,
    ReceiveStream,
    RecoverRequested,
    RegisterMemory,
    ResendRequests,
    ResetBeforeRun,
    ResumeStream,
    Send,
    SendReturnPath,
    StartGuest,
    StartPreemptReceiver,
    StatusChanged,
    StreamChecked,
    StreamItem,
    rehearse_switch_once,
)

__all__ = ["Destination"]

log = logging.getLogger("postcopy.dest")
#: a command's first byte (a module constant: 3.11's enum class lookups are slow, and the
#: switch's commands are read inside the downtime)
_COMMAND_BYTE = int(wire.SectionType.COMMAND)

#: How long the accepting thread waits for a new preempt channel's thread to be ready (its stack
#: written); a machine too loaded for that goes on without it.
PREEMPT_THREAD_START_WAIT_S = 1.0

#: How long a completed migration waits for the source to close its connections first (QEMU
#: closes them once it has read SHUT and its last write is done: a few ms).
PEER_CLOSE_WAIT_S = 1.0
#: After a precopy's EOF, how long the first byte of a VMDESCRIPTION may take (QEMU writes it in
#: the same buffer as EOF; a source that sends none costs this much before SHUT)
VMDESC_WAIT_S = 0.2
_PRECOPY = (MigrationStatus.SETUP, MigrationStatus.ACTIVE)


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    rx: Receiver | None = None
    pages: bool = False         # the C receiver places pages; only control items come back
    postcopy: bool = False      # ... and the guest runs here: they compete with its faults
    lowered: bool = False       # its reader runs at background priority (set by the reader only)
    preempt: bool = False       # the preempt channel: its receiver waits for LISTEN (``listen``)
    go: threading.Event = field(default_factory=threading.Event)    # cleared: the reader holds
    listen: tuple[int, int] | None = None   # a preempt channel's pipe, written at LISTEN (or its end)
    started: threading.Event = field(default_factory=threading.Event)   # its preempt thread's stack is written
    gc_held: bool = False       # its reader holds the garbage collector off (the switch, up to RUN)


class Destination:
    """Serve one incoming migration into the memory of ``owner``."""

    def __init__(self, owner: DestinationMemory, *, preempt: bool = True, verify: bool = False,
                 on_status: Callable[[str], None] | None = None, link_timeout: float = 3.0,
                 recover_timeout: float = 120.0, fail_fast: bool = False,
                 max_packaged: int | None = None) -> None:
        self.owner = owner
        self.preempt = preempt
        self.verify = verify
        self.link_timeout = link_timeout
        self._on_status = on_status
        self.session = DestinationSession(preempt=preempt, link_timeout=link_timeout,
                                          recover_timeout=recover_timeout,
                                          block_page_sizes=owner.block_page_sizes(), fail_fast=fail_fast)
        #: the most a PACKAGED (the device state at the switch) may buffer per connection
        self.max_packaged = max_packaged or wire.DEFAULT_MAX_PACKAGED_LENGTH
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._conns: dict[int, _Conn] = {}
        self._unclassified: dict[int, socket.socket] = {}
        self._next_conn = 1
        self._path: DestinationPath | None = None
        self._registered = False       # LISTEN registered the blocks (a precopy-only finish never does)
        self._early_return_path: socket.socket | None = None     # OPEN_RETURN_PATH comes before the RAM setup
        self._hold_replies = False      # set under the lock, for one input (see _control)
        self._held_replies = b""
        self._uffd: Userfaultfd | None = None
        self._fault_stop: tuple[int, int] | None = None
        self._fault_go: tuple[int, int] | None = None      # written at LISTEN: the idle fault service starts serving
        self._retired: list[object] = []        # C objects and fds kept until close(): threads may still be in them
        self._threads: list[threading.Thread] = []
        self._channel_totals = {"main": ChannelStats(), "preempt": ChannelStats()}
        self._requests_resent = 0
        self._channel_rx: dict[str, Receiver | None] = {"main": None, "preempt": None}
        self._request_conn: int | None = None   # page requests go on this preempt channel's way back
        self._wake_r, self._wake_w = os.pipe()
        self._finish: Finish | None = None
        self._done = threading.Event()
        self.latencies_ns: list[int] = []
        self._latency_lock = threading.Lock()
        self._started_ns = time.monotonic_ns()
        self._guest_started_ns = 0
        self._vcpus_unregistered = False     # the guest started, its vCPU ids not yet given to the fault path
        self._nice_after_switch: int | None = None     # RUN's thread raised to SWITCH_NICE: its nice after
        self._finished_ns = 0
        self._counters_at_end: MigrationStats | None = None
        rehearse_switch_once(self.preempt)   # the switch's Python runs specialized, not for the first time, inside the downtime
        one_malloc_arena()  # no thread makes (and first touches) its own malloc arena inside the switch

    # -- the migration ----------------------------------------------------------------------

    @property
    def path(self) -> DestinationPath:
        if self._path is None:
            raise RuntimeError("no RAM setup received yet")
        return self._path

    @property
    def memory(self) -> list[RamBlock]:
        return list(self.owner.ram_blocks())

    @property
    def guest(self) -> object:
        return getattr(self.owner, "guest", None)

    def serve(self, listener: socket.socket) -> MigrationStats:
        """Accept the channels on ``listener`` and run the migration to its end.

        A channel that fails after RUN pauses the migration (faulting guest
        threads stay blocked, nothing received is lost) and the source's
        recovery is awaited on ``listener`` (or on the address given to
        :meth:`recover`). Raises :class:`MigrationFailed` if the migration fails.
        """
        listener.setblocking(False)     # accepted by the connection loop and by CollectConnections
        self._listeners = [listener]
        self._feed(None)
        try:
            while not self._done.is_set():
                self._connection_loop_once()
        except Exception as exc:
            # a bug here must still end as "failed" with its error, never a silent "setup"
            log.exception("the destination's connection loop failed")
            self._feed(DataPathFailed("internal", f"connection loop: {exc!r}"))
            raise
        finally:
            self._teardown()
        assert self._finish is not None
        if self._finish.error is not None:
            raise self._finish.error
        return self.result

    def _connection_loop_once(self) -> None:
        with self._lock:        # readers' actions change these dicts: list them under the lock
            timer = self.session.get_timer()
            watched: list[int | socket.socket] = [self._wake_r, *self._listeners, *self._unclassified.values()]
        wait = None if timer is None else max(0.0, timer - time.monotonic())
        try:
            ready, _, _ = select.select(watched, [], [], wait)
        except (OSError, ValueError):       # a listener closed under us (migrate-recover)
            self._listeners = [s for s in self._listeners if s.fileno() >= 0]
            return
        for r in ready:
            if r == self._wake_r:
                os.read(self._wake_r, 4096)
            elif isinstance(r, socket.socket) and r in self._listeners:
                self._accept(r)
            elif isinstance(r, socket.socket):
                self._peek(r)
        with self._lock:
            timer = self.session.get_timer()
        if timer is not None and timer <= time.monotonic():
            self._feed_timer()

    def _accept(self, listener: socket.socket) -> None:
        # accepted and reported under one hold of the lock: a connection CollectConnections
        # does not find waiting on the listener is one the session knows of already
        with self._lock:
            try:
                sock, peer = listener.accept()
            except OSError:     # taken by CollectConnections meanwhile, or the listener closed
                return
            self._feed_locked(ConnectionAccepted(self._adopt(sock), str(peer[0])))

    def _accept_waiting(self) -> tuple[tuple[int, str], ...]:
        """Every connection waiting on a listener, accepted now (the lock is held)."""
        accepted = []
        for listener in self._listeners:
            while True:
                try:
                    sock, peer = listener.accept()
                except OSError:
                    break
                accepted.append((self._adopt(sock), str(peer[0])))
        return tuple(accepted)

    def _adopt(self, sock: socket.socket) -> int:
        """An accepted socket's connection number (the lock is held)."""
        sock.setblocking(True)
        tune(sock, self.link_timeout)
        c = _Conn(sock)
        c.go.set()
        conn = self._next_conn
        self._next_conn += 1
        self._conns[conn] = c
        self._unclassified[conn] = sock
        return conn

    def _peek(self, sock: socket.socket) -> None:
        with self._lock:
            conn = next((c for c, s in self._unclassified.items() if s is sock), None)
            if conn is None:
                return
            del self._unclassified[conn]
        try:
            first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            with self._lock:
                if conn in self._conns:
                    self._unclassified[conn] = sock
            return
        except OSError as exc:
            self._feed(ConnectionClosed(conn, str(exc)))
            return
        self._feed(ConnectionSpoke(conn, first) if first else ConnectionClosed(conn, "closed before saying anything"))

    # -- feeding the session --------------------------------------------------------------------

    def _feed(self, event: Input | None, *, hold_replies: bool = False) -> None:
        """Hand one input (None: start) to the session and carry out its actions.
        ``hold_replies``: its return-path writes wait for the next one (see :meth:`_control`)."""
        with self._lock:
            self._feed_locked(event, hold_replies=hold_replies)

    def _feed_locked(self, event: Input | None, *, hold_replies: bool = False) -> None:
        before = self.session.get_timer()
        now = time.monotonic()
        self._hold_replies = hold_replies
        try:
            self._carry_out(self.session.start(now) if event is None else self.session.handle(event, now))
        finally:
            self._hold_replies = False
        after = self.session.get_timer()
        if after is not None and (before is None or after < before):
            os.write(self._wake_w, b"t")       # the connection loop sleeps until the earlier timer

    def _feed_timer(self) -> None:
        with self._lock:
            self._carry_out(self.session.handle_timer(time.monotonic()))

    def _carry_out(self, actions: list[Action]) -> None:
        pending = list(actions)
        try:
            self._carry_out_all(pending)
        finally:
            if self._nice_after_switch is not None:
                set_thread_nice(self._nice_after_switch)     # PONG 3 is written
                self._nice_after_switch = None
            if self._vcpus_unregistered:
                # after the batch (PONG 3 is in it): the fault path learns the fresh vCPU
                # threads' ids (per-vCPU blocktime) once they have run, not inside the downtime
                self._vcpus_unregistered = False
                self.path.set_vcpu_threads(list(self.owner.vcpu_thread_ids()))

    def _carry_out_all(self, pending: list[Action]) -> None:
        while pending:
            action = pending.pop(0)
            conn = getattr(action, "conn", None)
            try:
                follow = self._do(action)
            except MigrationFailed as exc:
                follow = DataPathFailed(exc.kind, str(exc), conn)
            except DataPathError as exc:
                follow = DataPathFailed(exc.kind, str(exc), conn)
            except OSError as exc:
                follow = DataPathFailed("uffd", f"{type(action).__name__}: {exc}", conn)
            if follow is not None:
                pending[:0] = self.session.handle(follow, time.monotonic())

    def _do(self, action: Action) -> Input | None:
        match action:
            case ReceiveStream(conn=conn, recovery=recovery):
                self._unclassified.pop(conn, None)
                c = self._conns[conn]
                bound_bulk_buffers(c.sock, max(self.session.block_page_sizes.values(), default=wire.DEFAULT_TARGET_PAGE_SIZE))
                if recovery:
                    set_recv_timeout(c.sock, self.link_timeout)
                layout = self.session.layout
                section = layout.section_id if recovery and layout is not None and layout.section_id else 0
                c.rx = Receiver(self._path if recovery else None, c.sock, RX_MAIN, section)
                self._start(f"dest-main-{conn}", self._read_main, conn, c.rx, recovery)
            case CollectConnections():
                return ConnectionsCollected(self._accept_waiting())
            case HoldStream(conn=conn) if conn in self._conns:
                self._conns[conn].go.clear()
            case ResumeStream(conn=conn) if conn in self._conns:
                self._conns[conn].go.set()
            case AcceptPreempt(conn=conn):
                self._unclassified.pop(conn, None)
                if conn in self._conns:
                    # its thread starts now and waits; its receiver is built as soon as the memory
                    # is known: the switch (LISTEN) only lets it go
                    c = self._conns[conn]
                    c.preempt = True
                    c.listen = os.pipe()
                    self._retired.append(c.listen)      # closed with the destination, after its thread
                    if self._path is not None:
                        c.rx = Receiver(self._path, c.sock, RX_PREEMPT, 0)
                    self._start(f"dest-preempt-{conn}", self._read_preempt, conn, c)
                    # its first stack pages (1-2 ms on a lazily backed host) before what follows
                    # here, READY's PONG: not beside the source guest's stop
                    c.started.wait(PREEMPT_THREAD_START_WAIT_S)
            case StartPreemptReceiver(conn=conn, requests=requests) if conn in self._conns:
                c = self._conns[conn]
                if c.rx is None:
                    c.rx = Receiver(self.path, c.sock, RX_PREEMPT, 0)
                self._channel_rx["preempt"] = c.rx
                if requests:
                    self._request_conn = conn
                    self.path.set_request_channel(c.sock)
                if c.listen is not None:
                    os.write(c.listen[1], b"g")
            case ReceivePages(conn=conn, silence_breaks=silence_breaks) if conn in self._conns:
                c = self._conns[conn]
                c.pages = True
                c.postcopy = self.session.status is MigrationStatus.POSTCOPY_ACTIVE
                self._channel_rx["main"] = c.rx
                if silence_breaks:
                    set_recv_timeout(c.sock, self.link_timeout)     # silence on main = a broken link
            case CloseConnection(conn=conn, reply=reply):
                self._unclassified.pop(conn, None)
                c2 = self._conns.pop(conn, None)
                if c2 is not None:
                    c2.go.set()
                    if c2.listen is not None:
                        os.write(c2.listen[1], b"x")    # a preempt thread still waiting for LISTEN ends
                if c2 is not None and c2.rx is not None:
                    self._retire_channel(conn, c2)  # its reader thread may still be in recv(): no close yet
                    shutdown_quietly(c2.sock)
                    self._retired.append(c2.sock)
                elif c2 is not None:
                    _close_with_reply(c2.sock, reply)
            case SendReturnPath(data=data):
                if self._hold_replies:
                    self._held_replies += data
                    return None
                data, self._held_replies = self._held_replies + data, b""
                try:
                    if self._path is not None:
                        self._path.send(data)       # shares a lock with the fault service's requests
                    elif self._early_return_path is not None:
                        self._early_return_path.sendall(data)   # no fault service before the RAM setup
                except OSError as exc:
                    log.info("return path write failed: %s", exc)
            case Send(conn=conn, data=data):
                c3 = self._conns.get(conn) if conn is not None else None
                if c3 is not None:
                    try:
                        c3.sock.sendall(data)
                    except OSError as exc:
                        return ConnectionClosed(conn, f"write failed: {exc}") if conn is not None else None
            case AttachReturnPath(conn=conn):
                c4 = self._conns.get(conn) if conn is not None else None
                if self._path is not None:
                    self._path.set_return_path(c4.sock if c4 is not None else None)
                elif c4 is not None:
                    self._early_return_path = c4.sock
            case AnswerBitmapRequest(conn=conn, idstr=idstr):
                bitmap = self.path.received[self.path.index(idstr)].to_le_bytes()
                c5 = self._conns.get(conn)
                if c5 is not None:
                    try:
                        c5.sock.sendall(wire.encode(wire.RecvBitmap(idstr=idstr, bitmap=bitmap)))
                    except OSError as exc:
                        return ConnectionClosed(conn, f"write failed: {exc}")
            case ResendRequests():
                try:
                    resent = self.path.resend_requests()
                    self._requests_resent += resent
                    log.info("recovered: %d outstanding page requests sent again", resent)
                except ConnectionError as exc:
                    log.info("resending page requests failed: %s", exc)
            case PrepareMemory(layout=layout):
                blocks = self.owner.provide_blocks(layout)
                self._path = DestinationPath(list(blocks), verify=self.verify)
                if self._early_return_path is not None:
                    self._path.set_return_path(self._early_return_path)
                self._prepare_faults()
                for c6 in self._conns.values():
                    if c6.rx is not None and c6.rx.path is None:
                        c6.rx.attach(self._path)
                        c6.rx.ram_section_id = layout.section_id or 0
                    elif c6.preempt and c6.rx is None:
                        c6.rx = Receiver(self._path, c6.sock, RX_PREEMPT, 0)   # let go at LISTEN
            case PlacePages(conn=conn, pages=pages) if conn in self._conns:
                rx = self._conns[conn].rx
                assert rx is not None
                rx.place(bytes(pages.records), bytes(pages.buffer))
            case Discard(block_index=index, ranges=ranges):
                # one C call for the command's ranges (after precopy, up to 12 a command, hundreds
                # in all, inside the downtime): a range with nothing placed is only marked missing
                self.path.discard_ranges(index, ranges)
            case RegisterMemory():
                self._register()
            case StartGuest(device_sections=sections, configuration=configuration, in_package=in_package):
                self.owner.load_device_state(sections, configuration=configuration, in_package=in_package)
                # from the vCPUs' release to PONG 3's write (this batch) above the fault path,
                # which their first faults wake at once (SWITCH_NICE)
                self._nice_after_switch = thread_nice()
                set_thread_nice(SWITCH_NICE)
                self.owner.start()
                self._guest_started_ns = time.monotonic_ns()
                self._vcpus_unregistered = True
            case BreakLink():
                for c7 in self._conns.values():
                    if c7.rx is not None:
                        c7.rx.stop()
                    shutdown_quietly(c7.sock)
            case ResetBeforeRun():
                self._reset_before_run()
            case CheckComplete():
                return StreamChecked(self.path.total_pages() - self.path.received_pages())
            case HoldStream() | ResumeStream() | StartPreemptReceiver() | ReceivePages() | PlacePages():
                pass        # its connection was closed by an earlier action of the same batch
            case StatusChanged(status=status):
                self._status_changed(status)
            case Finish():
                self._end(action)
            case _:
                raise AssertionError(f"the destination shell cannot carry out {action!r}")
        return None

    # -- channels -------------------------------------------------------------------------------

    def _start(self, name: str, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=self._guarded, args=(target, *args), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guarded(self, target: Callable[..., None], *args: object) -> None:
        """Any failure of a thread ends the migration as failed, never a silent hang."""
        name_os_thread(threading.current_thread().name)
        try:
            target(*args)
        except Exception as exc:
            log.exception("%s failed", threading.current_thread().name)
            self._feed(DataPathFailed("internal", f"{threading.current_thread().name}: {exc!r}"))

    def _read_main(self, conn: int, rx: Receiver, recovery: bool) -> None:
        """A main channel: decode items for the session until it says pages go to C.

        Up to RUN this thread runs above the guest (urgent priority): nothing here
        competes with it for anything that matters more, and the switch (discards,
        PACKAGED, LISTEN, PONG 3, RUN) is the guest's downtime. Once the guest runs
        here, it places bulk pages below the fault path (background priority). Until
        then the GIL comes back to it quickly too (:func:`quick_gil_handoff`)."""
        urgent_priority()
        touch_stack()
        quick_gil_handoff(True)
        c = self._conns.get(conn)
        try:
            dec = wire.MainStreamDecoder(recovery=recovery, layout=self.session.layout,
                                         block_page_sizes=self.session.block_page_sizes,
                                         max_packaged_length=self.max_packaged)
            for event in decoded_items(rx.input, dec):
                self._hold_gc_for_switch(c, event)
                self._feed(StreamItem(conn, event))
                self._spin_if_switch_follows(rx, event)
                if c is not None:
                    c.go.wait()     # the session held this stream (PACKAGED waits for the preempt channel)
                if isinstance(event, wire.ConnectionClosed) or c is None or conn not in self._conns:
                    return
                if c.pages:
                    break
            else:
                return
            self._read_pages(conn, rx, c)
        except DataPathError as exc:
            self._channel_error(conn, exc)
        except wire.RemoteProtocolError as exc:
            self._feed(DataPathFailed(exc.kind, str(exc), conn))
        except OSError as exc:      # a reset, or the receive timeout of a silent peer
            self._feed(ConnectionClosed(conn, str(exc)))
        finally:
            if c is None or not c.lowered:
                quick_gil_handoff(False)
            self._release_gc(c)

    def _read_pages(self, conn: int, rx: Receiver, c: _Conn) -> None:
        while True:
            nice = None
            if c.postcopy and not c.lowered:
                c.lowered = True
                quick_gil_handoff(False)
                self._release_gc(c)
                rx.input.spin_for(0)    # the guest runs here: no more waiting on a CPU
                nice = BACKGROUND_NICE  # the guest runs here: bulk pages go below the fault path
            # up to RUN, built while the channel is quiet: not between the switch's bytes and PONG 3
            # (after it, not at background priority while holding the GIL for nothing)
            dec = None if c.lowered else self._control_decoder()
            code = rx.run(nice)     # lowered in C: this thread never holds the GIL at background priority
            if code == Receiver.CONTROL:
                if not self._control(conn, rx, c, dec or self._control_decoder()):
                    return
            elif code == Receiver.EOF:
                self._feed(ConnectionClosed(conn, "main channel closed before the end of the stream"))
                return
            else:
                self._feed(ConnectionClosed(conn, "main channel stopped"))
                return

    @staticmethod
    def _hold_gc_for_switch(c: _Conn | None, event: wire.WireEvent) -> None:
        """The switch's first command (a discard, or PACKAGED when nothing is discarded): no
        garbage collection from here to RUN (see :func:`hold_gc`)."""
        if c is not None and not c.gc_held and isinstance(event, wire.PostcopyRamDiscard | wire.Packaged):
            c.gc_held = True
            hold_gc(True)

    @staticmethod
    def _release_gc(c: _Conn | None) -> None:
        if c is not None and c.gc_held:
            c.gc_held = False
            hold_gc(False)

    @staticmethod
    def _spin_if_switch_follows(rx: Receiver, event: wire.WireEvent) -> None:
        """After a PING our source may stop its guest on (its READY or drain PING), the switch's
        bytes may come within ms: the reader waits for them on its CPU, not asleep."""
        if isinstance(event, wire.Ping) and event.value in SWITCH_PRELUDE_PINGS:
            rx.input.spin_for(SWITCH_SPIN_SECONDS)

    def _control_decoder(self) -> wire.MainStreamDecoder:
        return wire.MainStreamDecoder(recovery=True, layout=self.session.layout,
                                      block_page_sizes=self.session.block_page_sizes,
                                      max_packaged_length=self.max_packaged)

    def _control(self, conn: int, rx: Receiver, c: _Conn, dec: wire.MainStreamDecoder) -> bool:
        """The C receiver stopped at a control item: decode it and every command right
        behind it with ``dec`` (fresh; the switch's discards, PINGs and PACKAGED come
        together), feeding each to the session in order; False: the channel is done."""
        items = decoded_items(rx.input, dec)
        try:
            while True:
                event = next(items)
                if isinstance(event, wire.EndOfStream) and self.session.status in _PRECOPY:
                    self._read_vmdescription(c, rx, items)
                self._hold_gc_for_switch(c, event)
                more = rx.input.first_byte() == _COMMAND_BYTE
                # A PING's PONG with more commands right behind it goes out with the next reply of
                # the run (the switch: PONG 2 with PONG 3): in one process with the source, its
                # return-path thread would wake for it and take the GIL in the middle of the switch.
                self._feed(StreamItem(conn, event), hold_replies=more and isinstance(event, wire.Ping))
                self._spin_if_switch_follows(rx, event)
                if isinstance(event, wire.EndOfStream | wire.ConnectionClosed) or conn not in self._conns:
                    return False
                if not c.go.is_set():
                    self._send_held_replies()
                    c.go.wait()     # the session held this stream (PACKAGED waits for the preempt channel)
                if not more:
                    return True     # pages (or nothing yet): the C loop goes on
        finally:
            self._send_held_replies()

    def _read_vmdescription(self, c: _Conn, rx: Receiver, items: Iterator[wire.WireEvent]) -> None:
        """A precopy's EOF: read the VMDESCRIPTION that QEMU writes after it before the session
        answers SHUT, as QEMU's own destination does. QEMU 7.2's return-path thread closes the
        connection it shares with the stream when SHUT comes, so a SHUT sent while the
        description (tens of KiB of JSON) is still being written fails the migration there
        (``migration_completion_file_err``: one CI run, 2 of ~180 runs under load here).
        Nothing after EOF within ``VMDESC_WAIT_S``: the source sends none (``suppress-vmdesc``,
        our source)."""
        if rx.input.available() == 0:
            try:
                ready, _, _ = select.select([c.sock], [], [], VMDESC_WAIT_S)
            except (OSError, ValueError):
                return
            if not ready:
                return
        try:
            for event in items:
                if isinstance(event, wire.VmDescription | wire.ConnectionClosed):
                    return
        except (wire.RemoteProtocolError, DataPathError, OSError) as exc:
            # the stream is complete: what follows its EOF is QEMU's dump aid, no reason to fail
            log.warning("destination: after the stream's EOF: %s", exc)

    def _send_held_replies(self) -> None:
        with self._lock:
            if self._held_replies:
                self._carry_out([SendReturnPath(b"")])

    def _read_preempt(self, conn: int, c: _Conn) -> None:
        urgent_priority()
        touch_stack()
        c.started.set()
        if c.rx is None and c.listen is not None:
            # accepted before the RAM setup: its receiver is built at LISTEN (the byte stays for C)
            select.select([c.listen[0]], [], [])
        rx = c.rx
        if rx is None or c.listen is None or conn not in self._conns:
            return
        try:
            # LISTEN releases it in C: a thread released by a Python event needs the GIL first,
            # which the switch's thread holds up to RUN (traced: 150-170 us after LISTEN)
            code = rx.run_after(c.listen[0])
        except DataPathError as exc:
            if conn in self._conns:
                self._channel_error(conn, exc)
            return
        self._requests_back_on_return_path(conn)     # (ended: no more requests read there)
        if conn not in self._conns:
            return      # closed by the session (CloseConnection), which knows
        if code == Receiver.EOS:
            self._feed(ChannelEnded(conn))
        else:
            self._feed(ConnectionClosed(conn, "preempt channel closed without EOS" if code == Receiver.EOF
                                        else "preempt channel stopped"))

    def _channel_error(self, conn: int, exc: DataPathError) -> None:
        if exc.kind in ("io", "truncated"):
            self._feed(ConnectionClosed(conn, str(exc)))
        else:
            self._feed(DataPathFailed(exc.kind, str(exc), conn))

    def _requests_back_on_return_path(self, conn: int) -> None:
        """The preempt channel ``conn`` ended or is closing: page requests go on the return path
        again (before its socket closes: the fault service must never write to a closed fd)."""
        if self._request_conn == conn and self._path is not None:
            self._request_conn = None
            self._path.set_request_channel(None)

    def _retire_channel(self, conn: int, c: _Conn) -> None:
        if c.rx is None:
            return
        self._requests_back_on_return_path(conn)
        c.rx.stop()
        for name, rx in self._channel_rx.items():
            if rx is c.rx:
                n, z, b = rx.counters()
                self._channel_totals[name] += ChannelStats(n, z, b)
                self._channel_rx[name] = None
        self._retired.append(c.rx)

    # -- memory -----------------------------------------------------------------------------------

    def _prepare_faults(self) -> None:
        """At the RAM setup, long before the switch: the userfaultfd (nothing registered yet) and the
        fault service's thread, idle until LISTEN. LISTEN then only registers: no thread starts while
        the guest is stopped."""
        self._stop_fault_service()      # one prepared for an earlier RAM setup
        if self._uffd is not None:
            self._retired.append(self._uffd)
            self._uffd = None
        blocks = self.path.blocks
        if not self.path.remote:
            # (remote: another process's memory, registered by it with its own userfaultfd,
            # which the data path already uses)
            features = Feature.THREAD_ID
            if any(b.backing == "hugetlbfs" for b in blocks):
                features |= Feature.MISSING_HUGETLBFS
            minor = {b.backing for b, m in zip(blocks, self.path.minor, strict=True) if m}
            if "hugetlbfs" in minor:
                features |= Feature.MINOR_HUGETLBFS
            if "memfd" in minor:
                features |= Feature.MINOR_SHMEM
            if any(b.backing == "memfd" for b in blocks):
                features |= Feature.MISSING_SHMEM
            self._uffd = Userfaultfd(features, user_mode_only=True)
        self._fault_stop = os.pipe()
        self._fault_go = os.pipe()
        self._start("dest-faults", self._serve_faults, self.path, self._fault_stop[0], self._fault_go[0])

    def _register(self) -> None:
        """LISTEN: register guest memory with userfaultfd; the fault service starts serving."""
        if self._fault_go is None:
            self._prepare_faults()
        assert self._fault_go is not None
        if self._uffd is not None:
            # MINOR too where a prefilled page not placed yet is in the file but not mapped here
            self._registered = True     # (set first: a block that fails leaves those before it registered)
            self.path.listen(self._uffd.fileno(), self._fault_go[1])
        else:
            os.write(self._fault_go[1], b"g")

    def _serve_faults(self, path: DestinationPath, stop_fd: int, go_fd: int) -> None:
        urgent_priority()
        touch_stack()
        # waits for LISTEN in C (or for the service to stop before it): not for the GIL then
        rc = path.serve_faults(stop_fd, go_fd)
        if rc < 0:
            self._feed(DataPathFailed("uffd", f"fault service stopped: {os.strerror(-rc)}"))

    def _stop_fault_service(self) -> None:
        if self._fault_stop is not None:
            os.write(self._fault_stop[1], b"x")
            self._retired.append(self._fault_stop)
            self._fault_stop = None
        if self._fault_go is not None:
            self._retired.append(self._fault_go)
            self._fault_go = None

    def _reset_before_run(self) -> None:
        """No guest ran here: drop what was received; the next stream starts from nothing."""
        self._stop_fault_service()
        if self._uffd is not None:
            if self._registered and self._path is not None:
                for b in self._path.blocks:
                    self._uffd.unregister(b.addr, b.used_length)
            self._retired.append(self._uffd)
            self._uffd = None
        self._registered = False
        if self._path is not None:
            self._retired.append(self._path)
        self._path = None
        self._early_return_path = None
        self.owner.reset()
        self._channel_totals = {"main": ChannelStats(), "preempt": ChannelStats()}
        self._channel_rx = {"main": None, "preempt": None}

    # -- the end ------------------------------------------------------------------------------------

    def _status_changed(self, status: MigrationStatus) -> None:
        if status is MigrationStatus.POSTCOPY_PAUSED:
            log.warning("destination: postcopy paused: %s", self.session.last_break_reason)
        elif status is MigrationStatus.SETUP and self.session.restarts:
            log.warning("destination: the stream starts over: %s", self.session.last_break_reason)
        else:
            log.info("destination: %s", status.value)
        if self._on_status is not None:
            self._on_status(status.value)

    def _end(self, finish: Finish) -> None:
        self._finish = finish
        self._finished_ns = time.monotonic_ns()
        if finish.error is None and self._uffd is not None and self._path is not None and self._registered:
            for b in self._path.blocks:
                self._uffd.unregister(b.addr, b.used_length)
        if finish.error is not None:
            log.error("migration failed (%s): %s", finish.error.kind, finish.error)
        self._counters_at_end = self.snapshot()
        self._done.set()
        os.write(self._wake_w, b"x")

    def _teardown(self) -> None:
        if self._finish is not None and self._finish.error is None:
            with self._lock:
                socks = [c.sock for c in self._conns.values()]
            close_after_peer(socks, PEER_CLOSE_WAIT_S)
        with self._lock:
            self._stop_fault_service()
            for c in self._conns.values():
                if c.rx is not None:
                    c.rx.stop()
                shutdown_quietly(c.sock)
                c.go.set()
                if c.listen is not None:
                    os.write(c.listen[1], b"x")     # a preempt receiver still waiting for LISTEN
        for t in self._threads:
            t.join(timeout=10)
        for c in self._conns.values():
            c.sock.close()
        self._conns.clear()
        self.poll_latencies()

    # -- operator commands (any thread) -------------------------------------------------------------

    def pause(self) -> None:
        """Break the link on purpose (QMP migrate-pause); the source recovers."""
        self._feed(PauseRequested())

    def recover(self, address: tuple[str, int]) -> None:
        """Await the recovery on a new address as well (QMP migrate-recover)."""
        listener = socket.create_server(address, backlog=4)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._retired.append(listener)
        self._feed(RecoverRequested())
        os.write(self._wake_w, b"x")

    # -- what operators see -------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.session.status.value

    @property
    def result(self) -> MigrationStats:
        return self._counters_at_end if self._counters_at_end is not None else self.snapshot()

    def snapshot(self) -> MigrationStats:
        """Live figures, cheap to take at any time (C counters, no locks on the data path)."""
        s = self.session
        path = self._path
        error = s.error
        totals = {}
        for name in ("main", "preempt"):
            rx = self._channel_rx[name]
            live = ChannelStats(*rx.counters()) if rx is not None else ChannelStats()
            totals[name] = self._channel_totals[name] + live
        base = dict(
            role="destination", status=s.status,
            error=str(error) if error is not None else None, error_kind=error.kind if error is not None else None,
            main=totals["main"], preempt=totals["preempt"],
            discard_ranges=s.discard_ranges, recoveries=s.recoveries, restarts=s.restarts,
            paused_ns=int(s.paused_total(time.monotonic()) * 1e9),
            source_stopped_ns=getattr(self.owner, "source_stopped_ns", 0),
            started_ns=self._started_ns, guest_started_ns=self._guest_started_ns, finished_ns=self._finished_ns,
            refused_connections=sum(s.refused.values()), requests_resent=self._requests_resent,
        )
        if path is None:
            return MigrationStats(**base)  # type: ignore[arg-type]
        c = path.counters()
        return MigrationStats(
            **base,  # type: ignore[arg-type]
            pages_total=path.total_pages(), pages_received=path.received_pages(),
            remote_faults=c.faults, requests_sent=c.requests_sent, pending_requests=c.waiting,
            duplicate_host_pages=c.eexist, blocktime_ns=c.blocktime_ns, vcpu_blocktime_ns=c.vcpu_blocktime_ns,
        )

    def poll_latency_parts(self) -> tuple[list[int], list[int]]:
        """(fault -> request written, request written -> page placed) samples in ns
        since the last call: the two parts of the fault latency."""
        path = self._path
        if path is None:
            return [], []
        return path.drain_latencies_ns("request"), path.drain_latencies_ns("reply")

    def poll_latencies(self) -> list[int]:
        """Fault -> placed latencies (ns) since the last call; all of them stay in ``latencies_ns``."""
        path = self._path
        if path is None:
            return []
        with self._latency_lock:
            new = path.drain_latencies_ns()
            self.latencies_ns.extend(new)
        return new

    # -- after the migration ------------------------------------------------------------------------

    def close(self) -> None:
        """Tear everything down. After a failed migration the guest may be blocked
        on pages that will never come: closing the uffd releases it (the guest is
        being thrown away), so stopping it cannot hang."""
        request_stop = getattr(self.owner, "request_stop", None)
        if request_stop is not None:
            request_stop()
        for t in self._threads:
            t.join(timeout=10)
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        self.owner.close()
        for obj in self._retired:
            if isinstance(obj, Userfaultfd):
                obj.close()
            elif isinstance(obj, tuple):
                for fd in obj:
                    os.close(fd)
            elif isinstance(obj, socket.socket):
                obj.close()
        self._retired.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _close_with_reply(sock: socket.socket, reply: bytes) -> None:
    """Close ``sock``; with a reply (SHUT 2 to a recovery), write it and drain what the
    peer sent first, on a short-lived thread, so closing does not reset the reply away."""
    if not reply:
        shutdown_quietly(sock)
        sock.close()
        return

    def answer() -> None:
        try:
            sock.sendall(reply)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()

    threading.Thread(target=answer, name="dest-refuse", daemon=True).start()
