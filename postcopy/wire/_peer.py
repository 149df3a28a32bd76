"""What a QEMU peer may send and understand, from what the stream tells about it.

A migration stream does not carry QEMU's version.  It carries the machine type
(configuration section, e.g. ``pc-i440fx-7.2``): a QEMU that runs machine type
X.Y is at least version X.Y, and the machine type's compat properties decide
several wire details on their own.  Capabilities (QMP ``migrate-set-capabilities``)
decide the rest.  A role builds a :class:`PeerProfile` from those and asks it
before sending anything a 7.2 peer would reject: QEMU's return-path reader
(``source_return_path_thread`` in migration.c) fails the migration on a message
type >= its ``MIG_RP_MSG_MAX`` ("Received invalid message"), and its command
loader (``loadvm_process_command`` in savevm.c) fails on an unknown MIG_CMD.

Facts (read in QEMU's migration/ sources):

* ``MIG_RP_MSG_SWITCHOVER_ACK`` (7) exists since 8.1 (``enum mig_rp_message_type``
  in migration.c); the destination sends it only with the ``switchover-ack``
  capability (``qemu_loadvm_state`` -> ``qemu_loadvm_state_switchover_ack_needed``,
  ``qemu_loadvm_approve_switchover`` -> ``migrate_send_rp_switchover_ack``).
* ``MIG_CMD_SWITCHOVER_START`` (11) exists since 10.0 (savevm.c
  ``qemu_savevm_maybe_send_switchover_start``); it is sent only when the
  ``migration`` property ``send-switchover-start`` is on, which ``hw_compat_9_2``
  turns off: machine types <= 9.2 never send it.
* Preempt channel EOS: ``migration_completion_postcopy`` (migration.c) calls
  ``postcopy_preempt_shutdown_file`` (EOS on the preempt channel) only when
  ``preempt_pre_7_2``, the ``x-preempt-pre-7-2`` property set by ``hw_compat_7_2``;
  a 7.1/7.2 binary always sends it.  Newer machine types on 8.0+: no EOS, the
  destination ends the channel itself.
* Preempt channel connect time: with ``preempt_pre_7_2`` the source connects it
  at once (7.2 ``migrate_fd_connect`` -> ``postcopy_preempt_setup``); otherwise
  inside ``postcopy_start`` after the first PONG.  Either way the destination
  tells it from the main channel by order only (``migration_ioc_process_incoming``:
  with postcopy-ram, ``default_channel = !mis->from_src_file``; the preempt
  channel carries no magic) -- see ``classify_channel``.
* PING 0x42 (``QEMU_VM_PING_PACKAGED_LOADED``) inside PACKAGED just before RUN:
  10.2+ sources (``postcopy_start``); a plain PING to the decoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import _events as ev
from ._constants import Command, RpMessage
from ._errors import LocalProtocolError

__all__ = ["BASELINE_VERSION", "PeerProfile", "machine_type_version"]

#: The oldest QEMU this codec speaks to; what every supported peer understands.
BASELINE_VERSION = (7, 2)

#: Return-path messages and the QEMU version that introduced each.
_RP_SINCE: dict[RpMessage, tuple[int, int]] = {
    RpMessage.SHUT: (2, 5),
    RpMessage.PONG: (2, 5),
    RpMessage.REQ_PAGES_ID: (2, 5),
    RpMessage.REQ_PAGES: (2, 5),
    RpMessage.RECV_BITMAP: (3, 0),
    RpMessage.RESUME_ACK: (3, 0),
    RpMessage.SWITCHOVER_ACK: (8, 1),
}
#: Return-path messages a peer expects only with a capability on.
_RP_NEEDS_CAPABILITY: dict[RpMessage, str] = {RpMessage.SWITCHOVER_ACK: "switchover-ack"}

_COMMAND_SINCE: dict[Command, tuple[int, int]] = {
    **dict.fromkeys(Command, (2, 5)),
    Command.POSTCOPY_RESUME: (3, 0),
    Command.RECV_BITMAP: (3, 0),
    Command.SWITCHOVER_START: (10, 0),
}

_RP_EVENT_TYPES: dict[type, RpMessage] = {
    ev.Shut: RpMessage.SHUT, ev.Pong: RpMessage.PONG, ev.RecvBitmap: RpMessage.RECV_BITMAP,
    ev.ResumeAck: RpMessage.RESUME_ACK, ev.SwitchoverAck: RpMessage.SWITCHOVER_ACK,
}

_MACHINE_VERSION = re.compile(r".*-(\d+)\.(\d+)(?:\.\d+)?$")


def machine_type_version(machine_type: str) -> tuple[int, int] | None:
    """``pc-i440fx-7.2`` -> (7, 2); ``pc-q35-10.0`` -> (10, 0); unversioned (``microvm``) -> None."""
    m = _MACHINE_VERSION.fullmatch(machine_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerProfile:
    """A QEMU peer as far as the wire is concerned.

    ``version``: lowest QEMU version the peer can be (at least the machine
    type's; :data:`BASELINE_VERSION` when nothing better is known).
    ``machine_version``: the machine type's version (None: unversioned or unknown).
    ``capabilities``: migration capabilities on at the peer (QMP names).
    """

    version: tuple[int, int] = BASELINE_VERSION
    machine_version: tuple[int, int] | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_stream(cls, configuration: ev.Configuration | None, *,
                    capabilities: frozenset[str] | set[str] = frozenset(),
                    version: tuple[int, int] | None = None) -> PeerProfile:
        """From the configuration section the peer sent (or that we will send to it)."""
        mv = machine_type_version(configuration.machine_type) if configuration is not None else None
        lower = max(BASELINE_VERSION, mv or BASELINE_VERSION, version or BASELINE_VERSION)
        return cls(version=lower, machine_version=mv, capabilities=frozenset(capabilities))

    # -- what the peer understands ------------------------------------------------

    def knows_rp(self, msg: RpMessage) -> bool:
        """May a return-path message of this type go to this peer (a QEMU source)?"""
        if self.version < _RP_SINCE[msg]:
            return False
        cap = _RP_NEEDS_CAPABILITY.get(msg)
        return cap is None or cap in self.capabilities

    def knows_command(self, cmd: Command) -> bool:
        """May a main-channel command of this type go to this peer (a QEMU destination)?"""
        return self.version >= _COMMAND_SINCE[cmd]

    def rp_messages(self) -> frozenset[RpMessage]:
        return frozenset(m for m in RpMessage if self.knows_rp(m))

    def check_sendable(self, event: ev.WireEvent) -> None:
        """Raise LocalProtocolError ``unknown_message`` if the peer may not know ``event``."""
        msg = _RP_EVENT_TYPES.get(type(event))
        if isinstance(event, ev.PageRequest):
            msg = RpMessage.REQ_PAGES if event.idstr is None else RpMessage.REQ_PAGES_ID
        if msg is not None:
            if not self.knows_rp(msg):
                cap = _RP_NEEDS_CAPABILITY.get(msg)
                raise LocalProtocolError(
                    f"return-path {msg.name} may be unknown to this peer (QEMU >= {self.version[0]}."
                    f"{self.version[1]}, needs {_RP_SINCE[msg][0]}.{_RP_SINCE[msg][1]}"
                    + (f" and the {cap!r} capability" if cap else "") + ")", kind="unknown_message")
            return
        if isinstance(event, ev.Packaged):
            for inner in event.events:
                self.check_sendable(inner)
        cmd = _command_of(event)
        if cmd is not None and not self.knows_command(cmd):
            raise LocalProtocolError(
                f"command {cmd.name} may be unknown to this peer (QEMU >= {self.version[0]}.{self.version[1]}, "
                f"needs {_COMMAND_SINCE[cmd][0]}.{_COMMAND_SINCE[cmd][1]})", kind="unknown_command")

    # -- what the peer does ----------------------------------------------------------

    @property
    def preempt_eos(self) -> bool | None:
        """Does the source end its preempt channel with EOS?  None: cannot tell (accept both)."""
        if self.machine_version is None:
            return None
        return self.machine_version <= (7, 2)

    @property
    def preempt_connects_early(self) -> bool | None:
        """Does the source connect the preempt channel at once (True) or after the first PONG?"""
        return self.preempt_eos

    @property
    def may_send_switchover_start(self) -> bool:
        """Can this source send MIG_CMD_SWITCHOVER_START?"""
        return self.version >= (10, 0) and (self.machine_version is None or self.machine_version >= (10, 0))


#: the command that carries each event type (built once: the source checks every event it sends,
#: the switch's inside the downtime)
_COMMAND_OF: dict[type, Command] = {
    ev.OpenReturnPath: Command.OPEN_RETURN_PATH, ev.Ping: Command.PING,
    ev.PostcopyAdvise: Command.POSTCOPY_ADVISE, ev.PostcopyListen: Command.POSTCOPY_LISTEN,
    ev.PostcopyRun: Command.POSTCOPY_RUN, ev.PostcopyRamDiscard: Command.POSTCOPY_RAM_DISCARD,
    ev.Packaged: Command.PACKAGED, ev.EnableColo: Command.ENABLE_COLO,
    ev.PostcopyResume: Command.POSTCOPY_RESUME, ev.RecvBitmapRequest: Command.RECV_BITMAP,
    ev.SwitchoverStart: Command.SWITCHOVER_START,
}


def _command_of(event: ev.WireEvent) -> Command | None:
    return _COMMAND_OF.get(type(event))
