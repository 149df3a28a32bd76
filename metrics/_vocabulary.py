"""Closed label vocabularies shared by the metrics and the control socket.

Every label value a metric can carry is listed here, so the set of series is fixed
at startup and never grows with input (no addresses, peers or free-form strings).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "CHANNELS",
    "PAGE_KINDS",
    "PROTOCOL_ERROR_KINDS",
    "ROLES",
    "Channel",
    "MigrationStatus",
    "PageKind",
    "Role",
]


class MigrationStatus(StrEnum):
    """The migration states this service can be in, spelled as QEMU's MigrationStatus."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"


Role = Literal["source", "destination"]
ROLES: Final[tuple[Role, ...]] = ("source", "destination")

Channel = Literal["main", "preempt"]
CHANNELS: Final[tuple[Channel, ...]] = ("main", "preempt")

PageKind = Literal["normal", "zero"]
PAGE_KINDS: Final[tuple[PageKind, ...]] = ("normal", "zero")

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
