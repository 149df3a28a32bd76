"""Prometheus metrics for both migration roles.

``make_metrics(registry, role)`` builds every metric on a registry the caller
owns; hot paths only call ``inc()`` / ``observe()`` on what it returns; scrape-time
values come from the collector bound to a snapshot provider; ``serve_metrics``
exposes a registry over HTTP. The metric list is in docs/operations.md.
"""

from __future__ import annotations

from metrics._collectors import MAX_VCPU_SERIES, MigrationCollector, MigrationSnapshot, SnapshotProvider
from metrics._definitions import (
    LATENCY_BUCKETS_SECONDS,
    ChannelCounters,
    DestinationMetrics,
    Metrics,
    SourceMetrics,
    make_metrics,
)
from metrics._http import MetricsServer, serve_metrics
from metrics._vocabulary import (
    CHANNELS,
    PAGE_KINDS,
    PREFETCH_RESULTS,
    PROTOCOL_ERROR_KINDS,
    ROLES,
    Channel,
    MigrationStatus,
    PageKind,
    Role,
)

__all__ = [
    "CHANNELS",
    "LATENCY_BUCKETS_SECONDS",
    "MAX_VCPU_SERIES",
    "PAGE_KINDS",
    "PREFETCH_RESULTS",
    "PROTOCOL_ERROR_KINDS",
    "ROLES",
    "Channel",
    "ChannelCounters",
    "DestinationMetrics",
    "Metrics",
    "MetricsServer",
    "MigrationCollector",
    "MigrationSnapshot",
    "MigrationStatus",
    "PageKind",
    "Role",
    "SnapshotProvider",
    "SourceMetrics",
    "make_metrics",
    "serve_metrics",
]
