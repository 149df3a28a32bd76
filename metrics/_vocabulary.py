"""Closed label vocabularies shared by the metrics and the control socket.

Every label value a metric can carry is listed here, so the set of series is fixed
at startup and never grows with input (no addresses, peers or free-form strings).
"""

from __future__ import annotations

from typing import Final, Literal

# One status vocabulary: the sessions own it, the metrics and QMP speak it.
from postcopy.session._destination import REFUSAL_REASONS
from postcopy.session._status import MigrationStatus

__all__ = [
    "CHANNELS",
    "PAGE_KINDS",
    "PREFETCH_RESULTS",
    "PROTOCOL_ERROR_KINDS",
    "REFUSAL_REASONS",
    "ROLES",
    "Channel",
    "MigrationStatus",
    "PageKind",
    "PrefetchResult",
    "Role",
]


Role = Literal["source", "destination"]
ROLES: Final[tuple[Role, ...]] = ("source", "destination")

Channel = Literal["main", "preempt"]
CHANNELS: Final[tuple[Channel, ...]] = ("main", "preempt")

PageKind = Literal["normal", "zero"]
PAGE_KINDS: Final[tuple[PageKind, ...]] = ("normal", "zero")

# A page request the source's prefetch predicted (a hit) or not (a miss).
PrefetchResult = Literal["hit", "miss"]
PREFETCH_RESULTS: Final[tuple[PrefetchResult, ...]] = ("hit", "miss")

# The wire codec's error kinds; anything else is counted as "other" so a new kind
# can never create an unbounded label value.
PROTOCOL_ERROR_KINDS: Final[tuple[str, ...]] = (
    "bad_magic",
    "unknown_command",
    "offset_out_of_block",
    "unknown_block",
    "truncated",
    "bitmap_size",
    "bitmap_end_mark",
    "packaged_too_large",
    "frame_too_large",
    # the roles' own refusals of what the peer sent
    "unexpected",
    "ram_layout",
    "advise_mismatch",
    "no_device_state",
    "bad_page_request",
    "other",
)
