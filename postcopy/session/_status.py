"""The migration status and every transition either role may make.

Rule (after h11's ``_state.py``): everything that decides which status follows
which lives in this file. A session asks :func:`next_status` for each change;
a pair that is not in its role's table is a bug in the session, not bad input,
and raises :class:`IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "DESTINATION_TRANSITIONS",
    "SOURCE_TRANSITIONS",
    "IllegalTransition",
    "MigrationStatus",
    "Trigger",
    "next_status",
]


class MigrationStatus(StrEnum):
    """The statuses of a migration, spelled as QEMU's ``MigrationStatus``."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


#: asked on every input a session takes: a set, not two of 3.11's slow enum class lookups
_FINISHED: Final = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED})


class Trigger(StrEnum):
    """What moves a session from one status to the next."""

    START = "start"                      # source: connecting; destination: listening
    STREAM_STARTED = "stream_started"    # source: header sent; destination: header received
    ROUND = "round"                      # source: a precopy round ended, the next one starts (stays active)
    RUN = "run"                          # the guest runs on the destination (RUN sent / received)
    LINK_BROKEN = "link_broken"          # a channel failed, silence, or migrate-pause
    RECOVERY_STARTED = "recovery_started"  # a recovery connection is up, handshake under way
    RECOVERY_FAILED = "recovery_failed"  # that attempt failed: paused again
    RESUMED = "resumed"                  # RESUME / RESUME_ACK: postcopy goes on
    START_OVER = "start_over"            # the link broke before RUN: the whole stream again
    COMPLETED = "completed"
    FAILED = "failed"


S = MigrationStatus
T = Trigger

_ANY_LIVE: Final = (S.NONE, S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)

DESTINATION_TRANSITIONS: Final[dict[tuple[MigrationStatus, Trigger], MigrationStatus]] = {
    (S.NONE, T.START): S.SETUP,
    (S.SETUP, T.STREAM_STARTED): S.ACTIVE,
    (S.ACTIVE, T.RUN): S.POSTCOPY_ACTIVE,
    # before RUN no guest runs here: a broken stream is dropped and awaited again
    (S.SETUP, T.START_OVER): S.SETUP,
    (S.ACTIVE, T.START_OVER): S.SETUP,
    (S.POSTCOPY_ACTIVE, T.LINK_BROKEN): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_PAUSED, T.RECOVERY_STARTED): S.POSTCOPY_RECOVER,
    (S.POSTCOPY_RECOVER, T.RECOVERY_FAILED): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_RECOVER, T.LINK_BROKEN): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_RECOVER, T.RESUMED): S.POSTCOPY_ACTIVE,
    (S.POSTCOPY_ACTIVE, T.COMPLETED): S.COMPLETED,
    # the source finished in precopy (QEMU, when it converges before migrate-start-postcopy)
    (S.ACTIVE, T.COMPLETED): S.COMPLETED,
    **{(s, T.FAILED): S.FAILED for s in _ANY_LIVE},
}

SOURCE_TRANSITIONS: Final[dict[tuple[MigrationStatus, Trigger], MigrationStatus]] = {
    (S.NONE, T.START): S.SETUP,
    (S.SETUP, T.STREAM_STARTED): S.ACTIVE,
    # precopy: rounds while the guest runs here, then the switch (RUN)
    (S.ACTIVE, T.ROUND): S.ACTIVE,
    (S.ACTIVE, T.RUN): S.POSTCOPY_ACTIVE,
    (S.POSTCOPY_ACTIVE, T.LINK_BROKEN): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_PAUSED, T.RECOVERY_STARTED): S.POSTCOPY_RECOVER,
    (S.POSTCOPY_RECOVER, T.RECOVERY_FAILED): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_RECOVER, T.LINK_BROKEN): S.POSTCOPY_PAUSED,
    (S.POSTCOPY_RECOVER, T.RESUMED): S.POSTCOPY_ACTIVE,
    # the destination had not run the guest (SHUT 2): the whole stream again, guest still stopped
    (S.POSTCOPY_RECOVER, T.START_OVER): S.POSTCOPY_ACTIVE,
    (S.POSTCOPY_PAUSED, T.START_OVER): S.POSTCOPY_ACTIVE,
    (S.POSTCOPY_ACTIVE, T.COMPLETED): S.COMPLETED,
    **{(s, T.FAILED): S.FAILED for s in _ANY_LIVE},
}

_TABLES: Final = {"source": SOURCE_TRANSITIONS, "destination": DESTINATION_TRANSITIONS}


class IllegalTransition(RuntimeError):
    """A session tried a transition its role's table does not have (a bug)."""


def next_status(role: Literal["source", "destination"], status: MigrationStatus, trigger: Trigger) -> MigrationStatus:
    try:
        return _TABLES[role][(status, trigger)]
    except KeyError:
        raise IllegalTransition(f"{role}: can't handle {trigger.value} in status {status.value}") from None
