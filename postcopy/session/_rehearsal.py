"""Rehearse the switch to postcopy on scratch sessions before any guest stops.

CPython specializes a code path only after it has run a few times (3.11: about eight), and a
real switch runs its code once: the codec's PACKAGED, the sessions' switch and RUN handling then
ran unspecialized and cold inside the downtime (PACKAGED decoded in 170 us the first time, 120 us
after eight; the destination session's PACKAGED 75 -> 40 us). Being sans-IO, the two sessions can
play a whole migration against each other in memory, through the real codec, with no guest, no
socket and no clock: that is the rehearsal. The shells answer the few actions a session waits
for; everything else an action asks for is skipped (it is the shell's, not the protocol's).
"""

from __future__ import annotations

import threading

from .. import wire
from ._destination import PREEMPT_SILENCE_SECONDS, DestinationSession
from ._io import (
    Action,
    Channel,
    CheckComplete,
    Connect,
    Connected,
    CollectConnections,
    ConnectionAccepted,
    ConnectionsCollected,
    ConnectionSpoke,
    GuestStopped,
    Input,
    ReturnPathMessage,
    SendReturnPath,
    StopGuest,
    StreamChecked,
    StreamItem,
    Write,
)
from ._source import SourceSession
from ._status import MigrationStatus

__all__ = ["REHEARSAL_ROUNDS", "rehearse_switch", "rehearse_switch_once"]

#: Rehearsals per process: past 3.11's specialization threshold (8) with room to spare; one
#: costs about 1.3 ms on a 2-core VM (the process's first about 40 ms: imports, first uses).
REHEARSAL_ROUNDS = 12

_BLOCK = wire.RamBlockLayout(idstr="rehearsal.ram", used_length=1 << 20)
_DEVICE = wire.DeviceSection(section_id=2, idstr="rehearsal", instance_id=0, version_id=1, payload=bytes(64))
_HOST = "rehearsal"
_MAIN, _PREEMPT = 1, 2


_rehearsed: set[bool] = set()
_rehearsed_lock = threading.Lock()


def rehearse_switch(preempt: bool, rounds: int = REHEARSAL_ROUNDS) -> None:
    """Play ``rounds`` migrations (immediate postcopy, ``preempt`` as the real one) from the
    start to PONG 3 between a scratch source and destination session, and throw them away.
    Raises AssertionError if one does not reach postcopy on both sides."""
    for _ in range(rounds):
        _Rehearsal(preempt).run()


def rehearse_switch_once(preempt: bool) -> None:
    """:func:`rehearse_switch`, once per process and ``preempt`` setting: what the interpreter
    specialized stays specialized (a service builds a role per migration)."""
    with _rehearsed_lock:
        if preempt not in _rehearsed:
            rehearse_switch(preempt)
            _rehearsed.add(preempt)


class _Rehearsal:
    """One migration between a scratch source and destination session, the two shells in one."""

    def __init__(self, preempt: bool) -> None:
        self.preempt = preempt
        self.now = 0.0
        self.src = SourceSession([_BLOCK], wire.Configuration(machine_type="rehearsal"), preempt=preempt)
        self.dst = DestinationSession(preempt=preempt)
        self.main = wire.MainStreamDecoder()
        self.rp = wire.ReturnPathDecoder()
        self.main_open = False

    def run(self) -> None:
        self._dst(self.dst.start(self.now))
        self._src(self.src.start(self.now))
        if self.src.status is not MigrationStatus.POSTCOPY_ACTIVE \
                or self.dst.status is not MigrationStatus.POSTCOPY_ACTIVE:
            # a rehearsal that does not reach postcopy is a protocol bug, not a runtime condition
            raise AssertionError(f"rehearsal ended with the source {self.src.status.value}, "
                                 f"the destination {self.dst.status.value}")

    # -- the source's shell ---------------------------------------------------------------------

    def _src(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Connect(channel=channel):
                    self._src_input(Connected(channel))
                    if channel is Channel.PREEMPT:
                        # a preempt channel says nothing: the destination takes it after a silence
                        self._dst_input(ConnectionAccepted(_PREEMPT, _HOST))
                        self.now += 2 * PREEMPT_SILENCE_SECONDS
                        self._dst(self.dst.handle_timer(self.now))
                case StopGuest():
                    self._src_input(GuestStopped((_DEVICE,), self.now))
                case Write(channel=Channel.MAIN, data=data):
                    self._to_destination(bytes(data))
                case _:
                    pass

    def _src_input(self, event: Input) -> None:
        self._src(self.src.handle(event, self.now))

    def _to_destination(self, data: bytes) -> None:
        if not self.main_open:
            self.main_open = True
            self._dst_input(ConnectionAccepted(_MAIN, _HOST))
            self._dst_input(ConnectionSpoke(_MAIN, data[:1]))
        self.main.receive_data(data)
        for event in self.main.events():
            self._dst_input(StreamItem(_MAIN, event))

    # -- the destination's shell ----------------------------------------------------------------

    def _dst(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case CheckComplete():
                    self._dst_input(StreamChecked(0))
                case CollectConnections():
                    self._dst_input(ConnectionsCollected(()))
                case SendReturnPath(data=data) if data:
                    self.rp.receive_data(data)
                    for message in self.rp.events():
                        self._src_input(ReturnPathMessage(message))
                case _:
                    pass

    def _dst_input(self, event: Input) -> None:
        self._dst(self.dst.handle(event, self.now))
