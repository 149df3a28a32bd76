"""A page-fault service for other processes (Firecracker's userfaultfd handshake).

A supervisor process owns the listening socket, each VMM's userfaultfd and a
shared record of placed pages; a serving process runs one C thread per VMM and
may die without freezing anyone: the supervisor starts another, which resumes.
"""

from __future__ import annotations

from postcopy.handler._mappings import HandshakeError, Region, parse_handshake
from postcopy.handler._shared import LatencySummary, SharedState, StateSnapshot
from postcopy.handler._source import MemoryFileSource, PageSource
from postcopy.handler._supervisor import Supervisor, SupervisorOptions, install_signal_handlers

__all__ = [
    "HandshakeError",
    "LatencySummary",
    "MemoryFileSource",
    "PageSource",
    "Region",
    "SharedState",
    "StateSnapshot",
    "Supervisor",
    "SupervisorOptions",
    "install_signal_handlers",
    "parse_handshake",
]
