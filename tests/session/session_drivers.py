"""Drivers for the sans-IO sessions: realistic input sequences to every status.

Shared by the session tests (imported by path: no package, no conftest magic).
Times are plain floats in seconds; nothing here sleeps or touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postcopy import wire
from postcopy.session import (
    DESTINATION_TRANSITIONS,
    AcceptPreempt,
    ChannelFailed,
    ConnectFailed,
    ReturnPathMessage,
    PREEMPT_SILENCE_SECONDS,
    SOURCE_TRANSITIONS,
    Action,
    CheckComplete,
    Connect,
    Connected,
    CollectConnections,
    ConnectionAccepted,
    ConnectionsCollected,
    ConnectionClosed,
    ConnectionSpoke,
    DestinationSession,
    GuestStopped,
    MarkAllDirty,
    StartRound,
    StartTracking,
    DirtyScanned,
    DiscardsSent,
    ScanDirty,
    SendDiscards,
    MigrationStatus,
    SourceSession,
    StatusChanged,
    StopGuest,
    StreamChecked,
    StreamItem,
    Write,
)
from postcopy.session._precopy import SwitchoverPolicy
from postcopy.session._source import DRAIN_FALLBACK_PING, DRAIN_PING
from postcopy.session._source import READY_PING

S = MigrationStatus
DRAIN_PING_BYTES = wire.encode(wire.Ping(value=DRAIN_PING))
DRAIN_FALLBACK_PING_BYTES = wire.encode(wire.Ping(value=DRAIN_FALLBACK_PING))

SRC_HOST = "10.0.0.1"
OTHER_HOST = "10.0.0.99"
BLOCK = "pc.ram"
BLOCK_LEN = 1 << 20                     # 256 target pages: a whole number of bitmap words
ODD_BLOCK = "odd.ram"
ODD_LEN = 100 * 4096                    # 100 pages: 28 padding bits in the last word
CONFIG = wire.Configuration(machine_type="pc-q35-8.2")
READY_PING_BYTES = wire.encode(wire.Ping(value=READY_PING))
SWITCH_PING_BYTES = wire.encode(wire.Ping(value=3))      # inside PACKAGED
DEVICE = wire.DeviceSection(section_id=3, idstr="cpu", instance_id=0, version_id=1, payload=b"\x01\x02")


def source_blocks() -> list[wire.RamBlockLayout]:
    return [wire.RamBlockLayout(idstr=BLOCK, used_length=BLOCK_LEN),
            wire.RamBlockLayout(idstr=ODD_BLOCK, used_length=ODD_LEN)]


def preamble_items() -> list[wire.WireEvent]:
    """The destination's view of a fresh main stream up to the switch (the source's own preamble)."""
    return SourceSession(source_blocks(), CONFIG, preempt=False).preamble()


def switch_items(with_listen: bool = True) -> list[wire.WireEvent]:
    """What the source sends when its guest stopped (see SourceSession._switch)."""
    inner: list[wire.WireEvent] = [wire.PostcopyListen()] if with_listen else []
    inner += [DEVICE, wire.Ping(value=3), wire.PostcopyRun()]
    return [
        wire.PostcopyRamDiscard(idstr=BLOCK, ranges=((0, BLOCK_LEN),)),
        wire.PostcopyRamDiscard(idstr=ODD_BLOCK, ranges=((0, ODD_LEN),)),
        wire.Ping(value=2),
        wire.Packaged(events=tuple(inner)),
    ]


def transitions_of(actions: list[Action]) -> list[S]:
    return [a.status for a in actions if isinstance(a, StatusChanged)]


def of_type(actions: list[Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def check_transitions(table: dict, before: S, actions: list[Action]) -> S:
    """Every StatusChanged follows a table transition from the status before it; return the last status."""
    status = before
    for new in transitions_of(actions):
        targets = {dst for (src, _t), dst in table.items() if src is status}
        assert new in targets, f"StatusChanged({new}) from {status}: not in the table"
        status = new
    return status


# -- destination -------------------------------------------------------------------------------


@dataclass
class Dest:
    """A destination session and a shell-like driver: conn ids, a clock, the status history."""

    preempt: bool = False
    link_timeout: float = 3.0
    recover_timeout: float = 120.0
    now: float = 0.0
    next_conn: int = 1
    main: int | None = None
    pre: int | None = None
    recovery_main: int | None = None
    missing: int = 0                    # the shell's answer to CheckComplete
    fail_fast: bool = False
    log: list[Action] = field(default_factory=list)
    queued: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.s = DestinationSession(preempt=self.preempt, link_timeout=self.link_timeout,
                                    recover_timeout=self.recover_timeout, fail_fast=self.fail_fast)

    # every input goes through here: the table check and the shell's follow-up inputs
    def _took(self, before: S, actions: list[Action]) -> list[Action]:
        out = list(actions)
        i = 0
        while i < len(out):
            if isinstance(out[i], CheckComplete):       # the shell answers at once (synchronous)
                out[i + 1:i + 1] = self.s.handle(StreamChecked(self.missing), self.now)
            elif isinstance(out[i], CollectConnections):    # so does it here: the accept queue
                queued, self.queued = tuple(self.queued), []
                out[i + 1:i + 1] = self.s.handle(ConnectionsCollected(queued), self.now)
            i += 1
        check_transitions(DESTINATION_TRANSITIONS, before, out)
        self.log += out
        return out

    def start(self) -> list[Action]:
        before = self.s.status
        return self._took(before, self.s.start(self.now))

    def feed(self, event) -> list[Action]:
        before = self.s.status
        return self._took(before, self.s.handle(event, self.now))

    def advance(self, dt: float) -> list[Action]:
        self.now += dt
        before = self.s.status
        return self._took(before, self.s.handle_timer(self.now))

    def fire_timer(self) -> list[Action]:
        t = self.s.get_timer()
        assert t is not None, "no timer armed"
        self.now = max(self.now, t)
        before = self.s.status
        return self._took(before, self.s.handle_timer(self.now))

    def accept(self, host: str = SRC_HOST) -> tuple[int, list[Action]]:
        conn = self.next_conn
        self.next_conn += 1
        return conn, self.feed(ConnectionAccepted(conn, host))

    def queue(self, host: str = SRC_HOST) -> int:
        """A connection the kernel accepted that the shell has not reported yet."""
        conn = self.next_conn
        self.next_conn += 1
        self.queued.append((conn, host))
        return conn

    def connect(self, first: bytes, host: str = SRC_HOST) -> tuple[int, list[Action]]:
        conn, a1 = self.accept(host)
        return conn, a1 + self.feed(ConnectionSpoke(conn, first))

    def silent(self, host: str = SRC_HOST) -> tuple[int, list[Action]]:
        """A connection that says nothing: the preempt channel's way."""
        conn, a1 = self.accept(host)
        return conn, a1 + self.advance(PREEMPT_SILENCE_SECONDS * 2)

    def items(self, conn: int, events) -> list[Action]:
        out: list[Action] = []
        for e in events:
            out += self.feed(StreamItem(conn, e))
        return out

    # -- to each status ---------------------------------------------------------------------

    def to_setup(self) -> Dest:
        self.start()
        assert self.s.status is S.SETUP
        return self

    def to_setup_with_main(self) -> Dest:
        self.to_setup()
        self.main, _ = self.connect(b"Q")
        assert self.s.status is S.SETUP
        return self

    def to_active(self) -> Dest:
        self.to_setup_with_main()
        if self.preempt:
            self.pre, acts = self.silent()
            assert of_type(acts, AcceptPreempt)
        self.items(self.main, preamble_items())
        assert self.s.status is S.ACTIVE
        return self

    def to_postcopy_active(self) -> Dest:
        self.to_active()
        acts = self.items(self.main, switch_items())
        assert self.s.status is S.POSTCOPY_ACTIVE, acts
        self.items(self.main, [wire.Ping(value=4)])
        return self

    def to_paused(self) -> Dest:
        self.to_postcopy_active()
        self.feed(ConnectionClosed(self.main, "reset"))
        if self.pre is not None:
            self.feed(ConnectionClosed(self.pre, "reset"))      # retired: ignored
        assert self.s.status is S.POSTCOPY_PAUSED
        return self

    def to_recover(self, host: str = SRC_HOST) -> Dest:
        self.to_paused()
        self.recovery_main, _ = self.connect(b"\x08", host)
        assert self.s.status is S.POSTCOPY_RECOVER
        if self.preempt:
            self.pre, _ = self.silent(host)
        return self

    def resume(self) -> list[Action]:
        assert self.recovery_main is not None
        return self.items(self.recovery_main, [wire.RecvBitmapRequest(idstr=BLOCK),
                                               wire.RecvBitmapRequest(idstr=ODD_BLOCK), wire.PostcopyResume()])


# -- source ------------------------------------------------------------------------------------


@dataclass
class Src:
    """A source session and a shell-like driver: Connect and StopGuest are answered at once."""

    preempt: bool = False
    link_timeout: float = 3.0
    recover_timeout: float = 120.0
    hold_switchover: bool = False
    connect_ok: bool = True
    now: float = 0.0
    log: list[Action] = field(default_factory=list)
    precopy: SwitchoverPolicy | None = None
    dirty_found: int = 100
    """What ScanDirty answers (pages written since the last scan)."""
    discard_ranges: int = 7
    """What SendDiscards answers."""
    answer_drain: bool = True
    """The destination answers the PING before the stop at once (its PONG is fed back)."""
    answer_ready: bool = True
    """Whether the destination answers READY_PING at once (else the test feeds its PONG)."""
    answer_switch: bool = True
    """Whether the destination answers the switch's PING 3 (in PACKAGED) at once."""

    def __post_init__(self) -> None:
        self.s = SourceSession(source_blocks(), CONFIG, preempt=self.preempt, hold_switchover=self.hold_switchover,
                               link_timeout=self.link_timeout, recover_timeout=self.recover_timeout,
                               precopy=self.precopy, tracking="wp-async")

    def _took(self, before: S, actions: list[Action]) -> list[Action]:
        out = list(actions)
        i = 0
        ready_due = pong3_due = False
        while i < len(out):
            a = out[i]
            follow = None
            if isinstance(a, Connect):
                follow = Connected(a.channel) if self.connect_ok else ConnectFailed(a.channel, "refused")
            elif isinstance(a, StopGuest):
                follow = GuestStopped((DEVICE,), self.now)
            elif isinstance(a, Write) and self.answer_ready and a.data == READY_PING_BYTES:
                ready_due = True
            elif isinstance(a, Write) and self.answer_switch and SWITCH_PING_BYTES in a.data:
                pong3_due = True
            elif isinstance(a, ScanDirty):
                follow = DirtyScanned(self.dirty_found)
            elif isinstance(a, SendDiscards):
                follow = DiscardsSent(self.discard_ranges)
            elif isinstance(a, Write) and self.answer_drain and a.data == DRAIN_PING_BYTES:
                follow = ReturnPathMessage(wire.Pong(value=DRAIN_PING))
            elif isinstance(a, Write) and self.answer_drain and a.data == DRAIN_FALLBACK_PING_BYTES:
                follow = ReturnPathMessage(wire.Pong(value=DRAIN_FALLBACK_PING))
            if follow is not None:
                out[i + 1:i + 1] = self.s.handle(follow, self.now)
            i += 1
            if i == len(out) and ready_due:
                # a destination that took in the RAM setup: its PONG comes back after this batch
                ready_due = False
                out += self.s.handle(ReturnPathMessage(wire.Pong(value=READY_PING)), self.now)
            if i == len(out) and pong3_due:
                # the destination at RUN: PONG 3 comes back after the batch with the switch
                pong3_due = False
                out += self.s.handle(ReturnPathMessage(wire.Pong(value=3)), self.now)
        check_transitions(SOURCE_TRANSITIONS, before, out)
        self.log += out
        return out

    def start(self) -> list[Action]:
        return self._took(self.s.status, self.s.start(self.now))

    def feed(self, event) -> list[Action]:
        return self._took(self.s.status, self.s.handle(event, self.now))

    def rp(self, event: wire.WireEvent) -> list[Action]:
        return self.feed(ReturnPathMessage(event))

    def advance(self, dt: float) -> list[Action]:
        self.now += dt
        return self._took(self.s.status, self.s.handle_timer(self.now))

    def fire_timer(self) -> list[Action]:
        t = self.s.get_timer()
        assert t is not None, "no timer armed"
        self.now = max(self.now, t)
        return self._took(self.s.status, self.s.handle_timer(self.now))

    def to_setup(self) -> Src:
        ok, self.connect_ok = self.connect_ok, False
        self.s.connect_timeout = 1.0        # a destination still starting: retried, still SETUP
        self.start()
        self.connect_ok = ok
        assert self.s.status is S.SETUP
        return self

    def to_active(self) -> Src:
        self.hold_switchover = True
        self.s.hold_switchover = True
        self.s.switch_requested = False
        self.start()
        assert self.s.status is S.ACTIVE
        return self

    def to_precopy(self) -> Src:
        """Connected, precopy under way: tracking on, every page dirty, round 0 sent by C."""
        acts = self.start()
        assert self.s.status is S.ACTIVE
        assert acts[-3:] == [StartTracking(), MarkAllDirty(), StartRound(0)] or \
            acts[-4:-1] == [StartTracking(), MarkAllDirty(), StartRound(0)], acts
        return self

    def to_postcopy_active(self) -> Src:
        self.start()
        assert self.s.status is S.POSTCOPY_ACTIVE
        return self

    def to_paused(self) -> Src:
        self.to_postcopy_active()
        self.feed(ChannelFailed("return path closed"))
        assert self.s.status is S.POSTCOPY_PAUSED
        return self

    def to_recover(self) -> Src:
        """Paused, then the retry connects: RECV_BITMAP requests sent, the handshake under way."""
        self.to_paused()
        self.fire_timer()
        assert self.s.status is S.POSTCOPY_RECOVER
        assert self.s.recovery.handshake
        return self

    def good_bitmaps(self) -> list[Action]:
        out = self.rp(wire.RecvBitmap(idstr=BLOCK, bitmap=bitmap(BLOCK_LEN // 4096)))
        return out + self.rp(wire.RecvBitmap(idstr=ODD_BLOCK, bitmap=bitmap(ODD_LEN // 4096)))


def bitmap(npages: int, received: int | None = None, *, extra_bits: int = 0, words: int | None = None) -> bytes:
    """A RECV_BITMAP body: ``received`` (default: all) pages set, little-endian 64-bit words."""
    n = npages if received is None else received
    value = ((1 << n) - 1) | extra_bits
    nwords = (npages + 63) // 64 if words is None else words
    return value.to_bytes(nwords * 8, "little")
