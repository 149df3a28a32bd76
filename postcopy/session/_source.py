"""The source's protocol session: every decision of an outgoing migration, with
no IO, no threads and no clock.

The shell (``postcopy/source.py``) connects, runs the C bulk stream and the
return-path reader, and stops the guest through its memory owner; it feeds what
happened here and carries out the actions, in order, on one driver thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .. import wire
from ._destination import HEARTBEAT_MASK, HEARTBEAT_PING, PREEMPT_REQUESTS_PING, SHUT_NOTHING_TO_RECOVER
from ._errors import MigrationFailed
from ._io import (
    Action,
    BreakLink,
    BulkFinished,
    Channel,
    ChannelFailed,
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
    PauseRequested,
    ReloadDirty,
    ResumeRequested,
    ReturnPathMessage,
    RoundFinished,
    ScanDirty,
    SendDiscards,
    StartBulk,
    StartPostcopy,
    StartReturnPath,
    StartRound,
    StartTracking,
    StatusChanged,
    StopGuest,
    StopTracking,
    ThrottleGuest,
    Write,
    WriterPriority,
)
from ._precopy import DISCARD_RANGE_SECONDS, DRAIN_DISCARD_WAIT_MAX, DRAIN_RESEND_SHARE, MIN_ROUND_SECONDS, PrecopyStats, RoundRecord, SwitchoverPolicy
from ._status import MigrationStatus, Trigger, next_status

__all__ = ["DRAIN_FALLBACK_PING", "DRAIN_PING", "HEARTBEAT_MASK", "HEARTBEAT_PING", "MAX_DISCARDS_PER_COMMAND", "READY_PING",
           "SWITCH_PRELUDE_PINGS", "SWITCH_SPIN_SECONDS", "SourceSession"]

S = MigrationStatus

RAM_SECTION_ID: Final = 2
MAX_DISCARDS_PER_COMMAND: Final = 12        # QEMU's limit per POSTCOPY_RAM_DISCARD
#: A destination still starting: connection attempts this far apart.
CONNECT_RETRY_SECONDS: Final = 0.02
#: No SHUT this many link timeouts after the end of the stream: the link is broken.
SHUT_WAIT_LINK_TIMEOUTS: Final = 10
#: The PING before the guest stops after precopy: its PONG says the destination took every
#: page sent before it (not a heartbeat: another tag in the top half; QEMU's are 1-4 and 0x42).
DRAIN_PING: Final = 0x50440001
#: The PING behind the discards of a resend drain that fell back (its pass or PONG was late):
#: the PONG of a DRAIN_PING still in flight must not be taken for it.
DRAIN_FALLBACK_PING: Final = 0x50440002
#: The PING written once both channels are up. The destination answers it only after the
#: RAM setup before it (its memory, bitmaps, fault service): the guest stops once it has,
#: so that no downtime is spent waiting for a destination still setting up. Outside the
#: heartbeat's tag; a destination that never answers is given one link timeout.
READY_PING: Final = 0x52454459      # "REDY"
#: The PINGs whose PONG may be followed at once by the guest's stop and the switch (PING 2,
#: PACKAGED; then PONG 2 and PONG 3 back): both shells keep the reader of what comes next on
#: its CPU for a while after them (SWITCH_SPIN_SECONDS), not asleep.
SWITCH_PRELUDE_PINGS: Final = (READY_PING, DRAIN_PING, DRAIN_FALLBACK_PING)
#: How long: the switch takes 1-2 ms; a guest that does not stop this soon after the PONG
#: (a held switchover, a rescan) is not waited for on a CPU.
SWITCH_SPIN_SECONDS: Final = 0.02
#: After the switch, the background stream waits for PONG 3 (the destination at RUN) or this
#: long: from PACKAGED to PONG 3 the destination's switch has both CPUs of a small host to
#: itself, not a megabyte of pages and their loopback work beside it (the downtime).
BULK_HOLD_SECONDS: Final = 0.02


@dataclass(slots=True)
class _Precopy:
    """The precopy phase: rounds while the guest runs, up to the switch."""

    policy: SwitchoverPolicy
    started: float = 0.0
    round_started: float = 0.0
    round_bytes: int = 0
    running: bool = False           # a round's pass is under way in C
    scan_at: float | None = None    # a short round's scan waits until then
    rounds: list[RoundRecord] = field(default_factory=list)
    started_rounds: int = 0
    bytes: int = 0
    ended_at: float | None = None
    dirty_at_switch: int = 0
    discard_ranges: int = 0
    reason: str = ""
    resume: bool = False            # the next round goes on with a pass a sync period cut
    sync_cut: bool = False          # EndRound sent for a sync period (not for the switch)
    # the drain before the stop: "" -> "scan" (guest running) -> ["round" (resend: a last pass of
    # what the scan found) ->] "wait" (PING sent) -> "pong"/"timeout"; a resend pass late at its share
    # of the deadline: "round" -> "cut" (EndRound) -> "scan" again (fallback: discards, a fresh PING)
    drain: str = ""
    drain_fallback: str = ""        # "deadline": the resend drain fell back to discards
    drain_ping: int = DRAIN_PING    # the PING whose PONG ends the wait
    drain_bytes: int = 0
    drain_runs: int = -1            # resend: the discard runs the last scan found (each pass must halve them)
    drain_passes: int = 0
    drain_started: float = 0.0
    drain_deadline: float | None = None
    drain_seconds: float = 0.0
    dirty_before_stop: int = 0
    discard_ranges_before_stop: int = 0
    throttle: int = 0               # percent now
    throttle_max: int = 0
    throttle_changes: int = 0
    high_periods: int = 0
    discard_chunk: int = 1
    writer_nice: int = 0            # the guest's writers run at this nice now (0: as they were)


@dataclass(slots=True)
class _Recovery:
    """One reconnection attempt after a pause. Replaced whole for the next one."""

    connecting: bool = False
    handshake: bool = False
    deadline: float = 0.0
    pending_bitmaps: set[str] = field(default_factory=set)
    resume_sent: bool = False
    starting_over: bool = False


class SourceSession:
    """Sans-IO: ``handle(input, now)`` and ``handle_timer(now)`` return actions."""

    role = "source"

    def __init__(self, blocks: Sequence[wire.RamBlockLayout], configuration: wire.Configuration, *, preempt: bool,
                 hold_switchover: bool = False, auto_recover: bool = True, link_timeout: float = 3.0,
                 recover_timeout: float = 120.0, connect_timeout: float = 0.0,
                 backoff: tuple[float, float] = (0.01, 0.02), precopy: SwitchoverPolicy | None = None,
                 tracking: str = "") -> None:
        self.layout = wire.RamLayout(blocks=tuple(blocks), section_id=RAM_SECTION_ID)
        self.configuration = configuration
        #: What the destination understands, as far as the machine type we send tells (at least QEMU 7.2).
        self.peer = wire.PeerProfile.from_stream(configuration)
        self.preempt = preempt
        self.hold_switchover = hold_switchover
        self.auto_recover = auto_recover
        self.link_timeout = link_timeout
        self.recover_timeout = recover_timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.status = S.NONE
        self.error: MigrationFailed | None = None
        #: precopy rounds before the switch (None: postcopy at once, every page discarded)
        self.precopy = _Precopy(policy=precopy) if precopy is not None else None
        self.tracking = tracking
        self.switch_requested = not hold_switchover and precopy is None
        self.guest_stopped = False
        self.channels_up = False
        self.peer_ready = False                 # the destination answered READY_PING
        self.ready_deadline: float | None = None
        self.switch_events: list[wire.WireEvent] = []
        self.stopped_at = 0.0
        self.downtime: float | None = None
        self.streaming = False
        self.ending_sent = False
        self.last_pong = 0.0
        self.shut_deadline: float | None = None
        self.bulk_held_until: float | None = None   # the background stream waits for PONG 3 until then
        self.connect_deadline = 0.0
        self.retry_at: float | None = None
        self.delay = backoff[0]
        self.manual_pause = False
        self.recovery = _Recovery()
        self.recover_deadline: float | None = None
        self.paused_since: float | None = None
        self.paused_seconds = 0.0
        self.recoveries = 0
        self.restarts = 0
        self.discard_ranges = 0
        self.recovery_errors: list[str] = []
        self.last_pause_reason = ""
        self._out: list[Action] = []

    # -- entry points -------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        self.connect_deadline = now + self.connect_timeout
        self._move(Trigger.START, now)
        self._out.append(Connect(Channel.MAIN))
        return self._flush()

    def handle(self, event: Input, now: float) -> list[Action]:
        if self.status.finished:
            return self._flush()
        match event:
            case Connected(channel=channel):
                self._connected(channel, now)
            case ConnectFailed(channel=channel, reason=reason):
                self._connect_failed(channel, reason, now)
            case GuestStopped(device_sections=sections, stopped_at=stopped_at):
                self._switch(sections, stopped_at, now)
            case ReturnPathMessage(event=message, received_at=received_at):
                self._message(message, now, received_at or now)
            case BulkFinished():
                self._ending(now)
            case RoundFinished(bytes=sent, ended=ended):
                self._round_finished(sent, ended, now)
            case DirtyScanned(pages=pages, runs=runs):
                self._scanned(pages, now, runs)
            case DiscardsSent(ranges=ranges, chunk_pages=chunk):
                self.discard_ranges += ranges
                if self.precopy is not None:
                    self.precopy.discard_ranges += ranges
                    if not self.guest_stopped:
                        self.precopy.discard_ranges_before_stop += ranges
                    else:
                        self.precopy.discard_chunk = chunk
            case ChannelFailed(reason=reason):
                self._channel_failed(reason, now)
            case StartPostcopy():
                self._request_switch("requested", now)
            case PauseRequested():
                # QEMU: migrate-pause only means something in postcopy
                if self.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED):
                    self.manual_pause = True
                    self.retry_at = None
                if self.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
                    self._pause("paused by request", now)
                    self.retry_at = None
            case ResumeRequested():
                self.manual_pause = False
                if self.status is S.POSTCOPY_PAUSED and not self.recovery.connecting:
                    self.retry_at = None
                    self._reconnect(now)
            case _:
                pass
        return self._flush()

    def get_timer(self) -> float | None:
        times = [t for t in (self.retry_at, self.shut_deadline, self.recover_deadline, self.ready_deadline,
                             self.bulk_held_until) if t is not None]
        if self.status is S.POSTCOPY_ACTIVE and self.streaming:
            times.append(self.last_pong + self.link_timeout)
        if self.recovery.handshake:
            times.append(self.recovery.deadline)
        p = self.precopy
        if p is not None and self.status is S.ACTIVE and not self.switch_requested and p.started_rounds:
            deadline = p.policy.deadline(p.started)
            if deadline is not None:
                times.append(deadline)
            if p.scan_at is not None:
                times.append(p.scan_at)
            sync = self._sync_due()
            if sync is not None:
                times.append(sync)
        if p is not None and p.drain in ("wait", "round") and p.drain_deadline is not None:
            times.append(p.drain_deadline)
        return min(times) if times else None

    def _sync_due(self) -> float | None:
        """Throttling: when the round in progress is cut to measure the dirty rate."""
        p = self.precopy
        if p is None or p.policy.throttle is None or not p.running or p.sync_cut or p.drain:
            return None
        return p.round_started + p.policy.throttle.sync_seconds

    def handle_timer(self, now: float) -> list[Action]:
        if self.status.finished:
            return self._flush()
        if self.retry_at is not None and self.retry_at <= now:
            self.retry_at = None
            if self.status is S.SETUP:
                self._out.append(Connect(Channel.MAIN))
            elif self.status is S.POSTCOPY_PAUSED and not self.manual_pause:
                self._reconnect(now)
        if self.status is S.POSTCOPY_ACTIVE and self.streaming and now - self.last_pong >= self.link_timeout:
            self._pause(f"no PONG for {self.link_timeout:.1f} s", now)
        if self.shut_deadline is not None and self.shut_deadline <= now and self.status is S.POSTCOPY_ACTIVE:
            self._pause("no SHUT from the destination after the end of the stream", now)
        if self.ready_deadline is not None and self.ready_deadline <= now:
            self._peer_is_ready(now)    # no answer: switch anyway (only the downtime may be longer)
        if self.bulk_held_until is not None and self.bulk_held_until <= now:
            self._release_bulk()        # no PONG 3 yet: the pages cannot wait longer
        if self.recovery.handshake and self.recovery.deadline <= now:
            self._attempt_failed("the destination did not answer the recovery within the link timeout", now)
        if self.recover_deadline is not None and self.recover_deadline <= now:
            self._fail("recovery_timeout", f"no recovery within {self.recover_timeout:.0f} s", now)
        p = self.precopy
        if p is not None and self.status is S.ACTIVE and not self.switch_requested and p.started_rounds:
            deadline = p.policy.deadline(p.started)
            sync = self._sync_due()
            if deadline is not None and deadline <= now:
                self._request_switch("time", now)
            elif p.scan_at is not None and p.scan_at <= now:
                p.scan_at = None
                self._out.append(ScanDirty())
            elif sync is not None and sync <= now:
                p.sync_cut = True
                self._out.append(EndRound())        # RoundFinished(ended) follows: scan, then the pass goes on
        if p is not None and p.drain_deadline is not None and p.drain_deadline <= now and self.status is S.ACTIVE:
            if p.drain == "wait" and p.policy.drain_mode == "resend" and not p.drain_fallback:
                self._drain_fallback()              # the pass is out, its PONG is late: a queue
            elif p.drain == "wait":
                self._drained("timeout", now)
            elif p.drain == "round" and p.running:
                p.drain = "cut"
                self._out.append(EndRound())        # its RoundFinished stops the guest
        return self._flush()

    # -- the stream ----------------------------------------------------------------------------

    def preamble(self) -> list[wire.WireEvent]:
        summary = 0
        for b in self.layout.blocks:
            summary |= b.host_page_size
        entries = tuple(
            wire.RamBlockEntry(idstr=b.idstr, used_length=b.used_length,
                               page_size=b.host_page_size if b.host_page_size != wire.DEFAULT_TARGET_PAGE_SIZE else None)
            for b in self.layout.blocks)
        return [
            wire.StreamHeader(),
            self.configuration,
            wire.OpenReturnPath(),
            wire.Ping(value=1),
            wire.PostcopyAdvise(pagesize_summary=summary, target_page_size=wire.DEFAULT_TARGET_PAGE_SIZE),
            wire.SectionStart(section_id=RAM_SECTION_ID, idstr="ram", instance_id=0, version_id=4),
            wire.RamSetup(total_bytes=sum(b.used_length for b in self.layout.blocks), blocks=entries),
            wire.RamEos(),
            wire.SectionFooter(section_id=RAM_SECTION_ID),
        ]

    def _connected(self, channel: Channel, now: float) -> None:
        if self.status is S.SETUP:
            if channel is Channel.MAIN:
                self._out.append(Write(Channel.MAIN, self._encode(self.preamble())))
                if self.preempt:
                    self._out.append(Connect(Channel.PREEMPT))     # 7.2 style: at once
                    return
            self._out.append(StartReturnPath())
            if self.precopy is None:
                # Immediate postcopy: every page goes and every block is discarded, whatever the guest
                # does until it stops; both now, ahead of READY_PING, so that its PONG also says the
                # destination has carried the discards out (sharing a host, its work on them would
                # otherwise run beside the guest's stop and delay it)
                discards = self._whole_block_discards()
                self.discard_ranges += len(discards)
                self._out += [MarkAllDirty(), Write(Channel.MAIN, self._encode(discards))]
            self._say_requests_on_preempt()
            self._out.append(Write(Channel.MAIN, self._encode([wire.Ping(value=READY_PING)])))
            self.ready_deadline = now + self.link_timeout
            self.channels_up = True
            if self.precopy is not None:
                # before the status says active: whoever watches it sees the writers lowered, tracking on
                self._start_precopy(now)
            self._move(Trigger.STREAM_STARTED, now)
            self._maybe_switch(now)
            return
        r = self.recovery
        if not r.connecting:
            return
        if channel is Channel.MAIN:
            if r.starting_over:
                self._out += [MarkAllDirty(), Write(Channel.MAIN, self._encode(self.preamble()))]
            else:
                self._move(Trigger.RECOVERY_STARTED, now)
                # the commands first, then the preempt channel: the destination tells them apart by content
                self._out.append(Write(Channel.MAIN, self._encode(
                    [wire.RecvBitmapRequest(idstr=b.idstr) for b in self.layout.blocks])))
            if self.preempt:
                self._out.append(Connect(Channel.PREEMPT))
                return
        self._out.append(StartReturnPath())
        r.connecting = False
        if r.starting_over:
            self._out.append(Write(Channel.MAIN, self._encode(self.switch_events)))
            self.restarts += 1
            self.recovery = _Recovery()
            self._move(Trigger.START_OVER, now)
            self._stream(now)
        else:
            r.handshake = True
            r.deadline = now + self.link_timeout
            r.pending_bitmaps = {b.idstr for b in self.layout.blocks}

    def _connect_failed(self, channel: Channel, reason: str, now: float) -> None:
        if self.status is S.SETUP and channel is Channel.MAIN and now < self.connect_deadline:
            self.retry_at = now + CONNECT_RETRY_SECONDS     # the destination may still be starting
        elif self.status in (S.SETUP, S.ACTIVE):
            self._fail("connect", f"cannot connect the {channel.value} channel: {reason}", now)
        elif self.recovery.connecting:
            self._attempt_failed(f"connect {channel.value}: {reason}", now)

    # -- precopy ------------------------------------------------------------------------------

    def _start_precopy(self, now: float) -> None:
        p = self.precopy
        assert p is not None
        p.started = now
        if p.policy.writer_nice:
            # the migration's threads first: a flat-out guest would starve the sender
            p.writer_nice = p.policy.writer_nice
            self._out.append(WriterPriority(p.writer_nice))
        # tracking first: a page written from here on is seen, then every page goes once
        self._out += [StartTracking(), MarkAllDirty()]
        self._next_round(now)

    def _next_round(self, now: float) -> None:
        p = self.precopy
        assert p is not None
        p.running = True
        p.sync_cut = False
        p.round_started = now
        p.started_rounds += 1
        self._out.append(StartRound(p.started_rounds - 1, resume=p.resume))

    def _round_finished(self, sent: int, ended: bool, now: float) -> None:
        p = self.precopy
        if p is None or self.status is not S.ACTIVE or not p.running:
            return
        p.running = False
        p.round_bytes = sent
        p.bytes += sent
        if p.drain in ("round", "cut"):
            # the last pass before the stop is over: PING behind it, or its share of the deadline passed
            p.drain_bytes += sent
            if p.drain == "cut":
                self._drain_fallback()
            else:
                p.drain = "wait"
                self._out.append(Write(Channel.MAIN, self._encode([wire.Ping(value=DRAIN_PING)])))
            return
        # a pass cut for a sync period goes on where it stopped; a whole pass starts again from the first page
        p.resume = ended and p.sync_cut
        if self.switch_requested:
            self._maybe_switch(now)
        elif now - p.round_started < MIN_ROUND_SECONDS:
            p.scan_at = p.round_started + MIN_ROUND_SECONDS
        else:
            self._out.append(ScanDirty())

    def _scanned(self, pages: int, now: float, runs: int = -1) -> None:
        p = self.precopy
        if p is None:
            return
        if self.guest_stopped:
            p.dirty_at_switch = pages           # the final scan, guest stopped: what the discards cover
            return
        if p.drain == "rescan" and self.status is S.ACTIVE:
            # after a resend pass's PONG: another while what is left halves and would be widened after
            # the stop; after the fallback's discards: again while it shrinks (each round of discards
            # is short, and what is left after the stop is the downtime's)
            bound = p.policy.max_discard_ranges
            shrinks = runs * 2 <= p.drain_runs if not p.drain_fallback else runs < p.drain_runs
            if runs < 0 or runs <= bound or (p.drain_runs >= 0 and not shrinks) \
                    or p.drain_deadline is None or now >= p.drain_deadline:
                self._drained("pong", now)
                return
            p.drain_runs = runs
            if p.drain_fallback:
                # the discards and their PING again, for what the guest wrote during the last wait
                p.drain = "wait"
                self._out += [SendDiscards(before_stop=True),
                              Write(Channel.MAIN, self._encode([wire.Ping(value=p.drain_ping)]))]
                return
            p.drain_passes += 1
            p.drain = "round"
            p.started_rounds += 1
            p.running = True
            p.round_started = now
            self._out.append(StartRound(p.started_rounds - 1))
            return
        if p.drain == "scan" and self.status is S.ACTIVE:
            # guest running: drop what it found on the destination now, then wait for the PONG
            seconds = p.policy.drain_seconds
            if p.drain_fallback:
                # the resend fell back: what it did not send and what was written since are dropped;
                # the fallback's own wait is the rest of the drain (its share at least)
                p.drain_deadline = now + seconds * (1 - DRAIN_RESEND_SHARE)
            else:
                p.dirty_before_stop = pages
                p.drain_started = now
                p.drain_deadline = now + seconds
            if p.policy.drain_mode == "resend" and not p.drain_fallback:
                # a last pass of what is dirty (what the cut round left too), then the PING behind it;
                # within its share of the drain (what the link carries by then stays on the destination:
                # a pass too long for it is cut there, not skipped), the rest is the fallback's
                p.drain_deadline = now + seconds * DRAIN_RESEND_SHARE
                p.drain_runs = runs
                p.drain_passes = 1
                p.drain = "round"
                p.started_rounds += 1
                p.running = True
                p.round_started = now
                self._out.append(StartRound(p.started_rounds - 1))
                return
            if p.drain_fallback and runs > 0 and p.drain_deadline is not None:
                # the destination's work for these discards (a range each) is the fallback's to wait for
                p.drain_deadline += min(runs * DISCARD_RANGE_SECONDS, DRAIN_DISCARD_WAIT_MAX * seconds)
            p.drain = "wait"
            p.drain_runs = runs
            p.drain_ping = DRAIN_FALLBACK_PING if p.drain_fallback else DRAIN_PING
            self._out += [SendDiscards(before_stop=True),
                          Write(Channel.MAIN, self._encode([wire.Ping(value=p.drain_ping)]))]
            return
        if self.status is not S.ACTIVE or self.switch_requested or p.running:
            return
        record = RoundRecord(seconds=max(now - p.round_started, 1e-9), bytes=p.round_bytes, dirty_pages=pages)
        p.rounds.append(record)
        self._throttle(record)
        reason = p.policy.decide(p.rounds, now - p.started)
        if reason is not None:
            self._request_switch(reason, now)
            return
        self._move(Trigger.ROUND, now)
        self._next_round(now)

    def _throttle(self, record: RoundRecord) -> None:
        """Auto-converge: throttle the guest (more) while it dirties faster than the rounds send."""
        p = self.precopy
        assert p is not None
        t = p.policy.throttle
        if t is None:
            return
        percent, p.high_periods = t.after(record, p.throttle, p.high_periods)
        if percent != p.throttle:
            p.throttle = percent
            p.throttle_max = max(p.throttle_max, percent)
            p.throttle_changes += 1
            self._out.append(ThrottleGuest(percent))

    def _drain_fallback(self) -> None:
        """The resend pass (or its PONG) is late at its share of the deadline: no queue of it may be
        left for the downtime. Scan, discard what is dirty and PING again (``_scanned``)."""
        p = self.precopy
        assert p is not None
        p.drain_fallback = "deadline"
        p.drain_deadline = None
        p.drain = "scan"
        self._out.append(ScanDirty())

    def _drained(self, how: str, now: float) -> None:
        """The drain before the stop is over (PONG or its deadline): stop the guest."""
        p = self.precopy
        assert p is not None
        p.drain = how
        p.drain_deadline = None
        p.drain_seconds = now - p.drain_started
        self._stop_guest()

    def _request_switch(self, reason: str, now: float) -> None:
        if self.switch_requested:
            return
        self.switch_requested = True
        p = self.precopy
        if p is not None and self.status is S.ACTIVE:
            p.reason = reason
            p.scan_at = None
            if p.running:
                if not p.sync_cut:
                    self._out.append(EndRound())     # RoundFinished follows, then the switch
                return
        self._maybe_switch(now)

    def precopy_stats(self, now: float) -> PrecopyStats | None:
        p = self.precopy
        if p is None:
            return None
        last = p.rounds[-1] if p.rounds else None
        end = p.ended_at if p.ended_at is not None else (now if p.started_rounds else p.started)
        return PrecopyStats(rounds=p.started_rounds, bytes=p.bytes, seconds=max(0.0, end - p.started),
                            dirty_pages_last_round=last.dirty_pages if last else 0,
                            dirty_rate_pages_per_s=last.dirty_rate if last else 0.0,
                            dirty_pages_at_switch=p.dirty_at_switch, discard_ranges=p.discard_ranges,
                            switch_reason=p.reason, tracking=self.tracking, drain=p.drain if p.drain in (
                                "pong", "timeout") else "", drain_seconds=p.drain_seconds,
                            dirty_pages_before_stop=p.dirty_before_stop,
                            discard_ranges_before_stop=p.discard_ranges_before_stop, drain_fallback=p.drain_fallback,
                            drain_bytes=p.drain_bytes, drain_passes=p.drain_passes, throttle_percent=p.throttle_max, throttle_changes=p.throttle_changes,
                            discard_chunk_pages=p.discard_chunk, writer_nice=p.policy.writer_nice)

    def _maybe_switch(self, now: float) -> None:
        p = self.precopy
        if p is not None and p.running:
            return
        if not (self.status is S.ACTIVE and self.channels_up and self.peer_ready and self.switch_requested
                and not self.guest_stopped):
            return
        if p is not None and p.policy.drain_seconds > 0:
            # after precopy: scan, resend (or discard) and drain with the guest running, then stop it
            if p.drain == "":
                p.drain = "scan"
                self._out.append(ScanDirty())
            return
        self._stop_guest()

    def _stop_guest(self) -> None:
        if not self.guest_stopped:
            self.guest_stopped = True
            self._out.append(StopGuest())

    def _whole_block_discards(self) -> list[wire.WireEvent]:
        return [wire.PostcopyRamDiscard(idstr=b.idstr, ranges=((0, b.used_length),)) for b in self.layout.blocks]

    def _peer_is_ready(self, now: float) -> None:
        self.ready_deadline = None
        if not self.peer_ready:
            self.peer_ready = True
            self._maybe_switch(now)

    def _switch(self, sections: tuple[wire.DeviceSection, ...], stopped_at: float, now: float) -> None:
        """The guest stopped: discards, PACKAGED with its device state, RUN. The downtime runs to PONG 3."""
        if self.status is not S.ACTIVE or self.switch_events:
            return
        self.stopped_at = stopped_at
        tail: list[wire.WireEvent] = [
            wire.Ping(value=2),
            wire.Packaged(events=(wire.PostcopyListen(), *sections, wire.Ping(value=3), wire.PostcopyRun())),
            wire.Ping(value=4),
        ]
        # the whole stream again (a destination that dropped everything): every block discarded
        self.switch_events = self._whole_block_discards() + tail
        p = self.precopy
        if p is None:
            self._out.append(Write(Channel.MAIN, self._encode(tail)))     # the discards went before the stop
        else:
            # what the guest wrote since its last scan, plus what the last round did not send:
            # dropped on the destination (QEMU's ranges, 12 a command) and sent again
            p.ended_at = stopped_at
            # tracking stops once the switch is on the wire (its teardown is no downtime)
            self._out += [ScanDirty(), SendDiscards(max_ranges=p.policy.max_discard_ranges),
                          Write(Channel.MAIN, self._encode(tail)), StopTracking()]
            if p.writer_nice:
                p.writer_nice = 0
                self._out.append(WriterPriority(0))     # a guest started again here runs as before
        self._move(Trigger.RUN, now)
        self._stream(now, hold=BULK_HOLD_SECONDS)

    def _say_requests_on_preempt(self) -> None:
        """Our destination may send page requests on the preempt channel's way back, which the
        data path reads too: they do not wait behind the bulk stream for the main channel's socket.
        QEMU answers the PING and sends its requests on the return path as ever."""
        if self.preempt:
            self._out.append(Write(Channel.MAIN, self._encode([wire.Ping(value=PREEMPT_REQUESTS_PING)])))

    def _stream(self, now: float, hold: float = 0.0) -> None:
        self.streaming = True
        self.ending_sent = False
        self.shut_deadline = None
        self.last_pong = now
        if hold > 0:
            self.bulk_held_until = now + hold
        else:
            self.bulk_held_until = None
            self._out.append(StartBulk())

    def _release_bulk(self) -> None:
        if self.bulk_held_until is not None:
            self.bulk_held_until = None
            if self.status is S.POSTCOPY_ACTIVE and self.streaming:
                self._out.append(StartBulk())

    def _ending(self, now: float) -> None:
        if self.status is not S.POSTCOPY_ACTIVE or not self.streaming:
            return
        self.streaming = False
        self.ending_sent = True
        self._out.append(Write(Channel.MAIN, self._encode([
            wire.SectionEnd(section_id=RAM_SECTION_ID), wire.RamEos(),
            wire.SectionFooter(section_id=RAM_SECTION_ID), wire.EndOfStream()])))
        if self.preempt:
            # EOS (a 7.2 destination needs it); no urgent page may follow it
            self._out.append(Write(Channel.PREEMPT, (0x10).to_bytes(8, "big"), last=True))
        self.shut_deadline = now + SHUT_WAIT_LINK_TIMEOUTS * self.link_timeout

    # -- the return path ---------------------------------------------------------------------------

    def _message(self, message: wire.WireEvent, now: float, received_at: float) -> None:
        match message:
            case wire.Pong(value=v) if v & HEARTBEAT_MASK == HEARTBEAT_PING:
                self.last_pong = now
            case wire.Pong(value=v) if v in (DRAIN_PING, DRAIN_FALLBACK_PING):
                self.last_pong = now
                p = self.precopy
                if p is not None and p.drain == "wait" and v == p.drain_ping and self.status is S.ACTIVE:
                    if p.policy.drain_mode == "resend" and p.policy.max_discard_ranges:
                        p.drain = "rescan"      # what did the guest write meanwhile?
                        self._out.append(ScanDirty())
                    else:
                        self._drained("pong", now)
            case wire.Pong(value=v) if v == READY_PING:
                self._peer_is_ready(now)
            case wire.Pong(value=v):
                self.last_pong = now
                if v == 3:
                    if self.downtime is None and self.guest_stopped:
                        # up to the return path's read, not to this thread's turn to handle it
                        self.downtime = max(0.0, min(now, received_at) - self.stopped_at)
                    self._release_bulk()        # the destination runs the guest
            case wire.Shut(value=v) if self.recovery.handshake and v == SHUT_NOTHING_TO_RECOVER:
                # no guest ran there yet: send the whole stream again, the guest still stopped here
                self._out.append(CloseChannels())
                self.recovery = _Recovery(connecting=True, starting_over=True)
                self._out.append(Connect(Channel.MAIN))
            case wire.Shut(value=0) if self.status is S.POSTCOPY_ACTIVE and self.ending_sent:
                self.shut_deadline = None
                self._out.append(CloseChannels())
                self._move(Trigger.COMPLETED, now)
                self._out.append(Finish(None))
            case wire.Shut(value=v) if self.status in (S.POSTCOPY_ACTIVE, S.ACTIVE, S.SETUP):
                self._fail("destination_failed", f"the destination shut down with error {v}", now)
            case wire.RecvBitmap(idstr=idstr, bitmap=bitmap) if self.recovery.handshake:
                self._bitmap(idstr, bitmap, now)
            case wire.ResumeAck() if self.recovery.handshake and self.recovery.resume_sent:
                self.recovery = _Recovery()
                self.recoveries += 1
                self._move(Trigger.RESUMED, now)
                self._stream(now)
            case _ if self.recovery.handshake:
                self._attempt_failed(f"{type(message).__name__} in the recovery handshake", now)
            case _:
                pass

    def _bitmap(self, idstr: str, bitmap: bytes, now: float) -> None:
        r = self.recovery
        index = self.layout.index(idstr)
        if index is None or idstr not in r.pending_bitmaps:
            self._attempt_failed(f"RECV_BITMAP for {idstr!r} twice or unasked", now)
            return
        npages = self.layout.blocks[index].used_length // wire.DEFAULT_TARGET_PAGE_SIZE
        want = (npages + 63) // 64 * 8
        if len(bitmap) != want:
            self._attempt_failed(f"RECV_BITMAP of {idstr}: {len(bitmap)} bytes, expected {want}", now)
            return
        if npages % 64 and int.from_bytes(bitmap[-8:], "little") >> (npages % 64):
            self._attempt_failed(f"RECV_BITMAP of {idstr}: bits set past the block's last page", now)
            return
        r.pending_bitmaps.discard(idstr)
        self._out.append(ReloadDirty(index, bitmap))
        if not r.pending_bitmaps:
            r.resume_sent = True
            self._say_requests_on_preempt()
            self._out.append(Write(Channel.MAIN, self._encode([wire.PostcopyResume()])))

    # -- pause and recovery --------------------------------------------------------------------------

    def _channel_failed(self, reason: str, now: float) -> None:
        if self.status in (S.SETUP, S.ACTIVE):
            if self.guest_stopped:
                # the guest stopped here but PACKAGED did not get through: pause like after RUN
                self._move(Trigger.RUN, now)
                self._pause(reason, now)
            else:
                self._fail("io", f"the link failed before the switch to postcopy: {reason}", now)
        elif self.status is S.POSTCOPY_ACTIVE:
            self._pause(reason, now)
        elif self.status is S.POSTCOPY_RECOVER or self.recovery.connecting:
            self._attempt_failed(reason, now)

    def _pause(self, why: str, now: float) -> None:
        self.streaming = False
        self.bulk_held_until = None     # the recovery starts the stream again
        self.shut_deadline = None
        self.recovery = _Recovery()
        self.last_pause_reason = why
        self._out += [BreakLink(), CloseChannels()]
        self._move(Trigger.LINK_BROKEN, now)
        self._schedule_retry(now, first=True)

    def _attempt_failed(self, why: str, now: float) -> None:
        self.recovery_errors.append(why)
        starting_over = self.recovery.starting_over
        self.recovery = _Recovery(starting_over=starting_over)
        self._out += [BreakLink(), CloseChannels()]
        if self.status is S.POSTCOPY_RECOVER:
            self._move(Trigger.RECOVERY_FAILED, now)
        self._schedule_retry(now)

    def _schedule_retry(self, now: float, first: bool = False) -> None:
        if first:
            self.delay = self.backoff[0]
        if self.auto_recover and not self.manual_pause:
            self.retry_at = now + self.delay
            self.delay = min(self.delay * 2, self.backoff[1])

    def _reconnect(self, now: float) -> None:
        self.recovery = _Recovery(connecting=True, starting_over=self.recovery.starting_over)
        self._out.append(Connect(Channel.MAIN))

    # -- status --------------------------------------------------------------------------------

    def _fail(self, kind: str, message: str, now: float) -> None:
        if self.status.finished:
            return
        self.error = MigrationFailed(kind, message)
        self._out += [BreakLink(), CloseChannels()]
        self._move(Trigger.FAILED, now)
        self._out.append(Finish(self.error))

    def _move(self, trigger: Trigger, now: float) -> None:
        old = self.status
        new = next_status("source", old, trigger)
        if new is S.POSTCOPY_PAUSED and self.paused_since is None:
            self.paused_since = now
            self.recover_deadline = now + self.recover_timeout
        if new in (S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED) and self.paused_since is not None:
            self.paused_seconds += now - self.paused_since
            self.paused_since = None
            self.recover_deadline = None
        if new.finished:
            self.retry_at = None
            self.shut_deadline = None
        self.status = new
        if new is not old:
            self._out.append(StatusChanged(new))

    def paused_total(self, now: float) -> float:
        extra = now - self.paused_since if self.paused_since is not None else 0.0
        return self.paused_seconds + extra

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _encode(self, events: Sequence[wire.WireEvent]) -> bytes:
        """The bytes of ``events``; raises LocalProtocolError for a command the peer may not know
        (the configuration's machine type says how new the destination QEMU is at least)."""
        for e in events:
            self.peer.check_sendable(e)
        return _encode(events)


def _encode(events: Sequence[wire.WireEvent]) -> bytes:
    return b"".join(wire.encode(e) for e in events)
