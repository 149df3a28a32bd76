"""Sans-IO protocol sessions of the two roles: inputs in, actions out, no IO, no clocks."""

from ._destination import PREEMPT_SILENCE_SECONDS, SHUT_NOTHING_TO_RECOVER, DestinationSession
from ._errors import FAILURE_KINDS, LinkBroken, MigrationFailed, PostcopyError
from ._io import *  # noqa: F403
from ._io import __all__ as _io_all
from ._rehearsal import REHEARSAL_ROUNDS, rehearse_switch, rehearse_switch_once
from ._precopy import PrecopyStats, RoundRecord, SwitchoverPolicy, ThrottlePolicy
from ._source import SWITCH_PRELUDE_PINGS, SWITCH_SPIN_SECONDS, SourceSession
from ._stats import ChannelStats, HotSetStats, MigrationStats, PrefetchStats
from ._status import (
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    IllegalTransition,
    MigrationStatus,
    Trigger,
    next_status,
)

__all__ = [
    "DESTINATION_TRANSITIONS",
    "FAILURE_KINDS",
    "PREEMPT_SILENCE_SECONDS",
    "SHUT_NOTHING_TO_RECOVER",
    "SOURCE_TRANSITIONS",
    "SWITCH_PRELUDE_PINGS",
    "SWITCH_SPIN_SECONDS",
    "ChannelStats",
    "DestinationSession",
    "IllegalTransition",
    "LinkBroken",
    "MigrationFailed",
    "MigrationStats",
    "MigrationStatus",
    "PostcopyError",
    "REHEARSAL_ROUNDS",
    "PrecopyStats",
    "HotSetStats",
    "PrefetchStats",
    "RoundRecord",
    "SourceSession",
    "SwitchoverPolicy",
    "ThrottlePolicy",
    "Trigger",
    "next_status",
    "rehearse_switch",
    "rehearse_switch_once",
    *_io_all,
]
