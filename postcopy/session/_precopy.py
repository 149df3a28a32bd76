"""Precopy before postcopy: the rounds' record and the switchover policy (pure).

While the guest runs, the source sends every page once, then in rounds what
the kernel's dirty tracking found written since (``uffd/_dirty.py``). The
policy decides after each round whether to stop the guest and switch to
postcopy; a deadline (``max_seconds``) ends the round in progress.

Policies (``SwitchoverPolicy``):

* ``time``: after ``max_seconds`` (and/or ``max_rounds``), whatever the guest does;
* ``auto``: also as soon as precopy stops paying off: the expected downtime of a
  pure precopy finish (dirty pages / the last round's bandwidth) is within
  ``max_downtime`` (converged: little is left for postcopy), or the dirty rate
  stopped shrinking while that downtime is still above the bound (precopy will
  not converge: postcopy takes the rest). ``max_seconds`` stays an upper bound.
* ``manual`` (QMP): rounds go on until ``migrate-start-postcopy``.

The switch after precopy (``drain_seconds`` > 0): with the guest still running,
a scan, the discards for what it found (the destination drops those pages while
the guest runs) and a PING; the guest stops when its PONG comes back, or after
``drain_seconds`` whatever happens. A destination answers a PING only after
everything before it on the main channel (QEMU's loads the stream in order), so
at the stop the socket buffers are empty and the downtime's discards cover only
the pages written since that scan.

During precopy the guest's writers run at ``writer_nice`` (19) so that the sender and
the receiver go first; at the switch they get their priority back. The drain resends
(``drain_mode="resend"``) what the scan at the switch found in a last pass, and again
while the discard runs left halve, before its PING. A pass (or its PONG) not done within
``DRAIN_RESEND_SHARE`` of ``drain_seconds`` is cut and falls back to the discard drain with a
fresh PING, so the guest stops once the destination has taken what was sent, not with a
queue of it.

Throttling (``ThrottlePolicy``, QEMU's auto-converge): a round longer than
``sync_seconds`` is cut and scanned, so the dirty rate is measured during a long
first pass too; when a period's dirty bytes exceed ``trigger`` of the bytes it
sent, ``high_periods`` times, the guest is throttled to ``initial`` %, then
``increment`` % more each time, up to ``maximum`` %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["DISCARD_RANGE_SECONDS", "DRAIN_DISCARD_WAIT_MAX", "DRAIN_RESEND_SHARE", "MIN_ROUND_SECONDS", "THROTTLE_PRESETS", "WRITER_NICE", "PrecopyStats", "RoundRecord", "SwitchoverPolicy", "ThrottlePolicy"]

TARGET_PAGE: Final = 4096
#: A round shorter than this waits before its scan (an idle guest does not spin).
MIN_ROUND_SECONDS: Final = 0.05
#: "Stopped shrinking": the dirty rate fell by less than this fraction.
SHRINK_FRACTION: Final = 0.10
#: The resend drain's share of ``drain_seconds``: a last pass still under way then (or whose PONG
#: is not back) is cut and falls back to discards and a fresh PING (the rest of ``drain_seconds``
#: is that fallback's own wait), so that no queue of sent data is left for the downtime. What the
#: link carried by then stays on the destination (a pass is not skipped for its size: measured,
#: skipping a flat-out guest's pass left 1.3x pure postcopy's remote faults).
DRAIN_RESEND_SHARE: Final = 0.5
#: A fallback's wait grows by this much a discard range it sends (the destination's cost of one,
#: decoded and dropped, on this 2-core machine under load): its discards are no queue at the stop
#: either...
DISCARD_RANGE_SECONDS: Final = 25e-6
#: ... by at most this many ``drain_seconds``.
DRAIN_DISCARD_WAIT_MAX: Final = 2.0
#: During precopy the guest's writers run at this nice (the lowest priority): the sender
#: (nice 10) and, on one host, the destination's receiver go first.
WRITER_NICE: Final = 19


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One precopy round: what it sent and what the scan after it found written."""

    seconds: float
    bytes: int
    dirty_pages: int

    @property
    def dirty_rate(self) -> float:
        """Pages written per second during the round."""
        return self.dirty_pages / self.seconds if self.seconds > 0 else 0.0

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Auto-converge: QEMU's cpu-throttle-initial, cpu-throttle-increment, max-cpu-throttle and
    throttle-trigger-threshold (its two high periods and 1 s period are the defaults here)."""

    initial: int = 20
    increment: int = 10
    maximum: int = 99
    trigger: float = 0.5
    """A period is "high" when the bytes it dirtied exceed this share of the bytes it sent."""
    high_periods: int = 2
    """Throttle (more) after this many high periods (QEMU: 2)."""
    sync_seconds: float = 1.0
    """A round running longer is cut there and scanned (the next one goes on with its pass)."""

    def __post_init__(self) -> None:
        if not (1 <= self.initial <= 99 and 0 <= self.increment <= 99 and 1 <= self.maximum <= 99):
            raise ValueError("throttle percentages must be within 1-99 (increment 0-99)")
        if self.initial > self.maximum:
            raise ValueError(f"throttle initial {self.initial} % is above its maximum {self.maximum} %")
        if self.trigger <= 0 or self.high_periods < 1 or self.sync_seconds <= 0:
            raise ValueError("throttle trigger, high periods and sync period must be positive")

    def after(self, record: RoundRecord, percent: int, high: int) -> tuple[int, int]:
        """After a period: the new throttle percentage and count of high periods."""
        if record.dirty_pages * TARGET_PAGE <= self.trigger * record.bytes:
            return percent, high
        high += 1
        if high < self.high_periods:
            return percent, high
        if percent == 0:
            return self.initial, 0
        return min(percent + self.increment, self.maximum), 0

    @classmethod
    def preset(cls, name: str) -> ThrottlePolicy:
        """``qemu``: QEMU's defaults (20 % first, +10 %, two high 1 s periods: it acts after
        2 s at the earliest); ``fast``: for a short precopy (see THROTTLE_PRESETS)."""
        try:
            return THROTTLE_PRESETS[name]
        except KeyError:
            raise ValueError(f"throttle preset {name!r}: choose {', '.join(THROTTLE_PRESETS)}") from None


#: Auto-converge presets. ``fast`` is what QEMU users do for a short precopy (a high
#: cpu-throttle-initial): the dirty rate is measured every 0.25 s, one high period throttles
#: at once, and hard, so that a flat-out writer converges within about a second.
THROTTLE_PRESETS: Final[dict[str, ThrottlePolicy]] = {
    "qemu": ThrottlePolicy(),
    "fast": ThrottlePolicy(initial=95, increment=4, maximum=99, high_periods=1, sync_seconds=0.25),
}


@dataclass(frozen=True, slots=True)
class SwitchoverPolicy:
    mode: Literal["time", "auto", "manual"] = "time"
    max_seconds: float = 2.0
    max_rounds: int = 0
    """0: no limit on rounds."""
    max_downtime: float = 0.3
    """auto: the bound on a pure precopy finish's downtime (QEMU's downtime-limit, 300 ms)."""
    drain_seconds: float = 1.0
    """At the switch, the longest wait for the destination to take what was sent before the
    guest stops (0: stop at once, the backlog and every discard fall into the downtime)."""
    drain_mode: Literal["resend", "discard"] = "resend"
    """What the drain does with the pages the scan at the switch finds dirty, the guest still
    running: ``resend`` them in a last pass (the destination keeps them unless written again),
    or ``discard`` them (the destination drops them: they fault after RUN)."""
    throttle: ThrottlePolicy | None = None
    """Auto-converge: slow the guest down while its dirty rate outruns the rounds."""
    max_discard_ranges: int = 512
    """After the stop, at most this many discard ranges (more are widened to aligned chunks
    that go again: each range costs the destination time in the downtime; 0: no bound)."""
    writer_nice: int = WRITER_NICE
    """During precopy the guest's writers (vCPUs) run at this nice, so the migration's own
    threads take the CPUs first; restored at the switch (0: the guest keeps its priority)."""

    def __post_init__(self) -> None:
        if self.mode not in ("time", "auto", "manual"):
            raise ValueError(f"switchover {self.mode!r}: choose time, auto or manual")
        if self.drain_mode not in ("resend", "discard"):
            raise ValueError(f"drain mode {self.drain_mode!r}: choose resend or discard")
        if (self.max_seconds < 0 or self.max_rounds < 0 or self.max_downtime < 0 or self.drain_seconds < 0
                or self.max_discard_ranges < 0):
            raise ValueError("precopy limits must not be negative")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"writer nice {self.writer_nice}: must be within 0..19 (0: unchanged)")

    def deadline(self, started: float) -> float | None:
        """When the round in progress is cut short and the switch happens."""
        if self.mode == "manual" or self.max_seconds <= 0:
            return None
        return started + self.max_seconds

    def decide(self, rounds: Sequence[RoundRecord], elapsed: float) -> str | None:
        """After a round and its scan: why to switch now, or None to go on."""
        if self.mode == "manual" or not rounds:
            return None
        if self.max_seconds > 0 and elapsed >= self.max_seconds:
            return "time"
        if self.max_rounds and len(rounds) >= self.max_rounds:
            return "rounds"
        if self.mode != "auto":
            return None
        last = rounds[-1]
        bandwidth = max((r.bandwidth for r in rounds[-3:]), default=0.0)
        expected = last.dirty_pages * TARGET_PAGE / bandwidth if bandwidth > 0 else float("inf")
        if last.dirty_pages == 0 or expected <= self.max_downtime:
            return "converged"
        if len(rounds) >= 3 and last.dirty_rate >= (1 - SHRINK_FRACTION) * rounds[-2].dirty_rate:
            return "not_shrinking"
        return None


@dataclass(frozen=True, slots=True)
class PrecopyStats:
    """What the report and the metrics show as ``precopy``."""

    rounds: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dirty_pages_last_round: int = 0
    dirty_rate_pages_per_s: float = 0.0
    dirty_pages_at_switch: int = 0
    discard_ranges: int = 0
    switch_reason: str = ""
    tracking: str = ""
    drain: str = ""
    """How the wait before the stop ended: "pong" (the destination took everything sent),
    "timeout", or "" (no drain)."""
    drain_seconds: float = 0.0
    dirty_pages_before_stop: int = 0
    """Dirty at the scan before the drain (resent, or discarded, while the guest still ran)."""
    drain_bytes: int = 0
    """Sent by the drain's last passes (resend)."""
    drain_passes: int = 0
    """Resend: the passes before the stop (another while the discard ranges left halve)."""
    discard_ranges_before_stop: int = 0
    drain_fallback: str = ""
    """Resend: "deadline" when the pass or its PONG was not done within its share of
    ``drain_seconds`` (cut, then discards and a fresh PING); "" (no fallback)."""
    throttle_percent: int = 0
    """The highest throttle reached (auto-converge)."""
    throttle_changes: int = 0
    discard_chunk_pages: int = 1
    """After the stop: the target pages one discard range was widened to (1: not widened)."""
    writer_nice: int = 0
    """The nice the guest's writers ran at during precopy (0: unchanged)."""

    def as_dict(self) -> dict[str, object]:
        return {"rounds": self.rounds, "bytes": self.bytes, "seconds": round(self.seconds, 4),
                "dirty_pages_last_round": self.dirty_pages_last_round,
                "dirty_rate_pages_per_s": round(self.dirty_rate_pages_per_s, 1),
                "dirty_pages_at_switch": self.dirty_pages_at_switch, "discard_ranges": self.discard_ranges,
                "switch_reason": self.switch_reason, "tracking": self.tracking,
                "drain": self.drain, "drain_seconds": round(self.drain_seconds, 4),
                "dirty_pages_before_stop": self.dirty_pages_before_stop, "drain_bytes": self.drain_bytes,
                "drain_passes": self.drain_passes,
                "discard_ranges_before_stop": self.discard_ranges_before_stop,
                "drain_fallback": self.drain_fallback,
                "throttle_percent": self.throttle_percent, "throttle_changes": self.throttle_changes,
                "discard_chunk_pages": self.discard_chunk_pages, "writer_nice": self.writer_nice}
