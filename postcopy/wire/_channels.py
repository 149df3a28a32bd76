"""Which channel an incoming connection is: QEMU's rule, as a pure function.

QEMU's destination (``migration_ioc_process_incoming`` in migration.c) peeks
at a new connection's first 4 bytes only for multifd without postcopy.  With
postcopy-ram it goes by order: ``default_channel = !mis->from_src_file`` --
the first connection is the main channel, any later one is the preempt
channel, which carries no magic and may stay silent until the first urgent
page.  A 7.2-mode source connects preempt right after main; an 8.0+ source
only in ``postcopy_start`` after the first PONG; on recovery both reconnect
(the new main channel starts with commands, not ``QEVM``).  So the decision
never waits for bytes from a channel that already has a main sibling.
"""

from __future__ import annotations

import enum

from ._constants import QEMU_VM_FILE_MAGIC
from ._decoder import NEED_DATA, NeedData

__all__ = ["ChannelKind", "classify_channel"]

_MAGIC = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")


class ChannelKind(enum.Enum):
    MAIN = "main"  # a fresh migration: starts with the QEVM header
    RECOVERY = "recovery"  # a new main channel after a pause: starts with commands
    PREEMPT = "preempt"  # a second connection while a main channel is open


def classify_channel(prefix: bytes, *, main_open: bool, paused: bool) -> ChannelKind | NeedData:
    """Kind of a newly accepted connection.

    ``prefix``: bytes already read from it (may be empty); ``main_open``: this
    incarnation already has its main channel; ``paused``: postcopy is paused
    (a recovery main channel is expected).  Returns NEED_DATA when the first
    bytes must be read to tell a fresh stream from a recovery one.
    """
    if main_open:
        return ChannelKind.PREEMPT
    if not paused:
        return ChannelKind.MAIN
    if len(prefix) < 4:
        return NEED_DATA
    return ChannelKind.MAIN if prefix[:4] == _MAGIC else ChannelKind.RECOVERY
