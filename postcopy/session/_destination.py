"""The destination's protocol session: every decision of an incoming migration,
with no IO, no threads and no clock.

The shell (``postcopy/destination.py``) accepts connections, peeks their first
byte, decodes main-channel items and runs the C receivers; it feeds what
happened here and carries out the actions that come back, in order.

Connections are told apart by what they say: a fresh main stream starts with
the QEVM header (b"Q"), a recovery main stream with a command (b"\\x08"); the
preempt channel stays silent, so a connection that says nothing for
:data:`PREEMPT_SILENCE_SECONDS` right after a main channel is its preempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .. import wire
from ._errors import MigrationFailed
from ._io import (
    AcceptPreempt,
    Action,
    AnswerBitmapRequest,
    AttachReturnPath,
    BreakLink,
    ChannelEnded,
    CheckComplete,
    CloseConnection,
    CollectConnections,
    ConnectionAccepted,
    ConnectionClosed,
    ConnectionsCollected,
    ConnectionSpoke,
    DataPathFailed,
    Discard,
    Finish,
    HoldStream,
    Input,
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
)
from ._status import MigrationStatus, Trigger, next_status

__all__ = ["PREEMPT_REQUESTS_PING", "PREEMPT_SILENCE_SECONDS", "SHUT_NOTHING_TO_RECOVER", "DestinationSession"]

S = MigrationStatus

#: Why a connection or a stream was refused (a closed set: metrics label values).
REFUSAL_REASONS: Final = (
    "nothing_to_recover",   # a recovery while no guest runs here yet (answered SHUT 2)
    "not_a_migration",      # its first byte is neither a stream header nor a command
    "wrong_peer",           # not from the host the migration belongs to
    "silent",               # said nothing, and no preempt channel was due
    "malformed",            # a stream or handshake the codec or this role refused
    "stalled",              # did not finish its setup or handshake within the link timeout
    "replaced",             # a newer stream or recovery from the source took its place
    "fresh_stream_after_run",  # a whole new stream while a guest runs here
)

#: A connection silent this long right after a main channel is its preempt channel.
PREEMPT_SILENCE_SECONDS: Final = 0.005
#: Heartbeat PINGs of our source's C bulk stream carry this tag in their top bits
#: (uffd/csrc/source.h). QEMU sends none: silence is a broken link only from a peer that pings.
HEARTBEAT_MASK: Final = 0xFFFF0000
HEARTBEAT_PING: Final = 0x50430000
#: Our source's PING before READY (and before RESUME): it reads page requests on the preempt
#: channel's way back, so they go there, not on the return path, which shares the main
#: channel's socket (and its lock) with the bulk stream. QEMU neither sends nor reads this.
PREEMPT_REQUESTS_PING: Final = 0x52455150      # "REQP"
#: SHUT value answering a recovery when no guest runs here yet (the source starts over).
SHUT_NOTHING_TO_RECOVER: Final = 2
_FIRST_HEADER: Final = b"Q"        # QEMU_VM_FILE_MAGIC's first byte
_FIRST_COMMAND: Final = b"\x08"    # QEMU_VM_COMMAND


@dataclass(slots=True)
class _Pending:
    peer_host: str
    deadline: float


@dataclass(slots=True)
class _Attempt:
    """One fresh stream, up to RUN. Replaced whole when the stream starts over."""

    main: int | None = None
    preempt: int | None = None
    advise: wire.PostcopyAdvise | None = None
    ram_section_id: int = 0
    layout: wire.RamLayout | None = None
    listening: bool = False
    device_sections: list[wire.DeviceSection] = field(default_factory=list)
    in_package: list[bool] = field(default_factory=list)
    configuration: wire.Configuration | None = None
    discard_ranges: int = 0
    held: tuple[wire.WireEvent, ...] | None = None     # PACKAGED waiting for the preempt channel
    held_deadline: float = 0.0
    collecting: tuple[wire.WireEvent, ...] | None = None    # PACKAGED waiting for ConnectionsCollected
    held_pongs: list[int] = field(default_factory=list)    # PINGs after the RAM setup, answered once the
    pongs_deadline: float = 0.0                             # preempt channel is known (see _ping)
    setup_deadline: float | None = None    # its RAM setup must arrive by then (a stalled peer is dropped)
    pages_in_c: bool = False    # after the RAM setup section the C receiver places precopy pages
    requests_on_preempt: bool = False   # the source reads page requests there (PREEMPT_REQUESTS_PING)


@dataclass(slots=True)
class _Candidate:
    """A connection that claims to be the source, not yet proven: a newer fresh stream
    (proven by a complete RAM setup) or a recovery while the link looks healthy (proven
    by a RECV_BITMAP for a known block). Until then it disturbs nothing."""

    recovery: bool
    peer_host: str
    deadline: float
    items: list[wire.WireEvent] = field(default_factory=list)


@dataclass(slots=True)
class _Link:
    """The channels of the running migration (after RUN), or of a recovery under way."""

    main: int | None = None
    preempt: int | None = None
    handshake: bool = False       # a recovery main whose RESUME has not come yet
    handshake_deadline: float = 0.0
    main_ended: bool = False      # EOF item seen after the last page
    preempt_ended: bool = False
    resume_held: bool = False     # RESUME came before the preempt channel: answered once it is here
    heartbeats: bool = False      # the source pings while it streams: its silence means a broken link
    requests_on_preempt: bool = False   # a recovery's source reads page requests there (PREEMPT_REQUESTS_PING)


class DestinationSession:
    """Sans-IO: ``handle(input, now)`` and ``handle_timer(now)`` return actions."""

    role = "destination"

    def __init__(self, *, preempt: bool, link_timeout: float = 3.0, recover_timeout: float = 120.0,
                 block_page_sizes: dict[str, int] | None = None, fail_fast: bool = False) -> None:
        self.preempt = preempt
        self.fail_fast = fail_fast      # QEMU's way: a bad stream before RUN fails the migration
        self.link_timeout = link_timeout
        self.recover_timeout = recover_timeout
        self.block_page_sizes = dict(block_page_sizes or {})
        self.status = S.NONE
        self.error: MigrationFailed | None = None
        self.source_host: str | None = None
        self.any_peer = False
        self.attempt = _Attempt()
        self.link = _Link()
        self.pending: dict[int, _Pending] = {}
        self.candidates: dict[int, _Candidate] = {}
        self.recover_deadline: float | None = None
        self.paused_since: float | None = None
        self.paused_seconds = 0.0
        self.recoveries = 0
        self.restarts = 0
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.last_refusal = ""
        self.last_break_reason = ""
        self.precopy_only = False       # the source completed in precopy: no postcopy phase
        self._out: list[Action] = []

    # -- entry points -----------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        self._move(Trigger.START, now)
        return self._flush()

    def handle(self, event: Input, now: float) -> list[Action]:
        if self.status.finished:
            if isinstance(event, ConnectionSpoke | ConnectionAccepted):
                self._out.append(CloseConnection(event.conn))
            elif isinstance(event, ConnectionsCollected):
                self._out += [CloseConnection(conn) for conn, _ in event.accepted]
            return self._flush()
        match event:
            case ConnectionAccepted(conn=conn, peer_host=host):
                self._accepted(conn, host, now)
            case ConnectionsCollected(accepted=accepted):
                for conn, host in accepted:
                    self._accepted(conn, host, now)
                self._collected(now)
            case ConnectionSpoke(conn=conn, first=first):
                self._spoke(conn, first, now)
            case ConnectionClosed(conn=conn, reason=reason):
                self._closed(conn, reason, now)
            case StreamItem(conn=conn, event=item):
                self._item(conn, item, now)
            case ChannelEnded(conn=conn):
                if conn == self.link.preempt:
                    self.link.preempt_ended = True
                    self._maybe_complete()
            case DataPathFailed(kind=kind, message=message, conn=conn):
                kind = kind if kind in _DATA_PATH_KINDS else "placement"
                if conn is not None and conn in self.candidates:
                    self._drop_candidate(conn, "malformed", f"{kind}: {message}")
                elif self.status in (S.SETUP, S.ACTIVE) and conn is not None \
                        and conn not in (self.attempt.main, self.attempt.preempt):
                    pass    # a stream already dropped (its reader saw the close): not the stream of now
                elif self.status in (S.SETUP, S.ACTIVE) and kind not in ("internal", "uffd"):
                    self._bad_stream(kind, message, now)
                elif self.status is S.POSTCOPY_RECOVER and conn is not None and conn == self.link.main \
                        and self.link.handshake and kind in wire.ERROR_KINDS:
                    self._refuse_attempt(f"a malformed recovery handshake: {message}", now, "malformed")
                else:
                    self._fail(kind, message, now)
            case StreamChecked(missing_pages=missing):
                if missing:
                    self._fail("incomplete", f"the stream ended with {missing} pages never received", now)
                else:
                    self._out.append(SendReturnPath(wire.encode(wire.Shut(value=0))))
                    self._move(Trigger.COMPLETED, now)
                    self._out.append(Finish(None))
            case PauseRequested():
                if self.status is S.POSTCOPY_ACTIVE:
                    self._break(now, "paused by request")
                elif self.status is S.POSTCOPY_RECOVER:
                    self._drop_link_channels()
                    self.link = _Link()
                    self._move(Trigger.LINK_BROKEN, now)
            case RecoverRequested():
                self.any_peer = True
            case _:
                pass        # inputs of the source role mean nothing here
        return self._flush()

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has something to do, or None."""
        if self.status.finished:
            return None
        times = [p.deadline for p in self.pending.values()]
        times += [c.deadline for c in self.candidates.values()]
        if self.attempt.setup_deadline is not None:
            times.append(self.attempt.setup_deadline)
        if self.attempt.held is not None:
            times.append(self.attempt.held_deadline)
        if self.attempt.held_pongs:
            times.append(self.attempt.pongs_deadline)
        if self.link.handshake or self.link.resume_held:
            times.append(self.link.handshake_deadline)
        if self.recover_deadline is not None:
            times.append(self.recover_deadline)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        if self.status.finished:
            return self._flush()
        for conn, p in list(self.pending.items()):
            # (gone from pending: a silent connection before it failed the migration and closed it)
            if p.deadline <= now and self.pending.pop(conn, None) is not None:
                self._silent(conn, p, now)
        for conn, c in list(self.candidates.items()):
            if c.deadline <= now:
                self._drop_candidate(conn, "stalled", "did not prove itself the source within the link timeout")
        a = self.attempt
        if a.setup_deadline is not None and a.setup_deadline <= now and self.status in (S.SETUP, S.ACTIVE):
            self._bad_stream("truncated", "the stream stalled before its RAM setup", now, reason="stalled")
        if self.attempt.held_pongs and self.attempt.pongs_deadline <= now:
            self._answer_held_pongs()       # no preempt channel yet: PACKAGED will say what is wrong
        if self.attempt.held is not None and self.attempt.held_deadline <= now:
            self._fail("preempt_mismatch", "the source never opened the preempt channel this destination expects: "
                       "start both sides with the same postcopy-preempt setting", now)
        if (self.link.handshake or self.link.resume_held) and self.link.handshake_deadline <= now:
            self._refuse_attempt("the recovery handshake did not finish within the link timeout", now)
        if self.recover_deadline is not None and self.recover_deadline <= now and not self.status.finished:
            self._fail("recovery_timeout", f"no recovery within {self.recover_timeout:.0f} s", now)
        return self._flush()

    # -- what a session knows -----------------------------------------------------------

    @property
    def layout(self) -> wire.RamLayout | None:
        return self.attempt.layout

    @property
    def discard_ranges(self) -> int:
        return self.attempt.discard_ranges

    def paused_total(self, now: float) -> float:
        extra = now - self.paused_since if self.paused_since is not None else 0.0
        return self.paused_seconds + extra

    # -- connections --------------------------------------------------------------------------

    def _waiting_for_preempt(self) -> bool:
        """The stream is held until the preempt channel is here (PACKAGED or RESUME came first)."""
        if self.status in (S.SETUP, S.ACTIVE):
            a = self.attempt
            return (a.held is not None or bool(a.held_pongs)) and a.preempt is None
        return self.link.resume_held and self.link.preempt is None

    def _claim_preempt(self, now: float) -> bool:
        """QEMU's rule: the connection after main is its preempt channel; take a pending one now."""
        for conn, p in list(self.pending.items()):
            if p.peer_host == self.source_host:
                del self.pending[conn]
                self._silent(conn, p, now)
                return True
        return False

    def _accepted(self, conn: int, host: str, now: float) -> None:
        if self._waiting_for_preempt() and host == self.source_host:
            self._silent(conn, _Pending(host, now), now)   # PACKAGED waits for exactly this
        else:
            wait = PREEMPT_SILENCE_SECONDS if self._expects_preempt() else self.link_timeout
            self.pending[conn] = _Pending(host, now + wait)

    def _collected(self, now: float) -> None:
        """Every connection made before PACKAGED is known: preempt off here, one from the
        source is its preempt channel (QEMU opens it before PACKAGED, and a shell's
        accept may lag behind its stream reader: the end of a small guest's stream can
        come right after PACKAGED, long before a silence would say it)."""
        a = self.attempt
        inner, a.collecting = a.collecting, None
        if inner is None or a.main is None or self.status not in (S.SETUP, S.ACTIVE):
            return
        if self._unexpected_preempt_pending():
            self._fail("preempt_mismatch", _UNEXPECTED_PREEMPT, now)
            return
        self._packaged(a.main, inner, now)
        if not self.status.finished:
            self._out.append(ResumeStream(a.main))

    def _expects_preempt(self) -> bool:
        if not self.preempt:
            return False
        if self.status in (S.SETUP, S.ACTIVE):
            return self.attempt.main is not None and self.attempt.preempt is None
        return (self.link.handshake or self.link.resume_held) and self.link.preempt is None

    def _spoke(self, conn: int, first: bytes, now: float) -> None:
        p = self.pending.pop(conn, None)
        if p is None:
            return
        if first == _FIRST_HEADER:
            if self.status in (S.SETUP, S.ACTIVE):
                self._fresh_main(conn, p.peer_host, now)
            else:
                self._refuse(conn, "fresh_stream_after_run", "a whole new stream while a guest runs here")
        elif first == _FIRST_COMMAND:
            self._recovery_main(conn, p.peer_host, now)
        else:
            self._refuse(conn, "not_a_migration", f"first byte {first!r} starts neither a stream nor a recovery")

    def _fresh_main(self, conn: int, host: str, now: float) -> None:
        if self.attempt.main is not None:
            # A newer stream may replace one whose source gave up on it (its link died
            # unnoticed here), but only once its complete RAM setup shows it is a source.
            if not self._peer_ok(host):
                self._refuse(conn, "wrong_peer", f"a second stream from {host}, not from the source's host")
                return
            self.candidates[conn] = _Candidate(recovery=False, peer_host=host, deadline=now + self.link_timeout)
            self._out.append(ReceiveStream(conn, recovery=False))
            return
        self._adopt_fresh(conn, host, now)

    def _adopt_fresh(self, conn: int, host: str, now: float, *, reading: bool = False) -> None:
        """``conn`` is the attempt's main channel; ``reading``: a candidate whose reader runs already."""
        self.attempt.main = conn
        self.attempt.setup_deadline = now + self.link_timeout
        self.source_host = host
        for p in self.pending.values():     # the preempt channel follows at once, silent
            p.deadline = min(p.deadline, now + PREEMPT_SILENCE_SECONDS)
        if not reading:
            self._out.append(ReceiveStream(conn, recovery=False))

    def _recovery_main(self, conn: int, host: str, now: float) -> None:
        if self.status in (S.SETUP, S.ACTIVE):
            self._count("nothing_to_recover", "a recovery while no guest runs here: SHUT 2, start over")
            self._out.append(CloseConnection(conn, wire.encode(wire.Shut(value=SHUT_NOTHING_TO_RECOVER))))
            return
        if not self._peer_ok(host):
            self._refuse(conn, "wrong_peer", f"a recovery from {host}, not from the source's host")
            return
        if self.status is S.POSTCOPY_ACTIVE:
            # The source may have noticed a broken link first and be back already; a
            # stranger's knock must not break a healthy link: it proves itself first.
            self.candidates[conn] = _Candidate(recovery=True, peer_host=host, deadline=now + self.link_timeout)
            self._out.append(ReceiveStream(conn, recovery=True))
            return
        self._start_recovery(conn, host, now)

    def _start_recovery(self, conn: int, host: str, now: float, *, reading: bool = False) -> None:
        """``conn`` starts the recovery handshake; ``reading``: a candidate whose reader runs already."""
        if self.status is S.POSTCOPY_RECOVER:
            # a newer recovery replaces an attempt its source abandoned
            self._drop_link_channels()
            self._move(Trigger.RECOVERY_FAILED, now)
        self.source_host = host         # the operator may have named a new peer (migrate-recover)
        self.link = _Link(main=conn, handshake=True, handshake_deadline=now + self.link_timeout)
        for p in self.pending.values():
            p.deadline = min(p.deadline, now + PREEMPT_SILENCE_SECONDS)
        self._move(Trigger.RECOVERY_STARTED, now)
        if not reading:
            self._out.append(ReceiveStream(conn, recovery=True))

    def _silent(self, conn: int, p: _Pending, now: float) -> None:
        """A connection that said nothing: the preempt channel if one is due from its host."""
        if self._expects_preempt() and p.peer_host == self.source_host:
            self._out.append(AcceptPreempt(conn))
            if self.status in (S.SETUP, S.ACTIVE):
                a = self.attempt
                a.preempt = conn
                self._answer_held_pongs()
                if a.listening:
                    self._out.append(StartPreemptReceiver(conn, requests=a.requests_on_preempt))
                if a.held is not None and a.main is not None:
                    held, a.held = a.held, None
                    self._packaged(a.main, held, now)
                    if not self.status.finished:    # RUN went through: the reader goes on
                        self._out.append(ResumeStream(a.main))
            else:
                self.link.preempt = conn
                if self.link.resume_held and self.link.main is not None:
                    self._resume(self.link.main, now)
                    self._out.append(ResumeStream(self.link.main))
            return
        if not self.preempt and p.peer_host == self.source_host and self._main_open():
            self._out.append(CloseConnection(conn))
            self._fail("preempt_mismatch", _UNEXPECTED_PREEMPT, now)   # QEMU's rule: after main, preempt
            return
        self._refuse(conn, "silent", "said nothing, and no preempt channel was due")

    def _main_open(self) -> bool:
        if self.status in (S.SETUP, S.ACTIVE):
            return self.attempt.main is not None
        return self.status is S.POSTCOPY_ACTIVE and self.link.main is not None and not self.link.handshake

    def _unexpected_preempt_pending(self) -> bool:
        """Preempt off here, and a connection from the source is open besides main: its preempt channel."""
        return any(p.peer_host == self.source_host for p in self.pending.values())

    def _peer_ok(self, host: str) -> bool:
        return self.any_peer or self.source_host is None or host == self.source_host

    def _count(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        self.last_refusal = f"{reason}: {detail}"

    def _refuse(self, conn: int, reason: str, detail: str) -> None:
        self._count(reason, detail)
        self._out.append(CloseConnection(conn))

    def _drop_candidate(self, conn: int, reason: str, detail: str) -> None:
        if self.candidates.pop(conn, None) is not None:
            self._refuse(conn, reason, detail)

    def _candidate_item(self, conn: int, item: wire.WireEvent, now: float) -> None:
        """A claimant proves itself: a fresh stream by its complete RAM setup, a
        recovery by a RECV_BITMAP for a known block; anything else refuses it."""
        c = self.candidates[conn]
        c.items.append(item)
        if c.recovery:
            layout = self.attempt.layout
            if isinstance(item, wire.RecvBitmapRequest) and layout is not None and layout.index(item.idstr) is not None:
                del self.candidates[conn]
                if self.status is S.POSTCOPY_ACTIVE:
                    self._break(now, "the source reconnected")
                self._start_recovery(conn, c.peer_host, now, reading=True)
                self._handshake_item(conn, item, now)
            else:
                self._drop_candidate(conn, "malformed", f"a recovery that starts with {type(item).__name__}")
        elif isinstance(item, wire.RamSetup):
            del self.candidates[conn]
            if self.status not in (S.SETUP, S.ACTIVE):
                self._refuse(conn, "fresh_stream_after_run", "a whole new stream while a guest runs here")
                return
            self._start_over(now, "a newer stream from the source replaces it", reason="replaced")
            self._adopt_fresh(conn, c.peer_host, now, reading=True)
            for earlier in c.items:
                self._preamble_item(conn, earlier, now)
        elif isinstance(item, wire.ConnectionClosed):
            self._drop_candidate(conn, "malformed", "closed before its RAM setup")
        elif len(c.items) > _MAX_CANDIDATE_ITEMS:
            self._drop_candidate(conn, "malformed", "no RAM setup among its first items")

    def _closed(self, conn: int, reason: str, now: float) -> None:
        if self.pending.pop(conn, None) is not None:
            return
        if self.candidates.pop(conn, None) is not None:
            self._out.append(CloseConnection(conn))
            return
        if self.status in (S.SETUP, S.ACTIVE):
            if conn in (self.attempt.main, self.attempt.preempt):
                self._start_over(now, reason)
            return
        if conn not in (self.link.main, self.link.preempt):
            return      # a channel already retired
        if self.status is S.POSTCOPY_ACTIVE:
            if conn == self.link.main and self.link.main_ended:
                return  # the source closes after its EOF item; we finish on the preempt EOS
            self._break(now, reason)
        elif self.status is S.POSTCOPY_RECOVER:
            self._refuse_attempt(f"the recovery connection failed: {reason}", now)

    # -- the main stream -----------------------------------------------------------------

    def _item(self, conn: int, item: wire.WireEvent, now: float) -> None:
        if conn in self.candidates:
            self._candidate_item(conn, item, now)
        elif self.status in (S.SETUP, S.ACTIVE):
            if conn == self.attempt.main:
                self._preamble_item(conn, item, now)
        elif conn == self.link.main:
            if self.link.handshake:
                self._handshake_item(conn, item, now)
            elif self.link.resume_held:
                # RESUME waits for its preempt channel and the stream is held: a source that goes on
                # before RESUME_ACK (its EOF would complete a migration still in recovery)
                if isinstance(item, wire.ConnectionClosed):
                    self._refuse_attempt("the recovery connection closed before RESUME was answered", now)
                else:
                    self._refuse_attempt(f"{type(item).__name__} before RESUME was answered", now, "malformed")
            else:
                self._postcopy_item(item, now)

    def _preamble_item(self, conn: int, item: wire.WireEvent, now: float) -> None:
        a = self.attempt
        match item:
            case wire.StreamHeader():
                if self.status is S.SETUP:
                    self._move(Trigger.STREAM_STARTED, now)
            case wire.OpenReturnPath():
                self._out.append(AttachReturnPath(conn))
            case wire.Ping(value=v):
                self._ping(v, now)
            case wire.PostcopyAdvise():
                a.advise = item
            case wire.SectionStart(idstr="ram", section_id=sid):
                a.ram_section_id = sid
            case wire.SectionFooter(section_id=sid) if a.layout is not None and sid == a.ram_section_id \
                    and not a.pages_in_c:
                # The RAM setup is complete: precopy pages go to the C receiver (plain writes,
                # nothing registered yet); only commands and other sections come back here.
                a.pages_in_c = True
                self._out.append(ReceivePages(conn, silence_breaks=False))
            case wire.RamSetup(blocks=entries):
                self._ram_setup(entries, now)
            case wire.RamPages():
                if a.layout is None:
                    self._bad_stream("no_ram_setup", "page records before the RAM setup", now)
                else:
                    self._out.append(PlacePages(conn, item))
            case wire.PostcopyRamDiscard(idstr=idstr, ranges=ranges):
                self._discard(idstr, ranges, now)
            case wire.Configuration():
                a.configuration = item
            case wire.DeviceSection():
                a.device_sections.append(item)
                a.in_package.append(False)
            case wire.Packaged(events=inner):
                if not self.preempt:
                    a.collecting = inner
                    self._out += [HoldStream(conn), CollectConnections()]
                    return
                if self.preempt and a.preempt is None:
                    self._claim_preempt(now)
                if self.preempt and a.preempt is None:
                    a.held, a.held_deadline = inner, now + self.link_timeout
                    self._out.append(HoldStream(conn))
                    return
                self._packaged(conn, inner, now)
            case wire.PostcopyListen():
                self._listen(now)
            case wire.PostcopyRun():
                self._run(conn, now)
            case wire.ConnectionClosed():
                self._start_over(now, "the source closed the main channel before the switch to postcopy")
            case wire.EndOfStream():
                self._precopy_completed(now)
            case _:
                pass        # configuration, footers, EOS markers: nothing to do

    def _ping(self, value: int, now: float) -> None:
        """A PING before the switch. Once the RAM setup is in, the source may stop its guest on
        the PONG (our source's READY_PING): by then the preempt channel must be known, so that
        none of its setup falls between the guest's stop and RUN. QEMU's rule makes the source's
        next connection after main its preempt channel: taken now if it is here; if not, the
        PONG waits for it (it is accepted at once then, not after a silence), at most a link timeout."""
        a = self.attempt
        if value == PREEMPT_REQUESTS_PING:
            a.requests_on_preempt = True
        if a.layout is not None and self._expects_preempt():
            self._claim_preempt(now)
            if a.preempt is None:
                if not a.held_pongs:
                    a.pongs_deadline = now + self.link_timeout
                a.held_pongs.append(value)
                return
        self._out.append(SendReturnPath(wire.encode(wire.Pong(value=value))))

    def _answer_held_pongs(self) -> None:
        a = self.attempt
        pongs, a.held_pongs = a.held_pongs, []
        for v in pongs:
            self._out.append(SendReturnPath(wire.encode(wire.Pong(value=v))))

    def _precopy_completed(self, now: float) -> None:
        """The source finished in precopy (QEMU does when it converges before
        migrate-start-postcopy): every page came as a plain write and the device state
        followed; no guest faulted, nothing is registered. Start the guest, check, SHUT 0."""
        a = self.attempt
        if a.layout is None:
            self._bad_stream("no_ram_setup", "the stream ended before its RAM setup", now)
            return
        self.precopy_only = True
        self._out += [StartGuest(tuple(a.device_sections), a.configuration, tuple(a.in_package)), CheckComplete()]

    def _packaged(self, conn: int, inner: tuple[wire.WireEvent, ...], now: float) -> None:
        # The package's PINGs are answered right after RUN's guest start: the source's PONG 3
        # then says the guest runs here again, so the downtime it measures (its guest's stop ->
        # PONG 3) is the whole time the guest ran nowhere, as QEMU's STOP -> RESUME (the order
        # of PONGs on the return path is no part of the protocol).
        pongs = tuple(e.value for e in inner if isinstance(e, wire.Ping))
        for event in inner:
            match event:
                case wire.PostcopyListen():
                    self._listen(now)
                case wire.DeviceSection():
                    self.attempt.device_sections.append(event)
                    self.attempt.in_package.append(True)
                case wire.PostcopyRun():
                    self._run(conn, now, pongs)
            if self.status.finished:
                return
        if self.status is not S.POSTCOPY_ACTIVE:
            self._bad_stream("unexpected", "PACKAGED ended without RUN", now)

    def _ram_setup(self, entries: tuple[wire.RamBlockEntry, ...], now: float) -> None:
        a = self.attempt
        a.setup_deadline = None
        blocks = tuple(
            wire.RamBlockLayout(idstr=e.idstr, used_length=e.used_length,
                          host_page_size=e.page_size or self.block_page_sizes.get(e.idstr, wire.DEFAULT_TARGET_PAGE_SIZE))
            for e in entries)
        a.layout = wire.RamLayout(blocks=blocks, section_id=a.ram_section_id)
        # An ADVISE without payload (a source with postcopy-ram off) says nothing to check.
        if a.advise is not None and a.advise.pagesize_summary is not None:
            summary = 0
            for b in blocks:
                summary |= b.host_page_size
            tps = a.advise.target_page_size
            if tps != wire.DEFAULT_TARGET_PAGE_SIZE or a.advise.pagesize_summary != summary:
                self._bad_stream("advise_mismatch",
                                 f"POSTCOPY_ADVISE says target page {tps} and page sizes "
                                 f"{a.advise.pagesize_summary:#x}; the RAM setup's blocks have "
                                 f"{wire.DEFAULT_TARGET_PAGE_SIZE} and {summary:#x}", now)
                return
        self._out.append(PrepareMemory(a.layout))

    def _discard(self, idstr: str, ranges: tuple[tuple[int, int], ...], now: float) -> None:
        layout = self.attempt.layout
        index = layout.index(idstr) if layout is not None else None
        if layout is None or index is None:
            self._bad_stream("unknown_block", f"discard for unknown RAM block {idstr!r}", now)
            return
        block = layout.blocks[index]
        for start, length in ranges:
            if length <= 0 or start < 0 or start + length > block.used_length or start % wire.DEFAULT_TARGET_PAGE_SIZE:
                self._bad_stream("bad_discard", f"discard {idstr} offset {start:#x} length {length:#x}: outside the block", now)
                return
        self.attempt.discard_ranges += len(ranges)
        self._out.append(Discard(index, ranges))

    def _listen(self, now: float) -> None:
        a = self.attempt
        if a.layout is None:
            self._bad_stream("no_ram_setup", "LISTEN before the RAM setup", now)
            return
        if a.listening:
            return
        a.listening = True
        self._out.append(RegisterMemory())
        if a.preempt is not None:
            self._out.append(StartPreemptReceiver(a.preempt, requests=a.requests_on_preempt))

    def _run(self, conn: int, now: float, pongs: tuple[int, ...] = ()) -> None:
        """RUN; ``pongs``: the package's PINGs, answered once the guest is started."""
        a = self.attempt
        if not a.listening:
            self._bad_stream("unexpected", "RUN before LISTEN", now)
            return
        self._out.append(StartGuest(tuple(a.device_sections), a.configuration, tuple(a.in_package)))
        self._out += [SendReturnPath(wire.encode(wire.Pong(value=v))) for v in pongs]
        self.link = _Link(main=conn, preempt=a.preempt)
        self._move(Trigger.RUN, now)
        self._out.append(ReceivePages(conn, silence_breaks=False))

    def _postcopy_item(self, item: wire.WireEvent, now: float) -> None:
        match item:
            case wire.Ping(value=v):
                self._out.append(SendReturnPath(wire.encode(wire.Pong(value=v))))
                if v & HEARTBEAT_MASK == HEARTBEAT_PING and not self.link.heartbeats and self.link.main is not None:
                    self.link.heartbeats = True     # from now on its silence is a broken link
                    self._out.append(ReceivePages(self.link.main, silence_breaks=True))
            case wire.EndOfStream():
                self.link.main_ended = True
                self._maybe_complete()
            case wire.ConnectionClosed():
                self._break(now, "main channel closed before the end of the stream")
            case _:
                self._fail("unexpected", f"unexpected {type(item).__name__} after RUN", now)

    def _maybe_complete(self) -> None:
        link = self.link
        if link.main_ended and (link.preempt is None or link.preempt_ended):
            self._out.append(CheckComplete())

    # -- recovery --------------------------------------------------------------------------

    def _handshake_item(self, conn: int, item: wire.WireEvent, now: float) -> None:
        layout = self.attempt.layout
        assert layout is not None
        match item:
            case wire.RecvBitmapRequest(idstr=idstr):
                if layout.index(idstr) is None:
                    self._refuse_attempt(f"RECV_BITMAP for unknown block {idstr!r}", now, "malformed")
                else:
                    self._out.append(AnswerBitmapRequest(conn, idstr))
            case wire.Ping(value=v):
                if v == PREEMPT_REQUESTS_PING:
                    self.link.requests_on_preempt = True
                self._out.append(Send(conn, wire.encode(wire.Pong(value=v))))
            case wire.PostcopyResume():
                if self.preempt and self.link.preempt is None and not self._claim_preempt(now):
                    self.link.handshake = False
                    self.link.resume_held = True        # answered once the preempt channel is here
                    self.link.handshake_deadline = now + self.link_timeout
                    self._out.append(HoldStream(conn))
                    return
                if not self.link.resume_held:
                    self._resume(conn, now)
            case wire.ConnectionClosed():
                self._refuse_attempt("the recovery connection closed during the handshake", now)
            case _:
                self._refuse_attempt(f"unexpected {type(item).__name__} in the recovery handshake", now, "malformed")

    def _resume(self, conn: int, now: float) -> None:
        link = self.link
        link.handshake = False
        link.resume_held = False
        self._out += [Send(conn, wire.encode(wire.ResumeAck(value=1))), AttachReturnPath(conn), ResendRequests()]
        if link.preempt is not None:
            self._out.append(StartPreemptReceiver(link.preempt, requests=link.requests_on_preempt))
        self._out.append(ReceivePages(conn, silence_breaks=False))
        self.recoveries += 1
        self._move(Trigger.RESUMED, now)

    def _refuse_attempt(self, why: str, now: float, reason: str = "stalled") -> None:
        """This recovery attempt failed; the migration stays paused for the next one."""
        self._count(reason, why)
        self._drop_link_channels()
        self.link = _Link()
        if self.status is S.POSTCOPY_RECOVER:
            self._move(Trigger.RECOVERY_FAILED, now)

    def _drop_link_channels(self) -> None:
        self._out.append(AttachReturnPath(None))
        for conn in (self.link.main, self.link.preempt):
            if conn is not None:
                self._out.append(CloseConnection(conn))

    def _break(self, now: float, why: str) -> None:
        """The link is broken after RUN: pause, keep every request outstanding."""
        self._out += [AttachReturnPath(None), BreakLink()]
        for conn in (self.link.main, self.link.preempt):
            if conn is not None:
                self._out.append(CloseConnection(conn))
        self.link = _Link()
        self.last_break_reason = why
        self._move(Trigger.LINK_BROKEN, now)

    def _bad_stream(self, kind: str, message: str, now: float, reason: str = "malformed") -> None:
        """Before RUN a bad or stalled stream loses nothing: it is dropped, counted, and the
        destination listens on for the real source (``fail_fast``: fail, as QEMU does)."""
        if self.fail_fast or self.status not in (S.SETUP, S.ACTIVE):
            self._fail(kind, message, now)
            return
        self._count(reason, f"{kind}: {message}")
        self._start_over(now, message)

    def _start_over(self, now: float, why: str, reason: str | None = None) -> None:
        """Before RUN nothing can be lost: drop the attempt and wait for the stream again."""
        if reason is not None:
            self._count(reason, why)
        self._out.append(ResetBeforeRun())
        for conn in (self.attempt.main, self.attempt.preempt):
            if conn is not None:
                self._out.append(CloseConnection(conn))
        self.attempt = _Attempt()
        self.restarts += 1
        self.last_break_reason = why
        self._move(Trigger.START_OVER, now)

    # -- status -------------------------------------------------------------------------------

    def _fail(self, kind: str, message: str, now: float) -> None:
        if self.status.finished:
            return
        self.error = MigrationFailed(kind, message)
        self._move(Trigger.FAILED, now)
        self._out.append(BreakLink())
        self._out.append(Finish(self.error))

    def _move(self, trigger: Trigger, now: float) -> None:
        old = self.status
        new = next_status("destination", old, trigger)
        if new is S.POSTCOPY_PAUSED and old is not S.POSTCOPY_PAUSED and self.paused_since is None:
            self.paused_since = now
            self.recover_deadline = now + self.recover_timeout
        if new in (S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED) and self.paused_since is not None:
            self.paused_seconds += now - self.paused_since
            self.paused_since = None
            self.recover_deadline = None
        if new.finished:
            for conn in self.pending:
                self._out.append(CloseConnection(conn))
            self.pending.clear()
        self.status = new
        if new is not old or trigger is Trigger.START_OVER:
            self._out.append(StatusChanged(new))

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out


#: A newer fresh stream must show its RAM setup within this many items.
_MAX_CANDIDATE_ITEMS: Final = 16
_UNEXPECTED_PREEMPT: Final = ("the source opened a postcopy-preempt channel, which this destination runs without: "
                               "start both sides with the same postcopy-preempt setting")

#: Data-path error kinds that keep their name as a failure kind.
_DATA_PATH_KINDS: Final = frozenset({"placement", "uffd", "protocol", "internal"}) | wire.ERROR_KINDS
