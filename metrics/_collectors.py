"""Scrape-time values: a collector that asks the running role for a snapshot."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.metrics_core import Metric

from metrics._vocabulary import MigrationStatus, Role

__all__ = ["MAX_VCPU_SERIES", "MigrationCollector", "MigrationSnapshot", "SnapshotProvider"]

log = logging.getLogger(__name__)

# The vcpu label is an index below the guest's vCPU count, fixed when the
# provider is bound; this bounds it however large a guest claims to be.
MAX_VCPU_SERIES: Final = 1024


@dataclass(frozen=True, slots=True)
class MigrationSnapshot:
    """What a role reports at scrape time. Durations in seconds, sizes in bytes."""

    status: MigrationStatus = MigrationStatus.NONE
    pending_requests: int = 0
    """Pages requested by a fault and not yet placed (destination), or queued to send urgently (source)."""
    ram_total_bytes: int = 0
    ram_remaining_bytes: int = 0
    setup_seconds: float = 0.0
    total_seconds: float = 0.0
    """Since the migration started; frozen once it ends (QEMU's total-time)."""
    downtime_seconds: float | None = None
    """Guest stopped on the source -> running on the destination; None until known."""
    paused_seconds: float = 0.0
    """Time spent in postcopy-paused, including a pause still under way."""
    blocktime_seconds: float = 0.0
    """Destination: time during which all vCPUs were blocked on remote faults at once."""
    vcpu_blocktime_seconds: tuple[float, ...] = ()
    """Destination: per vCPU, in index order, time blocked on remote faults."""


SnapshotProvider = Callable[[], MigrationSnapshot]


class MigrationCollector:
    """Builds the scrape-time families from one snapshot per scrape.

    Until :meth:`bind` is called it reports the idle state ("none", zeros), so the
    series exist from the start.
    """

    def __init__(self, role: Role) -> None:
        self._role = role
        self._lock = threading.Lock()
        self._provider: SnapshotProvider | None = None
        self._vcpu_count = 0
        self._snapshot_errors = 0

    def bind(self, provider: SnapshotProvider, vcpu_count: int = 0) -> None:
        """Read snapshots from ``provider``; report blocktime for vCPUs 0..vcpu_count-1.

        The provider is called from the exposition thread: it must only read
        plain Python state, never touch userfaultfd-registered memory.
        """
        if not 0 <= vcpu_count <= MAX_VCPU_SERIES:
            raise ValueError(f"vcpu_count {vcpu_count} out of range 0..{MAX_VCPU_SERIES}")
        if vcpu_count and self._role != "destination":
            raise ValueError(f"vcpu blocktime is a destination metric; role is {self._role}")
        with self._lock:
            self._provider = provider
            self._vcpu_count = vcpu_count

    def unbind(self) -> None:
        """Go back to reporting the idle state."""
        with self._lock:
            self._provider = None
            self._vcpu_count = 0

    def _snapshot(self) -> tuple[MigrationSnapshot | None, int]:
        with self._lock:
            provider, vcpu_count = self._provider, self._vcpu_count
        if provider is None:
            return MigrationSnapshot(), vcpu_count
        try:
            snap = provider()
        except Exception:
            log.exception("metrics snapshot provider failed")
            snap = None
        else:
            if not isinstance(snap, MigrationSnapshot) or not isinstance(
                snap.status, MigrationStatus
            ):
                log.error("metrics snapshot provider returned %r, not a MigrationSnapshot", snap)
                snap = None
        if snap is None:
            with self._lock:
                self._snapshot_errors += 1
        return snap, vcpu_count

    def collect(self) -> Iterator[Metric]:
        snap, vcpu_count = self._snapshot()
        errors = CounterMetricFamily(
            "postcopy_snapshot_errors",
            "Scrapes whose snapshot provider failed (their values are missing).",
        )
        errors.add_metric([], self._snapshot_errors)
        yield errors
        if snap is None:
            return
        yield StateSetMetricFamily(
            "postcopy_migration_state",
            "Migration state (QEMU MigrationStatus).",
            value={status.value: status is snap.status for status in MigrationStatus},
        )
        yield GaugeMetricFamily(
            "postcopy_page_requests_pending",
            "Destination: faulted pages requested and not yet placed; source: requested pages queued to send.",
            value=snap.pending_requests,
        )
        yield GaugeMetricFamily(
            "postcopy_ram_total_bytes", "Guest RAM being migrated.", value=snap.ram_total_bytes
        )
        yield GaugeMetricFamily(
            "postcopy_ram_remaining_bytes",
            "Guest RAM not yet transferred.",
            value=snap.ram_remaining_bytes,
        )
        yield GaugeMetricFamily(
            "postcopy_setup_time_seconds",
            "Migration setup time (QEMU setup-time).",
            value=snap.setup_seconds,
        )
        yield GaugeMetricFamily(
            "postcopy_total_time_seconds",
            "Time since the migration started, frozen at its end (QEMU total-time).",
            value=snap.total_seconds,
        )
        if snap.downtime_seconds is not None:
            yield GaugeMetricFamily(
                "postcopy_downtime_seconds",
                "Guest stopped on the source until running on the destination.",
                value=snap.downtime_seconds,
            )
        paused = CounterMetricFamily("postcopy_paused_seconds", "Time spent in postcopy-paused.")
        paused.add_metric([], snap.paused_seconds)
        yield paused
        if self._role != "destination":
            return
        total = CounterMetricFamily(
            "postcopy_blocktime_seconds",
            "Time during which all vCPUs were blocked on remote page faults at once (QEMU postcopy-blocktime).",
        )
        total.add_metric([], snap.blocktime_seconds)
        yield total
        per_vcpu = CounterMetricFamily(
            "postcopy_vcpu_blocktime_seconds",
            "Time each vCPU spent blocked on remote page faults (QEMU postcopy-vcpu-blocktime).",
            labels=["vcpu"],
        )
        values = snap.vcpu_blocktime_seconds
        for index in range(vcpu_count):
            value = values[index] if index < len(values) else 0.0
            per_vcpu.add_metric([str(index)], value if math.isfinite(value) else 0.0)
        yield per_vcpu
