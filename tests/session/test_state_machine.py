"""Random orders of inputs, per role: the sessions never raise, follow their table,
and (destination) never drop an outstanding page request.

The environment is shell-like where the shell is synchronous (the source's
Connect and StopGuest are answered at once; the destination's CheckComplete
too), and random everywhere else: connections accepted, speaking, closing and
sending items in any order (stale ones too), timers, operator commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import (
    BLOCK,
    BLOCK_LEN,
    DEVICE,
    ODD_BLOCK,
    ODD_LEN,
    OTHER_HOST,
    SRC_HOST,
    Dest,
    Src,
    bitmap,
    preamble_items,
    switch_items,
)

from postcopy import wire
from postcopy.session import (
    AttachReturnPath,
    BulkFinished,
    ChannelEnded,
    ChannelFailed,
    CloseConnection,
    ConnectionAccepted,
    ConnectionClosed,
    ConnectionSpoke,
    DataPathFailed,
    Finish,
    MigrationStatus,
    PauseRequested,
    RecoverRequested,
    ResendRequests,
    ResetBeforeRun,
    ResumeRequested,
    StartPostcopy,
    StatusChanged,
    StopGuest,
    StreamItem,
)

S = MigrationStatus
SETTINGS = settings(max_examples=200, deadline=None, stateful_step_count=40,
                    suppress_health_check=[HealthCheck.too_slow])

_PRE = preamble_items()
_SWITCH = switch_items()
MAIN_ITEMS = [
    *_PRE, *_SWITCH, *switch_items(with_listen=False),
    wire.PostcopyListen(), wire.PostcopyRun(), DEVICE, wire.Ping(value=4), wire.EndOfStream(),
    wire.ConnectionClosed(complete=False), wire.ConnectionClosed(complete=True),
    wire.Ping(value=5), wire.Ping(value=6), wire.EndOfStream(),
]
#: Items that fail the migration wherever they come: drawn rarely.
BAD_MAIN_ITEMS = [
    wire.PostcopyRamDiscard(idstr=BLOCK, ranges=((4096, 1 << 30),)),
    wire.PostcopyRamDiscard(idstr="nope.ram", ranges=((0, 4096),)),
    wire.PostcopyAdvise(pagesize_summary=2 << 20, target_page_size=4096),
    wire.Packaged(events=(wire.PostcopyListen(), wire.Ping(value=3))),
    wire.RecvBitmapRequest(idstr=BLOCK), wire.PostcopyResume(),
]
RECOVERY_ITEMS = [
    wire.RecvBitmapRequest(idstr=BLOCK), wire.RecvBitmapRequest(idstr=ODD_BLOCK),
    wire.RecvBitmapRequest(idstr="nope.ram"), wire.Ping(value=7), wire.PostcopyResume(),
    wire.ConnectionClosed(complete=False), wire.PostcopyListen(), wire.EndOfStream(),
]
DTS = [0.0005, 0.003, 0.006, 0.5, 2.0, 3.5, 40.0, 130.0]


class DestinationMachine(RuleBasedStateMachine):
    """Random connection life cycles against one DestinationSession."""

    @initialize(preempt=st.booleans(), recover_timeout=st.sampled_from([10.0, 120.0]))
    def init(self, preempt: bool, recover_timeout: float) -> None:
        self.d = Dest(preempt=preempt, recover_timeout=recover_timeout)
        self.conns: dict[int, str] = {}       # conn -> "pending" | "Q" | "cmd" | "junk" | "ended"
        self.fed_first: set[int] = set()
        self.ran = False
        self.detached = False
        self.finished = False
        self._check(S.NONE, self.d.start())

    # -- invariants over each batch of actions ------------------------------------------------

    def _check(self, before: S, acts: list) -> None:
        assert isinstance(self.d.s.status, MigrationStatus)
        if self.finished:
            assert all(isinstance(a, CloseConnection) for a in acts), f"actions after Finish: {acts}"
            return
        status = before
        for i, a in enumerate(acts):
            if isinstance(a, StatusChanged):
                if a.status is S.POSTCOPY_ACTIVE:
                    if status is S.POSTCOPY_RECOVER:
                        assert ResendRequests() in acts[:i], "resumed without resending the outstanding requests"
                    self.ran = True
                if a.status is S.POSTCOPY_PAUSED:
                    assert AttachReturnPath(None) in acts[:i], "paused with the page requests on a dead channel"
                status = a.status
            elif isinstance(a, ResetBeforeRun):
                assert not self.ran, "ResetBeforeRun after RUN: a running guest's pages dropped"
            elif isinstance(a, AttachReturnPath) and self.ran:
                if a.conn is None:
                    self.detached = True
                elif self.detached:
                    assert ResendRequests() in acts[i:], "return path attached again without ResendRequests"
                    self.detached = False
            elif isinstance(a, Finish):
                self.finished = True
        assert status is self.d.s.status

    def _feed(self, event) -> None:
        before = self.d.s.status
        self._check(before, self.d.feed(event))

    # -- rules ----------------------------------------------------------------------------------

    @rule(host=st.sampled_from([SRC_HOST, SRC_HOST, OTHER_HOST]))
    def accept(self, host: str) -> None:
        conn = self.d.next_conn
        self.d.next_conn += 1
        self.conns[conn] = "pending"
        self._feed(ConnectionAccepted(conn, host))

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), first=st.sampled_from([b"Q", b"Q", b"\x08", b"\x08", b"\x00"]))
    def spoke(self, data, first: bytes) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conns)))
        if self.conns[conn] == "pending":
            self.conns[conn] = {b"Q": "Q", b"\x08": "cmd"}.get(first, "junk")
        self._feed(ConnectionSpoke(conn, first))

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def closed(self, data) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conns)))
        self.conns[conn] = "ended"
        self._feed(ConnectionClosed(conn, "reset"))

    @precondition(lambda self: any(k in ("Q", "cmd") for k in self.conns.values()))
    @rule(data=st.data())
    def item(self, data) -> None:
        conn = data.draw(st.sampled_from(sorted(c for c, k in self.conns.items() if k in ("Q", "cmd"))))
        kind = self.conns[conn]
        if kind == "Q" and conn not in self.fed_first:
            event = wire.StreamHeader()         # the decoder's first item of a fresh stream
        elif kind == "Q":
            bad = data.draw(st.integers(0, 9)) == 0
            event = data.draw(st.sampled_from(BAD_MAIN_ITEMS if bad else MAIN_ITEMS))
        else:
            event = data.draw(st.sampled_from(RECOVERY_ITEMS))
        self.fed_first.add(conn)
        if isinstance(event, wire.ConnectionClosed | wire.EndOfStream):
            self.conns[conn] = "ended"          # the reader feeds nothing after these
        self._feed(StreamItem(conn, event))

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), n=st.integers(1, 6))
    def preamble_burst(self, data, n: int) -> None:
        """Several items of one fresh stream in order, so the sequences get somewhere."""
        qs = sorted(c for c, k in self.conns.items() if k == "Q")
        if not qs:
            return
        conn = data.draw(st.sampled_from(qs))
        seq = [] if conn in self.fed_first else [wire.StreamHeader()]
        seq += data.draw(st.sampled_from([_PRE[1:], _SWITCH, _PRE[1:] + _SWITCH]))
        self.fed_first.add(conn)
        for e in seq[: n * 3]:
            self._feed(StreamItem(conn, e))

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def channel_ended(self, data) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conns)))
        self._feed(ChannelEnded(conn))

    @rule(missing=st.sampled_from([0, 0, 3]))
    def set_missing(self, missing: int) -> None:
        self.d.missing = missing

    # -- macros: the realistic sequences, so random runs get past the switch and into recoveries --

    def _new_conn(self, host: str, first: bytes | None) -> int:
        conn = self.d.next_conn
        self.d.next_conn += 1
        self.conns[conn] = "pending"
        self._feed(ConnectionAccepted(conn, host))
        if first is not None:
            self.conns[conn] = "Q" if first == b"Q" else "cmd"
            self._feed(ConnectionSpoke(conn, first))
        return conn

    @rule(with_preempt=st.booleans(), switch=st.booleans())
    def fresh_stream(self, with_preempt: bool, switch: bool) -> None:
        """A source's whole stream: main, its preempt channel (silent), the preamble, maybe the switch."""
        conn = self._new_conn(SRC_HOST, b"Q")
        if with_preempt:
            self._new_conn(SRC_HOST, None)
            if not self.finished:
                self._check(self.d.s.status, self.d.advance(0.006))
        self.fed_first.add(conn)
        for e in [*_PRE, *(_SWITCH if switch else [])]:
            self._feed(StreamItem(conn, e))

    @rule(with_preempt=st.booleans(), complete=st.booleans(), host=st.sampled_from([SRC_HOST, SRC_HOST, OTHER_HOST]))
    def recovery(self, with_preempt: bool, complete: bool, host: str) -> None:
        """A source's recovery: the command connection, its preempt channel, maybe the whole handshake."""
        conn = self._new_conn(host, b"\x08")
        if with_preempt:
            self._new_conn(host, None)
            if not self.finished:
                self._check(self.d.s.status, self.d.advance(0.006))
        self.fed_first.add(conn)
        if complete:
            for e in (wire.RecvBitmapRequest(idstr=BLOCK), wire.RecvBitmapRequest(idstr=ODD_BLOCK),
                      wire.PostcopyResume()):
                self._feed(StreamItem(conn, e))

    @rule(cmd=st.sampled_from([PauseRequested(), RecoverRequested()]))
    def operator(self, cmd) -> None:
        self._feed(cmd)

    @rule(kind=st.sampled_from(["uffd", "bogus"]), rare=st.integers(0, 9))
    def data_path_failed(self, kind: str, rare: int) -> None:
        if rare == 0:
            self._feed(DataPathFailed(kind, "injected"))

    @precondition(lambda self: not self.finished)
    @rule(dt=st.sampled_from(DTS))
    def advance(self, dt: float) -> None:
        before = self.d.s.status
        self._check(before, self.d.advance(dt))

    @precondition(lambda self: not self.finished and self.d.s.get_timer() is not None)
    @rule()
    def fire_timer(self) -> None:
        before = self.d.s.status
        self._check(before, self.d.fire_timer())

    @invariant()
    def status_is_a_status(self) -> None:
        if hasattr(self, "d"):
            assert isinstance(self.d.s.status, MigrationStatus)
            t = self.d.s.get_timer()
            assert t is None or isinstance(t, float)


class SourceMachine(RuleBasedStateMachine):
    """Random return-path messages, channel failures, timers and commands against one SourceSession."""

    @initialize(preempt=st.booleans(), hold=st.booleans(), connect_ok=st.booleans(),
                recover_timeout=st.sampled_from([10.0, 120.0]))
    def init(self, preempt: bool, hold: bool, connect_ok: bool, recover_timeout: float) -> None:
        self.s = Src(preempt=preempt, hold_switchover=hold, recover_timeout=recover_timeout, connect_ok=connect_ok)
        self.s.s.connect_timeout = 1.0
        self.finished = False
        self.stops = 0
        self._check(self.s.start())

    def _check(self, acts: list) -> None:
        assert isinstance(self.s.s.status, MigrationStatus)
        if self.finished:
            assert acts == [], f"actions after Finish: {acts}"
            return
        self.stops += sum(isinstance(a, StopGuest) for a in acts)
        assert self.stops <= 1, "the guest stopped twice"
        fins = [a for a in acts if isinstance(a, Finish)]
        assert len(fins) <= 1
        if fins:
            self.finished = True
            assert self.s.s.status.finished

    @rule(ok=st.booleans())
    def connect_outcome(self, ok: bool) -> None:
        self.s.connect_ok = ok

    @rule(event=st.sampled_from([
        wire.Pong(value=1), wire.Pong(value=3), wire.Pong(value=0x50430001), wire.Shut(value=0), wire.Shut(value=1),
        wire.Shut(value=2), wire.Shut(value=2), wire.ResumeAck(value=1),
        wire.RecvBitmap(idstr=BLOCK, bitmap=bitmap(BLOCK_LEN // 4096)),
        wire.RecvBitmap(idstr=ODD_BLOCK, bitmap=bitmap(ODD_LEN // 4096, 50)),
        wire.RecvBitmap(idstr=ODD_BLOCK, bitmap=bitmap(ODD_LEN // 4096, extra_bits=1 << 127)),
        wire.RecvBitmap(idstr=BLOCK, bitmap=b"\xff" * 8),
        wire.PageRequest(start=0, length=4096, idstr=BLOCK),
    ]))
    def return_path(self, event) -> None:
        self._check(self.s.rp(event))

    @rule()
    def handshake_answers(self) -> None:
        """The destination's right answers, in order, so recoveries complete."""
        if self.s.s.recovery.handshake:
            self._check(self.s.good_bitmaps())
            self._check(self.s.rp(wire.ResumeAck(value=1)))

    @rule(event=st.sampled_from([ChannelFailed("return path closed"), BulkFinished(), StartPostcopy(),
                                 PauseRequested(), ResumeRequested()]))
    def input(self, event) -> None:
        self._check(self.s.feed(event))

    @precondition(lambda self: not self.finished)
    @rule(dt=st.sampled_from(DTS))
    def advance(self, dt: float) -> None:
        self._check(self.s.advance(dt))

    @precondition(lambda self: not self.finished and self.s.s.get_timer() is not None)
    @rule()
    def fire_timer(self) -> None:
        self._check(self.s.fire_timer())

    @invariant()
    def status_is_a_status(self) -> None:
        if hasattr(self, "s"):
            assert isinstance(self.s.s.status, MigrationStatus)


TestDestinationMachine = DestinationMachine.TestCase
TestDestinationMachine.settings = SETTINGS
TestSourceMachine = SourceMachine.TestCase
TestSourceMachine.settings = SETTINGS
