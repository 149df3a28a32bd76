"""What the control socket drives: the MigrationControl protocol and its bookkeeping.

``ControlState`` is the real capability / parameter / status store. A migration
role composes with it by passing itself as ``actions`` (a MigrationActions) and by
calling ``set_status`` as it moves; ControlState does QEMU's precondition checks
and only then hands a command to the role.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol, runtime_checkable

from metrics import MigrationStatus, Role
from postcopy.control._errors import QMPError

__all__ = [
    "CAPABILITIES",
    "RUN_STATES",
    "SUPPORTED_CAPABILITIES",
    "ControlState",
    "MigrationActions",
    "MigrationControl",
    "MigrationInfo",
    "MigrationParameters",
    "QmpEvent",
    "QmpEventListener",
    "RamStats",
    "TcpAddress",
    "UnixAddress",
    "parse_migration_uri",
]

log = logging.getLogger(__name__)

# QEMU 7.2's MigrationCapability, in its order (query-migrate-capabilities lists them so).
CAPABILITIES: Final[tuple[str, ...]] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt",
)  # fmt: skip
# The ones this service implements; the rest can be listed and set false, never true.
SUPPORTED_CAPABILITIES: Final[frozenset[str]] = frozenset(
    {"events", "postcopy-ram", "postcopy-preempt", "postcopy-blocktime", "return-path"}
)
# query-status values this service can report (QEMU RunState names).
RUN_STATES: Final[tuple[str, ...]] = (
    "inmigrate", "running", "paused", "finish-migrate", "postmigrate", "shutdown",
)  # fmt: skip

# QEMU's MAX_MIGRATE_DOWNTIME (ms); its error text spells the expression out.
MAX_DOWNTIME_LIMIT_MS: Final = 2000 * 1000
# QEMU 7.2 defaults: MAX_THROTTLE (bytes/s), DEFAULT_MIGRATE_SET_DOWNTIME (ms), 0 = unlimited
DEFAULT_MAX_BANDWIDTH: Final = 128 << 20
DEFAULT_DOWNTIME_LIMIT_MS: Final = 300

_RUNNING: Final = frozenset(
    {
        MigrationStatus.SETUP,
        MigrationStatus.ACTIVE,
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """A QMP event; ``timestamp`` is wall-clock seconds (time.time())."""

    name: str
    data: Mapping[str, object] | None
    timestamp: float


QmpEventListener = Callable[[QmpEvent], None]


@dataclass(frozen=True, slots=True)
class MigrationParameters:
    """The migration parameters this service honours (QEMU units)."""

    max_bandwidth: int = DEFAULT_MAX_BANDWIDTH
    """Precopy / background stream cap, bytes per second."""
    max_postcopy_bandwidth: int = 0
    """Background stream cap during postcopy, bytes per second; 0 = unlimited."""
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT_MS
    """Milliseconds."""

    def to_qmp(self) -> dict[str, object]:
        return {
            "max-bandwidth": self.max_bandwidth,
            "max-postcopy-bandwidth": self.max_postcopy_bandwidth,
            "downtime-limit": self.downtime_limit,
        }


@dataclass(frozen=True, slots=True)
class RamStats:
    """QEMU's MigrationStats (``query-migrate`` -> ``ram``); bytes and page counts."""

    transferred: int
    total: int
    remaining: int
    normal: int
    normal_bytes: int
    duplicate: int
    """Zero pages."""
    postcopy_requests: int
    mbps: float
    pages_per_second: int
    page_size: int = 4096
    dirty_sync_count: int = 0
    precopy_bytes: int = 0
    postcopy_bytes: int = 0
    downtime_bytes: int = 0

    def to_qmp(self) -> dict[str, object]:
        return {
            "transferred": self.transferred,
            "total": self.total,
            "remaining": self.remaining,
            "normal": self.normal,
            "normal-bytes": self.normal_bytes,
            "duplicate": self.duplicate,
            "postcopy-requests": self.postcopy_requests,
            "mbps": self.mbps,
            "pages-per-second": self.pages_per_second,
            "page-size": self.page_size,
            "dirty-sync-count": self.dirty_sync_count,
            "precopy-bytes": self.precopy_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "downtime-bytes": self.downtime_bytes,
        }


@dataclass(frozen=True, slots=True)
class MigrationInfo:
    """The numbers a role supplies for ``query-migrate``; None = not known (omitted)."""

    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    downtime_ms: int | None = None
    ram: RamStats | None = None
    blocktime_ms: int | None = None
    """Destination: QEMU postcopy-blocktime (all vCPUs blocked at once)."""
    vcpu_blocktime_ms: tuple[int, ...] | None = None
    extras: Mapping[str, object] = field(default_factory=dict)
    """Our own numbers, reported under ``x-postcopy`` (never mixed into QEMU's fields)."""


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str


_TCP_URI = re.compile(r"tcp:(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]+)")


def parse_migration_uri(uri: str) -> TcpAddress | UnixAddress:
    """Parse ``tcp:HOST:PORT`` (``tcp:[v6]:PORT``) or ``unix:PATH``; raise QMPError otherwise."""
    if uri.startswith("unix:"):
        path = uri[len("unix:") :]
        if not path or "\0" in path:
            raise QMPError(f"Parameter 'uri' expects unix:PATH with a non-empty path, got '{uri}'")
        return UnixAddress(path)
    if uri.startswith("tcp:"):
        match = _TCP_URI.fullmatch(uri)
        if match is None or int(match["port"]) > 65535:
            raise QMPError(
                f"Parameter 'uri' expects tcp:HOST:PORT with PORT in 0..65535, got '{uri}'"
            )
        return TcpAddress(match["v6"] or match["host"] or "0.0.0.0", int(match["port"]))
    raise QMPError(f"unknown migration protocol: {uri}")


@runtime_checkable
class MigrationControl(Protocol):
    """What the QMP server dispatches to: one coroutine per command.

    Methods raise QMPError to refuse; arguments arrive already type-checked.
    """

    async def query_migrate(self) -> dict[str, object]: ...
    async def migrate(self, uri: str, *, resume: bool) -> None: ...
    async def migrate_incoming(self, uri: str) -> None: ...
    async def migrate_start_postcopy(self) -> None: ...
    async def migrate_set_capabilities(self, capabilities: Sequence[tuple[str, bool]]) -> None: ...
    async def query_migrate_capabilities(self) -> list[dict[str, object]]: ...
    async def migrate_set_parameters(
        self,
        *,
        max_bandwidth: int | None = None,
        max_postcopy_bandwidth: int | None = None,
        downtime_limit: int | None = None,
    ) -> None: ...
    async def query_migrate_parameters(self) -> dict[str, object]: ...
    async def migrate_pause(self) -> None: ...
    async def migrate_recover(self, uri: str) -> None: ...
    async def query_status(self) -> dict[str, object]: ...
    async def quit(self) -> None: ...
    def add_event_listener(self, listener: QmpEventListener) -> None: ...
    def remove_event_listener(self, listener: QmpEventListener) -> None: ...


class MigrationActions(Protocol):
    """What a migration role supplies to ControlState (called after QEMU's checks pass).

    The source is never asked for migrate_incoming/recover, the destination never
    for migrate/start_postcopy. Raise QMPError to refuse.
    """

    async def migrate(self, uri: str, *, resume: bool) -> None: ...
    async def migrate_incoming(self, uri: str) -> None: ...
    async def start_postcopy(self) -> None: ...
    async def pause(self) -> None: ...
    async def recover(self, uri: str) -> None: ...
    def parameters_changed(self, parameters: MigrationParameters) -> None: ...
    def migration_info(self) -> MigrationInfo: ...


class ControlState:
    """Capability, parameter and status bookkeeping for one role; implements MigrationControl."""

    def __init__(
        self,
        role: Role,
        actions: MigrationActions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if role not in ("source", "destination"):
            raise ValueError(f"unknown role {role!r}: expected 'source' or 'destination'")
        self.role: Role = role
        self.actions = actions
        self._clock = clock
        self._capabilities = dict.fromkeys(CAPABILITIES, False)
        self._parameters = MigrationParameters()
        self._status = MigrationStatus.NONE
        self._run_state = "running" if role == "source" else "inmigrate"
        self._listeners: list[QmpEventListener] = []
        self.quit_requested = asyncio.Event()
        """Set by the ``quit`` command; the service awaits it to shut down."""

    # --- read side, for the role -------------------------------------------------

    @property
    def status(self) -> MigrationStatus:
        return self._status

    @property
    def parameters(self) -> MigrationParameters:
        return self._parameters

    @property
    def capabilities(self) -> Mapping[str, bool]:
        return dict(self._capabilities)

    def capability(self, name: str) -> bool:
        try:
            return self._capabilities[name]
        except KeyError:
            raise ValueError(f"unknown migration capability {name!r}") from None

    @property
    def run_state(self) -> str:
        return self._run_state

    # --- write side, for the role -------------------------------------------------

    def set_status(self, status: MigrationStatus) -> None:
        """Record a state change; emits ``MIGRATION`` when the ``events`` capability is on."""
        status = MigrationStatus(status)
        if status is self._status:
            return
        self._status = status
        if self._capabilities["events"]:
            self.emit_event("MIGRATION", {"status": status.value})

    def set_run_state(self, run_state: str) -> None:
        if run_state not in RUN_STATES:
            raise ValueError(f"unknown run state {run_state!r}: expected one of {RUN_STATES}")
        self._run_state = run_state

    def emit_event(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every listener (the QMP server broadcasts it to its clients)."""
        event = QmpEvent(name, data, self._clock())
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, name)

    def add_event_listener(self, listener: QmpEventListener) -> None:
        self._listeners.append(listener)

    def remove_event_listener(self, listener: QmpEventListener) -> None:
        self._listeners.remove(listener)

    # --- MigrationControl ---------------------------------------------------------

    def _require_actions(self, command: str) -> MigrationActions:
        if self.actions is None:
            raise QMPError(
                f"{command}: no migration {self.role} is attached to this control socket"
            )
        return self.actions

    async def query_migrate(self) -> dict[str, object]:
        if self._status is MigrationStatus.NONE:
            return {}  # QEMU 7.2 answers {} before any migration
        reply: dict[str, object] = {"status": self._status.value}
        if self.actions is None:
            return reply
        info = self.actions.migration_info()
        times = {
            "total-time": info.total_time_ms,
            "setup-time": info.setup_time_ms,
            "downtime": info.downtime_ms,
        }
        reply.update({key: value for key, value in times.items() if value is not None})
        if info.ram is not None:
            reply["ram"] = info.ram.to_qmp()
        # QEMU reports blocktime only on a destination that completed with the capability on
        if (
            self.role == "destination"
            and self._status is MigrationStatus.COMPLETED
            and self._capabilities["postcopy-blocktime"]
        ):
            if info.blocktime_ms is not None:
                reply["postcopy-blocktime"] = info.blocktime_ms
            if info.vcpu_blocktime_ms is not None:
                reply["postcopy-vcpu-blocktime"] = list(info.vcpu_blocktime_ms)
        if info.extras:
            reply["x-postcopy"] = dict(info.extras)
        return reply

    async def migrate(self, uri: str, *, resume: bool) -> None:
        if self.role == "destination":
            raise QMPError("Guest is waiting for an incoming migration")
        if resume:
            if self._status is not MigrationStatus.POSTCOPY_PAUSED:
                raise QMPError("Cannot resume if there is no paused migration")
        elif self._status in _RUNNING:
            raise QMPError("There's a migration process in progress")
        parse_migration_uri(uri)
        await self._require_actions("migrate").migrate(uri, resume=resume)

    async def migrate_incoming(self, uri: str) -> None:
        if self.role == "source":
            raise QMPError(
                "migrate-incoming is a destination command; this is the migration source"
            )
        if self._status is not MigrationStatus.NONE:
            raise QMPError("The incoming migration has already been started")
        parse_migration_uri(uri)
        await self._require_actions("migrate-incoming").migrate_incoming(uri)

    async def migrate_start_postcopy(self) -> None:
        if not self._capabilities["postcopy-ram"]:
            raise QMPError(
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        if self.role == "destination" or self._status is MigrationStatus.NONE:
            raise QMPError("Postcopy must be started after migration has been started")
        if self._status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            await self._require_actions("migrate-start-postcopy").start_postcopy()
        # later states: postcopy already started or over; harmless, as in QEMU

    async def migrate_set_capabilities(self, capabilities: Sequence[tuple[str, bool]]) -> None:
        running = self._status in _RUNNING
        # the destination may still set capabilities while its incoming side is in setup
        if running and not (self.role == "destination" and self._status is MigrationStatus.SETUP):
            raise QMPError("There's a migration process in progress")
        new = dict(self._capabilities)
        for name, state in capabilities:
            if name not in new:
                raise QMPError(f"Parameter 'capability' does not accept value '{name}'")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise QMPError(
                    f"Capability '{name}' is not supported by this postcopy service "
                    f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})"
                )
            new[name] = state
        if new["postcopy-preempt"] and not new["postcopy-ram"]:
            raise QMPError("Postcopy preempt requires postcopy-ram")
        self._capabilities = new

    async def query_migrate_capabilities(self) -> list[dict[str, object]]:
        return [{"state": state, "capability": name} for name, state in self._capabilities.items()]

    async def migrate_set_parameters(
        self,
        *,
        max_bandwidth: int | None = None,
        max_postcopy_bandwidth: int | None = None,
        downtime_limit: int | None = None,
    ) -> None:
        if downtime_limit is not None and not 0 <= downtime_limit <= MAX_DOWNTIME_LIMIT_MS:
            raise QMPError(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
            )
        changes = {
            key: value
            for key, value in (
                ("max_bandwidth", max_bandwidth),
                ("max_postcopy_bandwidth", max_postcopy_bandwidth),
                ("downtime_limit", downtime_limit),
            )
            if value is not None
        }
        if not changes:
            return
        self._parameters = replace(self._parameters, **changes)
        if self.actions is not None:
            self.actions.parameters_changed(self._parameters)

    async def query_migrate_parameters(self) -> dict[str, object]:
        return self._parameters.to_qmp()

    async def migrate_pause(self) -> None:
        if self._status is not MigrationStatus.POSTCOPY_ACTIVE:
            raise QMPError("migrate-pause is currently only supported during postcopy-active state")
        await self._require_actions("migrate-pause").pause()

    async def migrate_recover(self, uri: str) -> None:
        if self.role == "source" or self._status is not MigrationStatus.POSTCOPY_PAUSED:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        parse_migration_uri(uri)
        await self._require_actions("migrate-recover").recover(uri)

    async def query_status(self) -> dict[str, object]:
        return {
            "status": self._run_state,
            "singlestep": False,
            "running": self._run_state == "running",
        }

    async def quit(self) -> None:
        self.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_requested.set()
