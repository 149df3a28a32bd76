"""The one snapshot both roles return: live (``snapshot()``) and at the end (``result``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ._precopy import PrecopyStats
from ._status import MigrationStatus

__all__ = ["ChannelStats", "HotSetStats", "MigrationStats", "PrefetchStats"]


@dataclass(frozen=True, slots=True)
class PrefetchStats:
    """Source: pages sent ahead of the destination's sequential and strided request streams.

    Pages are target pages. ``pages_used``: sent ahead, then passed by a later request of the
    same stream (or asked for): the guest walked through them. ``wasted_estimate`` is the rest,
    an upper bound of what was sent ahead for nothing (a guest that walks on without faulting
    leaves no trace; nothing is sent twice, so the waste is order, not bytes).
    """

    pages_sent: int = 0
    pages_used: int = 0
    windows: int = 0
    hits: int = 0
    misses: int = 0

    @property
    def wasted_estimate(self) -> int:
        return self.pages_sent - self.pages_used

    @property
    def wasted_fraction(self) -> float:
        return self.wasted_estimate / self.pages_sent if self.pages_sent else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"pages_sent": self.pages_sent, "pages_used": self.pages_used, "windows": self.windows,
                "hits": self.hits, "misses": self.misses, "wasted_estimate": self.wasted_estimate,
                "wasted_fraction": round(self.wasted_fraction, 4)}


@dataclass(frozen=True, slots=True)
class HotSetStats:
    """Source: the hot set of an earlier migration pushed first, and the one this migration records.

    Target pages. ``pages``: in the loaded hot set, as far as this migration's blocks hold them;
    ``pushed``: sent before they were asked for, first in the bulk stream or on the preempt channel
    (the others were asked for, sent ahead or already sent before their turn; after a recovery the
    pages the destination lost are pushed again and count again); ``recorded``: requested or sent ahead here (``--record-hot-set``).
    """

    pages: int = 0
    pushed: int = 0
    recorded: int = 0
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"pages": self.pages, "pushed": self.pushed, "recorded": self.recorded,
                "warnings": list(self.warnings)}


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """What one channel carried, over every connection it had."""

    normal_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0

    def __add__(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(self.normal_pages + other.normal_pages, self.zero_pages + other.zero_pages,
                            self.bytes + other.bytes)

    @property
    def pages(self) -> int:
        return self.normal_pages + self.zero_pages


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """Figures of one role. Pages are target pages (4 KiB); times are monotonic ns.

    Fields that do not apply to a role stay 0.
    """

    role: Literal["source", "destination"]
    status: MigrationStatus
    error: str | None = None
    error_kind: str | None = None
    pages_total: int = 0
    pages_received: int = 0
    """Destination: target pages placed (received bitmap)."""
    dirty_pages: int = 0
    """Source: target pages still to send."""
    main: ChannelStats = ChannelStats()
    preempt: ChannelStats = ChannelStats()
    remote_faults: int = 0
    """Destination: faults that needed the source; source: page requests received."""
    requests_sent: int = 0
    """Destination: page requests written on the return path."""
    requests_resent: int = 0
    """Destination: page requests sent again after recoveries (those outstanding at the pause)."""
    pending_requests: int = 0
    """Destination: pages requested and not yet placed."""
    bad_requests: int = 0
    duplicate_host_pages: int = 0
    discard_ranges: int = 0
    recoveries: int = 0
    restarts: int = 0
    paused_ns: int = 0
    blocktime_ns: int = 0
    vcpu_blocktime_ns: tuple[int, ...] = ()
    started_ns: int = 0
    stopped_ns: int = 0
    """Source: the guest stopped (the downtime started)."""
    downtime_ns: int = 0
    """Source: guest stopped -> PONG 3's arrival (the destination sends it once its guest runs;
    timed at the kernel's receive, not at the return-path thread's read)."""
    source_stopped_ns: int = 0
    """Destination: when the source says its guest stopped."""
    guest_started_ns: int = 0
    finished_ns: int = 0
    recovery_errors: tuple[str, ...] = ()
    refused_connections: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    """Source: the C data path's raw counters."""
    precopy: PrecopyStats | None = None
    """Source: the precopy phase before the switch (None: postcopy at once)."""
    prefetch: PrefetchStats | None = None
    """Source: pages sent ahead of the guest (None: prefetch off)."""
    hot_set: HotSetStats | None = None
    """Source: a hot set pushed first or recorded (None: neither)."""

    @property
    def pages_sent(self) -> int:
        return self.main.pages + self.preempt.pages

    @property
    def bytes(self) -> int:
        return self.main.bytes + self.preempt.bytes
