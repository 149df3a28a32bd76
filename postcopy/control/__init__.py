"""QMP-compatible control socket for a migration role.

``QMPServer(target)`` serves a :class:`MigrationControl` over a unix or TCP
socket so that QMP clients (qemu.qmp, libvirt-style tooling, socat) can drive a
migration as they drive QEMU 7.2. :class:`ControlState` is the capability,
parameter and status store a role composes with through :class:`MigrationActions`.
The command list is in docs/operations.md.
"""

from __future__ import annotations

from metrics import MigrationStatus
from postcopy.control._errors import CommandNotFound, QMPError
from postcopy.control._server import MAX_MESSAGE_BYTES, QEMU_VERSION, QMPServer
from postcopy.control._state import (
    CAPABILITIES,
    RUN_STATES,
    SUPPORTED_CAPABILITIES,
    ControlState,
    MigrationActions,
    MigrationControl,
    MigrationInfo,
    MigrationParameters,
    QmpEvent,
    QmpEventListener,
    RamStats,
    TcpAddress,
    UnixAddress,
    parse_migration_uri,
)

__all__ = [
    "CAPABILITIES",
    "MAX_MESSAGE_BYTES",
    "QEMU_VERSION",
    "RUN_STATES",
    "SUPPORTED_CAPABILITIES",
    "CommandNotFound",
    "ControlState",
    "MigrationActions",
    "MigrationControl",
    "MigrationInfo",
    "MigrationParameters",
    "MigrationStatus",
    "QMPError",
    "QMPServer",
    "QmpEvent",
    "QmpEventListener",
    "RamStats",
    "TcpAddress",
    "UnixAddress",
    "parse_migration_uri",
]
