"""What the handler tells about itself: Prometheus families at scrape time and
the JSON report, both read from the shared records (so a server crash loses
nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from metrics import LATENCY_BUCKETS_SECONDS
from postcopy.handler._mappings import HandshakeErrorKind, Region
from postcopy.handler._shared import StateSnapshot
from uffd._lowlevel import lib

if TYPE_CHECKING:
    from postcopy.handler._supervisor import Supervisor

__all__ = ["END_REASONS", "HANDSHAKE_RESULTS", "HandlerCollector", "session_report"]

HANDSHAKE_RESULTS: Final[tuple[str, ...]] = ("ok", *HandshakeErrorKind.__args__)  # type: ignore[attr-defined]
END_REASONS: Final = ("vmm_closed", "extra_message", "vmm_gone", "error", "shutdown")
_BOUNDS_NS = tuple(int(lib.pc_hs_prom_bound_ns(i)) for i in range(int(lib.PC_HS_PROM_BUCKETS)))
if tuple(round(b / 1e9, 9) for b in _BOUNDS_NS) != LATENCY_BUCKETS_SECONDS:
    raise ImportError("uffd/csrc/handler.c latency bounds differ from metrics.LATENCY_BUCKETS_SECONDS: rebuild the C core")


@dataclass(frozen=True, slots=True)
class SessionView:
    """One VMM as the report and the collector see it."""

    session_id: int
    pid: int
    uid: int
    gid: int
    regions: tuple[Region, ...]
    started_at: float
    end_reason: str | None
    snapshot: StateSnapshot


def session_report(view: SessionView) -> dict[str, Any]:
    s = view.snapshot
    npages = max(1, s["npages"])
    resident = s["resident_ns"] != 0
    cumulative, counts = 0, []
    for n in s.prom_buckets:
        cumulative += n
        counts.append(cumulative)
    return {
        "id": view.session_id,
        "pid": view.pid,
        "uid": view.uid,
        "gid": view.gid,
        "regions": [r.as_json() for r in view.regions],
        "started_at": view.started_at,
        "state": "ended" if view.end_reason else "serving",
        "end_reason": view.end_reason,
        "faults": {"total": s["faults"], "copy": s["faults_copy"], "zero": s["faults_zero"],
                   "already_placed": s["faults_present"]},
        "latency_us": s.latency().as_json(),
        "latency_histogram": {"le_seconds": [*LATENCY_BUCKETS_SECONDS, "+Inf"], "cumulative": counts},
        "bytes": {"guest": s["total_bytes"], "fault": s["bytes_fault"], "fill": s["bytes_fill"],
                  "zero": s["bytes_zero"], "removed": s["removed_bytes"], "unregistered": s["unregistered_bytes"]},
        "fill": {"pages": s["pages_fill"], "steps": s["fill_steps"], "chunk_bytes": s["fill_chunk"],
                 "progress": round(s["pages_done"] / npages, 6)},
        "resident": resident,
        "time_to_resident_seconds": round((s["resident_ns"] - s["start_ns"]) / 1e9, 6) if resident else None,
        "server_restarts": s["restarts"],
        "pages_already_present": s["eexist"],
        "copy_retries": s["eagain"],
        "removes": s["removes"],
        "wakes": s["wakes"],
    }


class HandlerCollector:
    """Scrape-time families over every VMM the supervisor has served."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        views = self._supervisor.views()
        active = [v for v in views if v.end_reason is None]
        sup = self._supervisor

        vmms = GaugeMetricFamily("postcopy_handler_vmms", "VMMs being served now.")
        vmms.add_metric([], len(active))
        yield vmms
        hs = CounterMetricFamily("postcopy_handler_handshakes", "Handshakes received, by result.", labels=["result"])
        for result in HANDSHAKE_RESULTS:
            hs.add_metric([result], sup.handshakes.get(result, 0))
        yield hs
        ends = CounterMetricFamily("postcopy_handler_session_ends", "VMM sessions ended, by reason.", labels=["reason"])
        for reason in END_REASONS:
            ends.add_metric([reason], sup.session_ends.get(reason, 0))
        yield ends
        restarts = CounterMetricFamily("postcopy_handler_server_restarts", "Serving processes restarted after they died.")
        restarts.add_metric([], sup.server_restarts)
        yield restarts

        def total(name: str) -> int:
            return sum(v.snapshot[name] for v in views)

        faults = CounterMetricFamily("postcopy_handler_faults", "Page faults read from the VMMs' userfaultfds, by how "
                                     "they were served.", labels=["kind"])
        for kind, field in (("copy", "faults_copy"), ("zero", "faults_zero"), ("already_placed", "faults_present")):
            faults.add_metric([kind], total(field))
        yield faults
        placed = CounterMetricFamily("postcopy_handler_placed_bytes", "Bytes placed into VMM memory, by what placed them.",
                                     labels=["by"])
        for by, field in (("fault", "bytes_fault"), ("fill", "bytes_fill"), ("zero", "bytes_zero")):
            placed.add_metric([by], total(field))
        yield placed
        removed = CounterMetricFamily("postcopy_handler_removed_bytes", "Bytes the VMMs removed (UFFD_EVENT_REMOVE).")
        removed.add_metric([], total("removed_bytes"))
        yield removed
        present = CounterMetricFamily("postcopy_handler_pages_already_present",
                                      "Copies that found the page present (EEXIST), counted as placed.")
        present.add_metric([], total("eexist"))
        yield present
        retries = CounterMetricFamily("postcopy_handler_copy_retries", "Copies retried after EAGAIN (a mapping change pending).")
        retries.add_metric([], total("eagain"))
        yield retries

        lat = HistogramMetricFamily("postcopy_handler_fault_latency_seconds", "Fault read -> page placed (thread woken).")
        cumulative, buckets = 0, []
        sums = [0] * (len(_BOUNDS_NS) + 1)
        for v in views:
            for i, n in enumerate(v.snapshot.prom_buckets):
                sums[i] += n
        for bound, n in zip((*LATENCY_BUCKETS_SECONDS, float("inf")), sums, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        lat.add_metric([], buckets, total("lat_sum_ns") / 1e9)
        yield lat

        guest = sum(v.snapshot["total_bytes"] for v in active)
        resident = sum(v.snapshot["total_bytes"] * v.snapshot["pages_done"] // max(1, v.snapshot["npages"]) for v in active)
        g = GaugeMetricFamily("postcopy_handler_guest_bytes", "Guest memory of the VMMs being served.")
        g.add_metric([], guest)
        yield g
        r = GaugeMetricFamily("postcopy_handler_resident_bytes", "Of it, placed or removed (nothing left to fault).")
        r.add_metric([], resident)
        yield r
        p = GaugeMetricFamily("postcopy_handler_fill_progress_ratio", "resident / guest bytes of the VMMs being served.")
        p.add_metric([], resident / guest if guest else 1.0)
        yield p
