"""Every metric of one migration role, built on a registry the caller owns.

The hot paths hold the pre-labelled children kept in the returned dataclass and
only ever call ``inc()`` / ``observe()`` on them; scrape-time values (state,
pending requests, blocktime, progress) come from :class:`MigrationCollector`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from types import MappingProxyType
from typing import Any, Final, Literal, overload

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from metrics._collectors import MigrationCollector
from metrics._vocabulary import (
    CHANNELS,
    PAGE_KINDS,
    PREFETCH_RESULTS,
    PROTOCOL_ERROR_KINDS,
    REFUSAL_REASONS,
    ROLES,
    Role,
)
from postcopy import CORE_BUILD

__all__ = [
    "LATENCY_BUCKETS_SECONDS",
    "ChannelCounters",
    "DestinationMetrics",
    "Metrics",
    "SourceMetrics",
    "make_metrics",
]

# 5 µs (a local UFFDIO_COPY) to 1 s (a stalled link): loopback RTT is ~15-20 µs
# and a 2 MiB placement ~0.4 ms, so the decades in between get 1-2.5-5 steps.
LATENCY_BUCKETS_SECONDS: Final[tuple[float, ...]] = (
    5e-6,
    10e-6,
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
)


@dataclass(frozen=True, slots=True)
class ChannelCounters:
    """Pre-labelled counters of one channel (sent on the source, received on the destination)."""

    normal_pages: Counter
    """Pages carrying data."""
    zero_pages: Counter
    """Pages sent as the zero flag, without data."""
    bytes: Counter
    """Stream bytes, framing included."""


@dataclass(frozen=True, slots=True)
class Metrics:
    """The metrics both roles have."""

    role: Role
    registry: CollectorRegistry
    main: ChannelCounters
    preempt: ChannelCounters
    page_requests: Counter
    """Page requests sent (destination) or received (source) on the return path."""
    discard_ranges: Counter
    """Discard ranges sent (source) or received (destination)."""
    recoveries: Counter
    """Completed postcopy recoveries."""
    protocol_errors: MappingProxyType[str, Counter]
    """One counter per kind in PROTOCOL_ERROR_KINDS."""
    collector: MigrationCollector
    """Scrape-time values; bind a snapshot provider once the role exists."""

    def channel(self, name: str) -> ChannelCounters:
        """The counters of channel ``name`` ("main" or "preempt")."""
        if name == "main":
            return self.main
        if name == "preempt":
            return self.preempt
        raise ValueError(f"unknown channel {name!r}: expected one of {CHANNELS}")

    def protocol_error(self, kind: str) -> None:
        """Count one protocol error; kinds outside PROTOCOL_ERROR_KINDS count as "other"."""
        counter = self.protocol_errors.get(kind)
        if counter is None:
            counter = self.protocol_errors["other"]
        counter.inc()


@dataclass(frozen=True, slots=True)
class SourceMetrics(Metrics):
    """Source-only metrics."""

    request_service_latency: Histogram
    """Page request received -> requested page written to its channel."""
    precopy_rounds: Counter
    """Precopy rounds started (pages sent while the guest ran)."""
    precopy_bytes: Counter
    """Main-channel bytes of the precopy rounds."""
    precopy_dirty_pages: Gauge
    """Pages the last precopy round's scan found written."""
    precopy_dirty_rate: Gauge
    """Pages per second the guest wrote during the last precopy round."""
    prefetch_pages_sent: Counter
    """Target pages sent ahead of the destination's request streams."""
    prefetch_pages_used: Counter
    """Of those, pages the guest then walked through (a later request of the stream passed them)."""
    prefetch_windows: Counter
    """Predicted requests that made new pages due."""
    prefetch_requests: MappingProxyType[str, Counter]
    """Page requests a stream predicted ("hit") or not ("miss"), by PREFETCH_RESULTS."""
    prefetch_wasted_pages: Gauge
    """Sent ahead and not walked through (yet): the waste estimate, an upper bound."""
    hot_set_pages: Gauge
    """Target pages of the hot set pushed first (as far as this migration's blocks hold them)."""
    bulk_pauses: Counter
    """Times the background stream stood aside for requested pages (preempt)."""
    bulk_pause_seconds: Counter
    """Time it spent so."""
    page_requests_preempt: Counter
    """Of the page requests, those read on the preempt channel's way back (our destination's 4 KiB ones)."""
    hot_set_pages_pushed: MappingProxyType[str, Counter]
    """Hot set pages sent before they were asked for, by channel (main: first in the bulk stream)."""
    hot_set_pages_recorded: Counter
    """Target pages recorded for a later migration's hot set."""


@dataclass(frozen=True, slots=True)
class DestinationMetrics(Metrics):
    """Destination-only metrics."""

    page_faults: Counter
    """Missing-page faults read from userfaultfd (after dropping already-received pages)."""
    page_requests_resent: Counter
    """Page requests sent again after a recovery (outstanding at the pause)."""
    fault_latency: Histogram
    """Fault read -> page placed (the guest thread is woken)."""
    fault_request_delay: Histogram
    """Fault read -> page request written to the return path."""
    page_request_latency: Histogram
    """Page request written -> requested page received."""
    refused_connections: MappingProxyType[str, Counter]
    """Connections and streams refused (strangers, stalled or malformed peers), by reason."""


def _version() -> str:
    try:
        return metadata.version("postcopy")
    except metadata.PackageNotFoundError:
        return "unknown"


def _channel_counters(
    registry: CollectorRegistry, direction: Literal["sent", "received"]
) -> tuple[ChannelCounters, ...]:
    verb = "Sent to" if direction == "sent" else "Received from"
    pages = Counter(
        f"postcopy_pages_{direction}",
        f"{verb} the peer: guest pages, by channel and kind.",
        ["channel", "kind"],
        registry=registry,
    )
    nbytes = Counter(
        f"postcopy_{direction}_bytes",
        f"{verb} the peer: migration stream bytes, by channel.",
        ["channel"],
        registry=registry,
    )
    for channel in CHANNELS:
        for kind in PAGE_KINDS:
            pages.labels(channel, kind)
    return tuple(
        ChannelCounters(
            normal_pages=pages.labels(channel, "normal"),
            zero_pages=pages.labels(channel, "zero"),
            bytes=nbytes.labels(channel),
        )
        for channel in CHANNELS
    )


def _histogram(registry: CollectorRegistry, name: str, doc: str) -> Histogram:
    return Histogram(name, doc, registry=registry, buckets=LATENCY_BUCKETS_SECONDS)


@overload
def make_metrics(registry: CollectorRegistry, role: Literal["source"]) -> SourceMetrics: ...
@overload
def make_metrics(
    registry: CollectorRegistry, role: Literal["destination"]
) -> DestinationMetrics: ...
@overload
def make_metrics(registry: CollectorRegistry, role: Role) -> Metrics: ...


def make_metrics(registry: CollectorRegistry, role: Role) -> Metrics:
    """Create every metric of ``role`` on ``registry`` (one registry per role).

    All label values exist from the start, at 0. Raises ValueError for an unknown
    role and prometheus_client's ValueError if the registry already holds them.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {ROLES}")
    direction: Literal["sent", "received"] = "sent" if role == "source" else "received"
    peer_direction = "received" if role == "source" else "sent"

    main, preempt = _channel_counters(registry, direction)
    page_requests = Counter(
        f"postcopy_page_requests_{peer_direction}",
        f"Page requests (REQ_PAGES / REQ_PAGES_ID) {peer_direction} on the return path.",
        registry=registry,
    )
    discard_ranges = Counter(
        f"postcopy_discard_ranges_{direction}",
        f"POSTCOPY_RAM_DISCARD ranges {direction}.",
        registry=registry,
    )
    recoveries = Counter(
        "postcopy_recoveries",
        "Postcopy recoveries completed (postcopy-paused back to postcopy-active).",
        registry=registry,
    )
    errors = Counter(
        "postcopy_protocol_errors",
        "Malformed or unexpected migration stream input, by kind.",
        ["kind"],
        registry=registry,
    )
    protocol_errors = MappingProxyType({kind: errors.labels(kind) for kind in PROTOCOL_ERROR_KINDS})
    build = Info("postcopy_build", "Build of the running service.", registry=registry)
    # the protocol core's build: "interpreted" on a node is a slower switch (docs/operations.md)
    build.info({"version": _version(), "python": platform.python_version(), "role": role,
                "sans_io_core": "compiled" if CORE_BUILD.compiled else "interpreted"})
    collector = MigrationCollector(role)
    registry.register(collector)

    common: dict[str, Any] = dict(
        role=role,
        registry=registry,
        main=main,
        preempt=preempt,
        page_requests=page_requests,
        discard_ranges=discard_ranges,
        recoveries=recoveries,
        protocol_errors=protocol_errors,
        collector=collector,
    )
    if role == "source":
        prefetch_requests = Counter("postcopy_prefetch_requests",
                                    "Page requests the prefetch predicted (hit) or not (miss).", ["result"],
                                    registry=registry)
        hot_pushed = Counter("postcopy_hot_set_pages_pushed",
                             "Hot set pages sent before the destination asked for them, by channel.", ["channel"],
                             registry=registry)
        return SourceMetrics(
            **common,
            request_service_latency=_histogram(
                registry,
                "postcopy_page_request_service_seconds",
                "Page request received -> requested page written to its channel.",
            ),
            precopy_rounds=Counter("postcopy_precopy_rounds", "Precopy rounds started before the switch.",
                                   registry=registry),
            precopy_bytes=Counter("postcopy_precopy_bytes", "Main-channel bytes sent by precopy rounds.",
                                  registry=registry),
            precopy_dirty_pages=Gauge("postcopy_precopy_dirty_pages",
                                      "Target pages the last precopy round's scan found written.", registry=registry),
            precopy_dirty_rate=Gauge("postcopy_precopy_dirty_rate_pages_per_second",
                                     "Target pages per second the guest wrote during the last precopy round.",
                                     registry=registry),
            prefetch_pages_sent=Counter("postcopy_prefetch_pages_sent",
                                        "Target pages sent ahead of the destination's request streams.",
                                        registry=registry),
            prefetch_pages_used=Counter("postcopy_prefetch_pages_used",
                                        "Target pages sent ahead that the guest then walked through.",
                                        registry=registry),
            prefetch_windows=Counter("postcopy_prefetch_windows",
                                     "Predicted page requests that made new pages due to send ahead.",
                                     registry=registry),
            prefetch_requests=MappingProxyType({r: prefetch_requests.labels(r) for r in PREFETCH_RESULTS}),
            prefetch_wasted_pages=Gauge("postcopy_prefetch_wasted_pages",
                                        "Target pages sent ahead and not walked through (yet): an upper bound "
                                        "of the prefetch's waste.", registry=registry),
            hot_set_pages=Gauge("postcopy_hot_set_pages", "Target pages of the hot set pushed first.",
                                registry=registry),
            bulk_pauses=Counter("postcopy_bulk_pauses",
                                "Times the background stream stood aside for requested pages (preempt).",
                                registry=registry),
            bulk_pause_seconds=Counter("postcopy_bulk_pause_seconds",
                                       "Time the background stream stood aside for requested pages (preempt).",
                                       registry=registry),
            page_requests_preempt=Counter("postcopy_page_requests_preempt",
                                          "Page requests read on the preempt channel's way back (our destination "
                                          "sends 4 KiB pages' there; QEMU's all come on the return path).",
                                          registry=registry),
            hot_set_pages_pushed=MappingProxyType({ch: hot_pushed.labels(ch) for ch in CHANNELS}),
            hot_set_pages_recorded=Counter("postcopy_hot_set_pages_recorded",
                                           "Target pages recorded for a later migration's hot set.",
                                           registry=registry),
        )
    refused = Counter(
        "postcopy_refused_connections",
        "Connections or streams the destination refused without disturbing the migration, by reason.",
        ["reason"],
        registry=registry,
    )
    return DestinationMetrics(
        **common,
        refused_connections=MappingProxyType({reason: refused.labels(reason) for reason in REFUSAL_REASONS}),
        page_faults=Counter(
            "postcopy_page_faults",
            "Missing-page faults on not-yet-received guest pages.",
            registry=registry,
        ),
        page_requests_resent=Counter(
            "postcopy_page_requests_resent",
            "Page requests sent again after a recovery (those outstanding at the pause).",
            registry=registry,
        ),
        fault_latency=_histogram(
            registry,
            "postcopy_fault_latency_seconds",
            "Page fault -> page placed and faulting thread woken.",
        ),
        fault_request_delay=_histogram(
            registry,
            "postcopy_fault_request_delay_seconds",
            "Page fault -> page request written to the return path.",
        ),
        page_request_latency=_histogram(
            registry,
            "postcopy_page_request_latency_seconds",
            "Page request written -> requested page received.",
        ),
    )
