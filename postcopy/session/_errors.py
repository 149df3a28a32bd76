"""The one error hierarchy of the roles.

* :class:`LinkBroken`: a channel failed after the guest stopped on the source.
  Nothing is lost; both sides pause and recover. Never fatal by itself.
* :class:`MigrationFailed`: the migration cannot go on. ``kind`` is one of
  :data:`FAILURE_KINDS` (a closed set, safe as a metrics label, like the
  codec's ``ERROR_KINDS``, which it includes: a malformed stream fails with its
  codec kind).
"""

from __future__ import annotations

from typing import Final

from ..wire import ERROR_KINDS

__all__ = ["FAILURE_KINDS", "LinkBroken", "MigrationFailed", "PostcopyError"]

#: Why a migration failed, beyond the codec's own kinds.
ROLE_FAILURE_KINDS: Final[frozenset[str]] = frozenset({
    "advise_mismatch",       # POSTCOPY_ADVISE disagrees with this side's memory
    "ram_layout",            # the RAM setup's blocks are not the memory owner's
    "unknown_block",         # a command names a block the RAM setup did not
    "bad_discard",           # a discard range outside its block, or before the RAM setup
    "no_device_state",       # RUN without the owner's device state
    "device_state",          # the owner refused the device state
    "incomplete",            # the stream ended with pages never received
    "preempt_mismatch",      # one side uses a preempt channel and the other does not
    "unexpected",            # a message that is valid on the wire but not here
    "recovery_timeout",      # paused for longer than the recovery timeout
    "connect",               # the destination could not be reached at the start
    "destination_failed",    # the destination shut down with an error
    "placement",             # the kernel refused to place a page
    "protocol",              # the C data path found a malformed page record
    "uffd",                  # the fault service stopped
    "io",                    # a channel failed before the switch (nothing to pause yet)
    "internal",              # a bug: an exception that is none of the above
})

FAILURE_KINDS: Final[frozenset[str]] = ROLE_FAILURE_KINDS | ERROR_KINDS


class PostcopyError(Exception):
    """Base of the roles' errors."""


class LinkBroken(PostcopyError):
    """A channel failed during postcopy: both sides pause and recover."""


class MigrationFailed(PostcopyError):
    """The migration cannot go on; ``kind`` labels it (one of :data:`FAILURE_KINDS`)."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        super().__init__(message)
        self.kind = kind
