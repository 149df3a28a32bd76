"""The source shell: sockets, threads and the C data path around a :class:`SourceSession`.

One driver thread (the caller of :meth:`Source.migrate`) owns the session: the
C loops' threads (the bulk stream, the return path) and QMP commands only put
inputs on a queue, so the driver can join those threads whenever the session
says to close the channels. Sequence on the wire: see ``postcopy/session/_source.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from uffd._dirty import DirtyTracker, TrackingMethod, available_method

from . import wire
from ._datapath import CHAN_MAIN, CHAN_PREEMPT, DataPathError, SourcePath, decoded_items, hash_pages
from .hotset import HotBlock, HotSet
from ._link import (
    BACKGROUND_NICE,
    bound_bulk_buffers,
    hold_gc,
    name_os_thread,
    one_malloc_arena,
    set_recv_timeout,
    set_thread_nice,
    shutdown_quietly,
    thread_nice,
    touch_stack,
    tune,
    urgent_priority,
)
from .owner import BUILTIN_MACHINE_TYPE, SourceMemory
from .session import (
    SWITCH_PRELUDE_PINGS,
    SWITCH_SPIN_SECONDS,
    Action,
    BreakLink,
    BulkFinished,
    Channel,
    ChannelFailed,
    ChannelStats,
    CloseChannels,
    Connect,
    Connected,
    ConnectFailed,
    DirtyScanned,
    DiscardsSent,
    EndRound,
    Finish,
    GuestStopped,
    Input,
    MarkAllDirty,
    MigrationStats,
    MigrationStatus,
    PauseRequested,
    HotSetStats,
    PrefetchStats,
    ReloadDirty,
    ResumeRequested,
    ReturnPathMessage,
    RoundFinished,
    ScanDirty,
    SendDiscards,
    SourceSession,
    StartBulk,
    StartPostcopy,
    StartReturnPath,
    StartRound,
    StartTracking,
    StatusChanged,
    StopGuest,
    StopTracking,
    SwitchoverPolicy,
    ThrottleGuest,
    Write,
    WriterPriority,
    rehearse_switch_once,
)
from .session._source import RAM_SECTION_ID

__all__ = ["Source"]

log = logging.getLogger("postcopy.source")

_CHANNEL_IDS = {Channel.MAIN: CHAN_MAIN, Channel.PREEMPT: CHAN_PREEMPT}


def _named(name: str, target: Callable[[int], None], generation: int) -> None:
    """A role thread's body: its name where the OS shows threads first (top -H, ps -L)."""
    name_os_thread(name)
    target(generation)


#: Prefetch windows (bytes): the first window of a stream, and the most sent ahead of one stream.
PREFETCH_MIN_WINDOW = 64 << 10
PREFETCH_MAX_WINDOW = 4 << 20


class Source:
    """Migrate the memory of ``owner`` (and whatever runs on it) to a destination.

    A channel that fails during postcopy pauses the migration; with
    ``auto_recover`` the source reconnects with bounded backoff, reloads the
    destination's received bitmaps into its dirty bitmaps and resumes. Without
    it (or after :meth:`pause`), it waits for :meth:`resume`.
    """

    def __init__(self, owner: SourceMemory, *, preempt: bool = True, bandwidth_cap: int = 0, verify: bool = False,
                 on_status: Callable[[str], None] | None = None, auto_recover: bool = True,
                 link_timeout: float = 3.0, recover_timeout: float = 120.0,
                 heartbeat: float = 0.1, reconnect_timeout: float = 0.1,
                 backoff: tuple[float, float] = (0.01, 0.02), precopy: SwitchoverPolicy | None = None,
                 tracking: str = "auto", recover_address: tuple[str, int] | None = None,
                 prefetch: bool = True, hot_set: HotSet | None = None, record_hot_set: bool = False) -> None:
        """``recover_address``: where reconnections after a pause go (default: the migrate address),
        e.g. where a paused QEMU destination listens after ``migrate-recover URI``.
        ``prefetch``: with preempt, send ahead of sequential and strided request streams
        (:data:`PREFETCH_MIN_WINDOW` growing to :data:`PREFETCH_MAX_WINDOW` bytes).
        ``hot_set``: an earlier migration's hot set (postcopy/hotset.py): after the switch the bulk
        stream sends those pages first, in their order; what does not fit these blocks is left out
        with a warning (:attr:`hot_set_warnings`). ``record_hot_set``: record the pages the
        destination asks for (and those sent ahead) for :meth:`recorded_hot_set`."""
        self.owner = owner
        #: precopy rounds before the switch (None: postcopy at once)
        self.precopy = precopy
        self.tracking: TrackingMethod | None = available_method(tracking) if precopy is not None else None
        self._tracker: DirtyTracker | None = None
        self._round_base = 0
        self.blocks = tuple(owner.ram_blocks())
        self.preempt = preempt
        self.verify = verify
        self.auto_recover = auto_recover
        self.link_timeout = link_timeout
        self.recover_timeout = recover_timeout
        self.backoff = backoff
        # Short connect attempts, retried soon: a SYN lost on a dead link is
        # not retransmitted for a second, so a fresh attempt finds a restored
        # link sooner than waiting on the old one.
        self.reconnect_timeout = reconnect_timeout
        self._on_status = on_status
        self.path = SourcePath(list(self.blocks), RAM_SECTION_ID)
        self.path.configure(preempt=preempt, bandwidth_cap=bandwidth_cap)
        self.path.set_heartbeat(heartbeat)
        self.prefetch = prefetch and preempt
        self.path.set_prefetch(PREFETCH_MAX_WINDOW if self.prefetch else 0, PREFETCH_MIN_WINDOW)
        self._hot_blocks = tuple(HotBlock(b.idstr, b.used_length, b.page_size) for b in self.blocks)
        self.hot_set_pages = 0
        self.hot_set_warnings: tuple[str, ...] = ()
        if hot_set is not None:
            resolved = hot_set.resolve(self._hot_blocks)
            for warning in resolved.warnings:
                log.warning("source: %s", warning)
            self.path.set_hot(resolved.runs)
            self.hot_set_pages = resolved.pages
            self.hot_set_warnings = resolved.warnings
        self.record_hot_set = record_hot_set
        self.path.record_hot(record_hot_set)
        self._hot_set_used = hot_set is not None
        # A QEMU machine goes to QEMU (or to a destination that takes what QEMU takes): QEMU's destination
        # fails on a page placed twice, so a requested page in flight on main is not sent again on preempt.
        self.path.set_send_once(owner.configuration().machine_type != BUILTIN_MACHINE_TYPE)
        self.hashes: dict[str, bytes] = {}
        self.session: SourceSession | None = None
        # the status as carried out: a status the session moved to is announced after the
        # actions that came with it (writers lowered, tracking on)
        self._status = MigrationStatus.NONE
        # (generation of the channels that produced it, or None for an operator's command, input)
        self._inputs: queue.SimpleQueue[tuple[int | None, Input]] = queue.SimpleQueue()
        self._address: tuple[str, int] | None = None
        self._recover_address = recover_address
        self._socks: dict[Channel, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._bad_requests = 0
        self._started_ns = 0
        self._stopped_ns = 0
        self._nice_before_switch: int | None = None     # the driver runs urgent from the stop to PONG 3
        self._finished_ns = 0
        self._finish: Finish | None = None
        self._hasher: threading.Thread | None = None
        self.tracking_stats: dict[str, int] = {}
        self._throttled = 0
        self._writer_nice = 0
        rehearse_switch_once(self.preempt)   # the switch's Python runs specialized, not for the first time, inside the downtime
        one_malloc_arena()  # no thread makes (and first touches) its own malloc arena inside the switch

    # -- the migration ------------------------------------------------------------------

    def migrate(self, address: tuple[str, int], *, connect_timeout: float = 0.0,
                switchover: threading.Event | None = None) -> MigrationStats:
        """Run the whole migration; raise :class:`MigrationFailed` if it fails.

        ``connect_timeout`` waits for a destination that is still starting;
        ``switchover``, when given, holds the switch to postcopy until it is set
        (QMP's migrate-start-postcopy; :meth:`start_postcopy` does the same).
        """
        self._address = address
        self._started_ns = time.monotonic_ns()
        session = self.session = SourceSession(
            [wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length, host_page_size=b.page_size) for b in self.blocks],
            self.owner.configuration(), preempt=self.preempt, hold_switchover=switchover is not None,
            auto_recover=self.auto_recover, link_timeout=self.link_timeout, recover_timeout=self.recover_timeout,
            connect_timeout=connect_timeout, backoff=self.backoff,
            precopy=self._policy(switchover is not None), tracking=self.tracking or "")
        if switchover is not None:
            hold = switchover

            def release() -> None:
                hold.wait()
                self.start_postcopy()

            threading.Thread(target=release, name="source-switchover", daemon=True).start()
        try:
            self._run(session.start(time.monotonic()))
            while self._finish is None:
                timer = session.get_timer()
                wait = None if timer is None else max(0.0, timer - time.monotonic())
                try:
                    generation, event = self._inputs.get(timeout=wait)
                except queue.Empty:
                    self._run(session.handle_timer(time.monotonic()))
                    continue
                if generation is not None and generation != self._generation:
                    continue        # from channels closed since: their end was already dealt with
                self._run(session.handle(event, time.monotonic()))
                if self._nice_before_switch is not None and session.downtime is not None:
                    self._end_switch_priority()
        finally:
            self._end_switch_priority()
            self._finished_ns = time.monotonic_ns()
            self._close_channels()
            self._stop_tracking()
            if self._throttled:
                self._throttled = 0
                self.owner.throttle(0)      # a guest that goes on running here (a failed precopy) runs at full speed
            if self._writer_nice:
                self._set_writer_nice(0)    # ... and at its own priority
        if self._hasher is not None:
            self._hasher.join()
        if self._finish.error is not None:
            raise self._finish.error
        return self.result

    def _end_switch_priority(self) -> None:
        if self._nice_before_switch is not None:
            set_thread_nice(self._nice_before_switch)
            self._nice_before_switch = None
            hold_gc(False)

    def _policy(self, held: bool) -> SwitchoverPolicy | None:
        """Held for QMP's migrate-start-postcopy: rounds go on until it comes."""
        if self.precopy is None or not held:
            return self.precopy
        return dataclasses.replace(self.precopy, mode="manual", max_rounds=0)

    # -- operator commands (any thread) ------------------------------------------------------

    def start_postcopy(self) -> None:
        self._inputs.put((None, StartPostcopy()))

    def pause(self) -> None:
        """Break the link on purpose (QMP migrate-pause); wait for :meth:`resume`."""
        self._inputs.put((None, PauseRequested()))

    def resume(self, address: tuple[str, int] | None = None) -> None:
        """Recover now, to ``address`` if given (QMP migrate with resume: true)."""
        if address is not None:
            self._recover_address = address
        self._inputs.put((None, ResumeRequested()))

    def break_link(self) -> None:
        """Cut the channels as a network failure would (tests, fault injection)."""
        self.path.stop()
        for sock in list(self._socks.values()):
            shutdown_quietly(sock)

    def set_bandwidth_cap(self, bytes_per_second: int) -> None:
        """Change the background stream's cap at any time (0 = none)."""
        self.path.configure(preempt=self.preempt, bandwidth_cap=bytes_per_second)

    # -- carrying out the session's actions (driver thread) -------------------------------------

    def _run(self, actions: list[Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            follow = self._do(action)
            if follow is not None and self.session is not None:
                pending[:0] = self.session.handle(follow, time.monotonic())

    def _do(self, action: Action) -> Input | None:
        match action:
            case Connect(channel=channel):
                return self._connect(channel)
            case Write(channel=channel, data=data, last=last):
                try:
                    if last:
                        self.path.finish(_CHANNEL_IDS[channel], data)
                    else:
                        self.path.write(_CHANNEL_IDS[channel], data)
                except ConnectionError as exc:
                    return ChannelFailed(f"write on the {channel.value} channel: {exc}")
            case StartReturnPath():
                self._start(f"source-rp-{self._generation}", self._serve_return_path)
            case StopGuest():
                # The guest's downtime starts: this thread stops it, saves its devices and writes
                # the switch, above the rest of the machine until PONG 3. (In one process with the
                # destination, a thread preempted while it holds the GIL stalls the switch there.)
                if self._nice_before_switch is None:
                    self._nice_before_switch = thread_nice()
                    urgent_priority()
                    hold_gc(True)
                stopped_at = time.monotonic()
                self._stopped_ns = int(stopped_at * 1e9)
                self.owner.stop()
                sections = tuple(self.owner.save_device_state())
                if self.verify and self._hasher is None:
                    # the pages as they are for good: what the destination must end up with
                    self._hasher = threading.Thread(target=self._hash_all, name="source-hash", daemon=True)
                    self._hasher.start()
                return GuestStopped(sections, stopped_at)
            case MarkAllDirty():
                self.path.mark_all_dirty()
                self.path.canonicalize()
            case StartBulk():
                self.path.set_round_mode(False)
                self._start(f"source-bulk-{self._generation}", self._bulk)
            case StartTracking():
                self._start_tracking()
            case StartRound(index=index, resume=resume):
                if resume:
                    self.path.resume_round()
                else:
                    self.path.set_round_mode(True)
                self._round_base = self.path.counters()["main_bytes"]
                self._start(f"source-round-{index}", self._round)
            case ThrottleGuest(percent=percent):
                self._throttled = percent
                self.owner.throttle(percent)
            case WriterPriority(nice=nice):
                self._set_writer_nice(nice)
            case EndRound():
                self.path.end_round()
            case ScanDirty():
                pages = self._scan()
                return DirtyScanned(pages, self.path.discard_runs())
            case StopTracking():
                self._stop_tracking()
            case SendDiscards(before_stop=before_stop, max_ranges=max_ranges):
                chunk = self.path.coarsen_discards(max_ranges) if max_ranges and not before_stop else 1
                self.path.canonicalize()
                try:
                    return DiscardsSent(self.path.send_discards(before_stop=before_stop), chunk)
                except ConnectionError as exc:
                    return ChannelFailed(f"write on the main channel: {exc}")
            case ReloadDirty(block_index=index, received_le=bitmap):
                self.path.reload_dirty(index, bitmap)
            case BreakLink():
                self.break_link()
            case CloseChannels():
                self._close_channels()
            case StatusChanged(status=status):
                self._status = status
                if status is MigrationStatus.POSTCOPY_PAUSED and self.session is not None:
                    log.warning("source: postcopy paused: %s", self.session.last_pause_reason)
                else:
                    log.info("source: %s", status.value)
                if self._on_status is not None:
                    self._on_status(status.value)
            case Finish():
                self._finish = action
            case _:
                raise AssertionError(f"the source shell cannot carry out {action!r}")
        return None

    # -- dirty tracking (precopy) --------------------------------------------------------------

    def _set_writer_nice(self, nice: int) -> None:
        """The guest's writers at ``nice`` (0: back as they were). Putting them back needs
        CAP_SYS_NICE (or RLIMIT_NICE) while they run: without it they stay lowered (logged)."""
        self._writer_nice = nice
        try:
            self.owner.set_writer_nice(nice or None)
        except OSError as exc:
            log.warning("source: the guest's writers at nice %s: %s", nice or "as before", exc)

    def _start_tracking(self) -> None:
        assert self.tracking is not None
        writer = self.owner.writer_process()
        self._tracker = DirtyTracker(
            self.tracking, [(b.addr, b.used_length, b.page_size, self.path.dirty[i]) for i, b in enumerate(self.blocks)],
            pid=writer.pid, uffd=writer.uffd)
        self._tracker.start()

    def _scan(self) -> int:
        """The pages written since the last scan, now in the dirty bitmaps (C, GIL released)."""
        t = self._tracker
        if t is None:
            return 0
        stopped = self.session is not None and self.session.guest_stopped
        if not t.needs_freeze or stopped:
            return t.collect()
        self.owner.freeze_writers()         # soft-dirty reads then clears: nobody may write in between
        try:
            return t.collect()
        finally:
            self.owner.thaw_writers()

    def _stop_tracking(self) -> None:
        if self._tracker is not None:
            self.tracking_stats = self._tracker.stats()
            self._tracker.close()
            self._tracker = None

    def _connect(self, channel: Channel) -> Input:
        assert self._address is not None
        fresh = self.session is not None and self.session.status.value == "setup"
        address = self._address if fresh else self._recover_address or self._address
        try:
            sock = socket.create_connection(address, timeout=None if fresh else self.reconnect_timeout)
        except OSError as exc:
            return ConnectFailed(channel, str(exc))
        sock.settimeout(None)
        tune(sock, self.link_timeout)
        if channel is Channel.MAIN:
            self._close_channels()      # a new generation: what the old channels' threads said is stale
            bound_bulk_buffers(sock, max(b.page_size for b in self.blocks))
            self.path.restart()
            self.path.set_return_path(sock)
            if not fresh:
                set_recv_timeout(sock, self.link_timeout)   # a dead link shows during the handshake
        self._socks[channel] = sock
        self.path.set_channel(_CHANNEL_IDS[channel], sock)
        return Connected(channel)

    def _close_channels(self) -> None:
        """Stop the C loops, join their threads, close the sockets (driver thread only).
        Whatever those threads still report belongs to a generation that is over."""
        self._generation += 1
        self.path.stop()
        for sock in self._socks.values():
            shutdown_quietly(sock)
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        self.path.set_channel(CHAN_MAIN, None)
        self.path.set_channel(CHAN_PREEMPT, None)

    # -- threads (they only put inputs) -------------------------------------------------------

    def _start(self, name: str, target: Callable[[int], None]) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=_named, args=(name, target, self._generation), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _put(self, generation: int, event: Input) -> None:
        if generation == self._generation:
            self._inputs.put((generation, event))

    def _bulk(self, generation: int) -> None:
        try:
            rc = self.path.run_bulk(nice=BACKGROUND_NICE)     # lowered in C: never holding the GIL
        except DataPathError as exc:
            self._put(generation, ChannelFailed(f"background stream: {exc}"))
            return
        if rc == SourcePath.DONE:
            self._put(generation, BulkFinished())
        else:       # stopped under it: break_link (a cut), or its channels are being closed
            self._put(generation, ChannelFailed("the background stream was stopped"))

    def _round(self, generation: int) -> None:
        try:
            rc = self.path.run_bulk(nice=BACKGROUND_NICE)     # lowered in C: never holding the GIL
        except DataPathError as exc:
            self._put(generation, ChannelFailed(f"precopy round: {exc}"))
            return
        sent = self.path.counters()["main_bytes"] - self._round_base
        self._put(generation, RoundFinished(bytes=sent, ended=rc == SourcePath.STOPPED))

    def _serve_return_path(self, generation: int) -> None:
        urgent_priority()
        touch_stack()
        layout = wire.RamLayout(blocks=tuple(
            wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length, host_page_size=b.page_size) for b in self.blocks))
        main = self._socks.get(Channel.MAIN)
        try:
            while True:
                code = self.path.serve_return_path()
                read_at = self.path.rp_control_ns / 1e9     # taken in C: not when this thread gets the GIL back
                if code == SourcePath.RP_BAD_REQUEST:
                    self._bad_requests += 1
                    log.warning("destination sent a bad page request: %s", self.path.last_error())
                    continue
                if code == SourcePath.RP_EOF:
                    self._put(generation, ChannelFailed("return path closed"))
                    return
                if code != SourcePath.RP_CONTROL:
                    self._put(generation, ChannelFailed("the return path was stopped"))
                    return
                event = next(decoded_items(self.path.rp, wire.ReturnPathDecoder(layout=layout)))
                if isinstance(event, wire.ResumeAck) and main is not None:
                    set_recv_timeout(main, 0)
                if isinstance(event, wire.Pong) and event.value in SWITCH_PRELUDE_PINGS:
                    self.path.rp.spin_for(SWITCH_SPIN_SECONDS)     # PONG 2 and 3 may follow within ms
                    self.path.rp.small_reads_for(SWITCH_SPIN_SECONDS)   # PONG 3's arrival, not a request's behind it
                elif isinstance(event, wire.Pong) and event.value == 3:
                    self.path.rp.spin_for(0)        # the downtime is over
                    self.path.rp.small_reads_for(0)
                self._put(generation, ReturnPathMessage(event, read_at))
                if isinstance(event, wire.Shut):
                    return
        except (DataPathError, wire.RemoteProtocolError, OSError) as exc:
            self._put(generation, ChannelFailed(f"return path: {exc}"))

    def recorded_hot_set(self) -> HotSet:
        """The pages the destination asked for (and those sent ahead), in the order of their
        first request: the hot set for a later migration of this guest (with ``record_hot_set``)."""
        return HotSet(self._hot_blocks, self.path.hot_recorded())

    def _hash_all(self) -> None:
        for b in self.blocks:
            self.hashes[b.idstr] = hash_pages(b)

    # -- what operators see ---------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self._status.value

    @property
    def result(self) -> MigrationStats:
        return self.snapshot()

    def _hot_set_stats(self, c: dict[str, int]) -> HotSetStats | None:
        if not self._hot_set_used and not self.record_hot_set:
            return None
        return HotSetStats(self.hot_set_pages, c["hot_pages_sent"], c["hot_pages_recorded"], self.hot_set_warnings)

    def snapshot(self) -> MigrationStats:
        """Live figures, cheap to take at any time (C counters)."""
        s = self.session
        c = self.path.counters()
        now = time.monotonic()
        error = s.error if s is not None else None
        return MigrationStats(
            role="source",
            status=self._status,
            error=str(error) if error is not None else None,
            error_kind=error.kind if error is not None else None,
            pages_total=sum(b.used_length for b in self.blocks) // wire.DEFAULT_TARGET_PAGE_SIZE,
            dirty_pages=self.path.dirty_pages(),
            main=ChannelStats(c["main_pages_normal"], c["main_pages_zero"], c["main_bytes"]),
            preempt=ChannelStats(c["preempt_pages_normal"], c["preempt_pages_zero"], c["preempt_bytes"]),
            remote_faults=c["requests"],
            bad_requests=self._bad_requests,
            discard_ranges=s.discard_ranges if s is not None else 0,
            recoveries=s.recoveries if s is not None else 0,
            restarts=s.restarts if s is not None else 0,
            paused_ns=int(s.paused_total(now) * 1e9) if s is not None else 0,
            started_ns=self._started_ns,
            stopped_ns=self._stopped_ns,
            downtime_ns=int(s.downtime * 1e9) if s is not None and s.downtime is not None else 0,
            finished_ns=self._finished_ns,
            recovery_errors=tuple(s.recovery_errors) if s is not None else (),
            counters=c,
            precopy=s.precopy_stats(now) if s is not None else None,
            prefetch=PrefetchStats(c["prefetch_pages_sent"], c["prefetch_pages_used"], c["prefetch_windows"],
                                   c["prefetch_hits"], c["prefetch_misses"]) if self.prefetch else None,
            hot_set=self._hot_set_stats(c),
        )

