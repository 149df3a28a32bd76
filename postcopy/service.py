"""The composition root: one migration role with its QMP control socket and metrics endpoint.

The role's blocking work (``Destination.serve`` / ``Source.migrate``) runs in a
worker thread; the asyncio loop (uvloop) serves QMP and, every
``sample_interval``, drains the fault latencies into the histogram, turns the
role's C counters (``snapshot()``) into Prometheus counters, records the
report's timeline and feeds the live progress. Nothing here touches guest
memory, and nothing runs per page.

Status changes arrive from the role's threads through ``on_status`` and hop
onto the loop (``call_soon_threadsafe``) before they reach the QMP state, which
emits the MIGRATION events.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from metrics import (
    LATENCY_BUCKETS_SECONDS,
    DestinationMetrics,
    Metrics,
    MetricsServer,
    MigrationSnapshot,
    PROTOCOL_ERROR_KINDS,
    MigrationStatus,
    Role,
    SourceMetrics,
    make_metrics,
    serve_metrics,
)
from postcopy.control import (
    ControlState,
    MigrationInfo,
    MigrationParameters,
    QMPError,
    QMPServer,
    RamStats,
    TcpAddress,
    parse_migration_uri,
)
from postcopy.destination import Destination
from postcopy.guest import Guest
from postcopy.hotset import HotSet
from postcopy.owner import BuiltinGuest, DestinationMemory, SourceMemory
from postcopy.session import MigrationStats, SwitchoverPolicy
from postcopy.source import Source
from postcopy.spec import GuestSpec
from postcopy.wire import DEFAULT_TARGET_PAGE_SIZE as TARGET_PAGE_SIZE

__all__ = [
    "DestinationService",
    "LatencyHistogram",
    "MigrationAbandoned",
    "RunOutcome",
    "Sample",
    "ServiceError",
    "ServiceOptions",
    "SourceService",
    "parse_control_address",
]

log = logging.getLogger("postcopy.service")

_LATENCY_WINDOW = 4096          # recent latencies kept for the live p50
_RECOVER_WAIT_SECONDS = 1.0     # a pause/recover/resume that fails at once is reported to the client
_PAUSED = MigrationStatus.POSTCOPY_PAUSED


class ServiceError(Exception):
    """The service cannot start or run (an address in use, a bad control address)."""


class MigrationAbandoned(ServiceError):
    """QMP ``quit`` arrived while the role's threads were still migrating."""


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the live progress and of the report's timeline."""

    t: float
    """Seconds since the migration started."""
    status: str
    pages: int
    """Destination: target pages received; source: target pages sent."""
    pages_total: int
    bytes: int
    """Stream bytes received (destination) or sent (source), both channels."""
    faults: int
    """Destination: remote page faults; source: page requests received."""
    latency_p50_us: float | None = None
    """Destination: median of the recent fault -> placed latencies."""
    rounds: int = 0
    """Source: precopy rounds so far."""

    def to_json(self) -> dict[str, object]:
        return {"t": round(self.t, 3), "pages": self.pages, "bytes": self.bytes, "faults": self.faults}


@dataclass(slots=True)
class LatencyHistogram:
    """Fault -> placed latencies in the metrics' fixed buckets, for the JSON report."""

    bounds_s: tuple[float, ...] = LATENCY_BUCKETS_SECONDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_SECONDS) + 1))
    sum_s: float = 0.0

    def add(self, samples_ns: list[int]) -> None:
        for ns in samples_ns:       # per fault, at sampling time, never on the data path
            s = ns * 1e-9
            self.counts[bisect.bisect_left(self.bounds_s, s)] += 1
            self.sum_s += s

    def to_json(self) -> dict[str, object]:
        """``counts[i]`` is the number of samples in (bounds[i-1], bounds[i]]; the last one is > the last bound."""
        return {"bounds_s": list(self.bounds_s), "counts": list(self.counts), "sum_s": self.sum_s,
                "count": sum(self.counts)}


@dataclass(slots=True)
class ServiceOptions:
    metrics_port: int | None = None
    """Serve /metrics on this port (0 = any free one); None = no endpoint."""
    metrics_addr: str = "127.0.0.1"
    qmp: str | None = None
    """Control socket: a unix socket PATH, or HOST:PORT for TCP."""
    linger: float | None = None
    """Seconds to keep serving metrics and QMP after the migration ends; None = until
    QMP ``quit`` when there is a control socket, else 0."""
    sample_interval: float = 0.1
    on_sample: Callable[[Sample], None] | None = None
    """Called on the loop thread with every sample (live progress)."""
    on_ready: Callable[[Any], None] | None = None
    """Called on the loop thread once the endpoints listen, with the service."""


@dataclass(slots=True)
class RunOutcome(Generic[R]):
    """What ``run`` hands back: the role's result, what ``finish`` returned, the recorded series."""

    result: Any
    finished: R | None
    timeline: list[dict[str, object]]
    latency_histogram: dict[str, object]
    error: BaseException | None = None


class _SyncingRegistry(CollectorRegistry):
    """A registry that runs a hook before every collection (the counters mirror C counters)."""

    def __init__(self, before_collect: Callable[[], None]) -> None:
        super().__init__()
        self._before_collect = before_collect

    def collect(self) -> Iterator[Metric]:
        self._before_collect()
        yield from super().collect()


def parse_control_address(text: str) -> str | tuple[str, int]:
    """``HOST:PORT`` (digits after the last colon, no slash) is TCP; anything else a unix path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "/" not in text:
        if int(port) > 65535:
            raise ServiceError(f"control address {text!r}: port {port} is out of range 0..65535")
        return host.strip("[]") or "127.0.0.1", int(port)
    if not text or "\0" in text:
        raise ServiceError(f"control address {text!r}: expected a unix socket PATH or HOST:PORT")
    return text


class _RoleService(Generic[R]):
    """What both roles share: the loop, the endpoints, the sampler, status hops, linger."""

    role_name: ClassVar[Role]

    def __init__(self, spec: GuestSpec, options: ServiceOptions) -> None:
        self.spec = spec
        self.options = options
        self._sample_lock = threading.Lock()
        self.registry = _SyncingRegistry(self._sync_before_scrape)
        self.metrics: Metrics = make_metrics(self.registry, self.role_name)
        self.control: ControlState | None = None
        self.metrics_server: MetricsServer | None = None
        self.qmp_server: QMPServer | None = None
        self.timeline: list[dict[str, object]] = []
        self.latency_histogram = LatencyHistogram()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._role_done: asyncio.Future[Any] | None = None
        self._started_ns = 0
        self._finished_ns = 0
        self._synced: dict[int, tuple[Any, float]] = {}
        self._status = MigrationStatus.NONE
        self._paused_since: float | None = None
        self._paused_seconds = 0.0
        self._was_recovering = False
        self._worker_running = False

    # -- endpoints ------------------------------------------------------------------

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.metrics_server.address if self.metrics_server is not None else None

    @property
    def qmp_address(self) -> str | tuple[str, int] | None:
        return self.qmp_server.address if self.qmp_server is not None else None

    async def _open_endpoints(self) -> None:
        o = self.options
        if o.metrics_port is not None:
            try:
                self.metrics_server = serve_metrics(self.registry, o.metrics_port, o.metrics_addr)
            except (OSError, ValueError) as exc:
                message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ServiceError(message) from None
        if o.qmp is not None:
            where = parse_control_address(o.qmp)
            self.control = ControlState(self.role_name, actions=self)  # type: ignore[arg-type]
            self.qmp_server = QMPServer(self.control)
            try:
                if isinstance(where, tuple):
                    await self.qmp_server.start_tcp(*where)
                else:
                    await self.qmp_server.start_unix(where)
            except OSError as exc:
                raise ServiceError(f"cannot open the QMP socket at {o.qmp}: {exc.strerror or exc}") from None

    async def _close_endpoints(self) -> None:
        if self.qmp_server is not None:
            await self.qmp_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

    # -- status, from any thread ------------------------------------------------------

    def _status_from_thread(self, status: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_status, status)

    def _set_status(self, status: str | MigrationStatus) -> None:
        new = MigrationStatus(status)
        old = self._status
        if new is old:
            return
        self._status = new
        now = time.monotonic()
        if new is _PAUSED:
            self._paused_since = now
        elif old is _PAUSED and self._paused_since is not None:
            self._paused_seconds += now - self._paused_since
            self._paused_since = None
        if new is MigrationStatus.POSTCOPY_RECOVER:
            self._was_recovering = True
        elif new is MigrationStatus.POSTCOPY_ACTIVE and self._was_recovering:
            self._was_recovering = False
            self.metrics.recoveries.inc()
        if new in (MigrationStatus.COMPLETED, MigrationStatus.FAILED) and not self._finished_ns:
            self._finished_ns = time.monotonic_ns()
        self._on_status(new)
        if self.control is not None:
            self.control.set_status(new)

    def _on_status(self, status: MigrationStatus) -> None:
        """Role-specific reactions (run state, bandwidth per phase)."""

    def paused_seconds(self) -> float:
        extra = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
        return self._paused_seconds + extra

    def elapsed_seconds(self) -> float:
        if not self._started_ns:
            return 0.0
        end = self._finished_ns or time.monotonic_ns()
        return (end - self._started_ns) / 1e9

    # -- the worker thread ---------------------------------------------------------------

    def _start_worker(self, name: str, work: Callable[[], Any]) -> None:
        """Run ``work`` on a daemon thread (an interrupted process must not wait for it)."""
        loop = self._loop
        assert loop is not None
        assert self._role_done is not None
        done = self._role_done
        self._started_ns = time.monotonic_ns()

        def settle(value: Any, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)

        def body() -> None:
            try:
                value = work()
            except BaseException as exc:  # handed to the loop, which re-raises it
                self._worker_running = False
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                self._worker_running = False
                loop.call_soon_threadsafe(settle, value, None)

        self._worker_running = True
        threading.Thread(target=body, name=name, daemon=True).start()

    @property
    def worker_running(self) -> bool:
        """True while the role's thread runs: the role's memory must stay mapped until it returns."""
        return self._worker_running

    # -- sampling -------------------------------------------------------------------------

    def _sync(self, counter: Any, value: int | float) -> None:
        """Advance a Prometheus counter to the role's C counter (they only grow)."""
        key = id(counter)
        last = self._synced.get(key, (counter, 0))[1]
        if value > last:
            counter.inc(value - last)
            self._synced[key] = (counter, value)

    def _sample(self) -> Sample | None:
        raise NotImplementedError

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(self.options.sample_interval)
            self._sample_and_report()

    def _sync_before_scrape(self) -> None:
        """On the exposition thread: bring the counters up to the C counters, so a scrape is current."""
        try:
            with self._sample_lock:
                self._sample()
        except Exception:
            log.exception("sampling the %s for a scrape failed", self.role_name)

    def _sample_and_report(self) -> None:
        try:
            with self._sample_lock:
                sample = self._sample()
        except Exception:
            log.exception("sampling the %s failed", self.role_name)
            return
        if sample is None:
            return
        point = sample.to_json()
        if self.timeline and self.timeline[-1]["t"] == point["t"]:
            self.timeline[-1] = point       # the clock stopped with the migration: one point per instant
        else:
            self.timeline.append(point)
        if self.options.on_sample is not None:
            self.options.on_sample(sample)

    # -- running ----------------------------------------------------------------------------

    async def _begin(self) -> None:
        """Start the role at once (no control socket, or an address given on the command line)."""
        raise NotImplementedError

    def run(self, finish: Callable[[Any], R] | None = None) -> RunOutcome[R]:
        """Run the role to its end on a fresh uvloop; ``finish(result)`` runs in a worker thread
        once the migration has ended and before lingering (write the report there)."""
        return uvloop.run(self._main(finish))

    async def _main(self, finish: Callable[[Any], R] | None) -> RunOutcome[R]:
        self._loop = asyncio.get_running_loop()
        self._role_done = self._loop.create_future()
        await self._open_endpoints()
        try:
            if self.options.on_ready is not None:
                self.options.on_ready(self)
            await self._begin()
            quit_wait = (asyncio.ensure_future(self.control.quit_requested.wait())
                         if self.control is not None else None)
            sampler = asyncio.create_task(self._sampler())
            try:
                waiting: set[asyncio.Future[Any]] = {self._role_done}
                if quit_wait is not None:
                    waiting.add(quit_wait)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not self._role_done.done():
                    raise MigrationAbandoned("QMP quit arrived before the migration finished")
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            self._sample_and_report()       # the final figures, exactly
            error = self._role_done.exception()
            if error is not None:
                self._count_error(error)
            result = None if error is not None else self._role_done.result()
            finished = None
            if error is None and finish is not None:
                finished = await asyncio.to_thread(finish, result)
            await self._linger(quit_wait)
            return RunOutcome(result=result if error is None else self._partial_result(), finished=finished,
                              timeline=self.timeline, latency_histogram=self.latency_histogram.to_json(),
                              error=error)
        finally:
            await self._close_endpoints()

    def _partial_result(self) -> Any:
        return None

    def _count_error(self, error: BaseException) -> None:
        """A migration that failed on bad input counts one protocol error of its kind."""
        kind = getattr(error, "kind", None)
        if isinstance(kind, str) and (kind in PROTOCOL_ERROR_KINDS or kind == "protocol"):
            self.metrics.protocol_error(kind)

    async def _linger(self, quit_wait: asyncio.Future[Any] | None) -> None:
        linger = self.options.linger
        if linger is None and quit_wait is None:
            return
        try:
            if quit_wait is None:
                await asyncio.sleep(linger or 0.0)
            else:
                await asyncio.wait_for(quit_wait, timeout=linger)
        except TimeoutError:
            pass
        finally:
            if quit_wait is not None:
                quit_wait.cancel()

    # -- MigrationActions shared parts -----------------------------------------------------

    def _capability(self, name: str, default: bool) -> bool:
        return self.control.capability(name) if self.control is not None else default

    async def _role_call(self, command: str, role: object, method: str, *args: object) -> None:
        """Call a recovery method of the role if it exists (issue 5), in a thread."""
        fn = getattr(role, method, None) if role is not None else None
        if fn is None:
            raise QMPError(f"{command} is not available yet: this postcopy service cannot "
                           f"{'pause' if method == 'pause' else 'recover'} a migration (recovery is pending)")
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        done, _ = await asyncio.wait({task}, timeout=_RECOVER_WAIT_SECONDS)
        if task in done and task.exception() is not None:
            raise QMPError(f"{command} failed: {task.exception()}")

    def parameters_changed(self, parameters: MigrationParameters) -> None:
        """Both roles record parameters; the source applies its bandwidth."""

    async def migrate(self, uri: str, *, resume: bool) -> None:
        raise QMPError("Guest is waiting for an incoming migration")

    async def migrate_incoming(self, uri: str) -> None:
        raise QMPError("migrate-incoming is a destination command; this is the migration source")

    async def start_postcopy(self) -> None:
        raise QMPError("Postcopy must be started after migration has been started")

    async def recover(self, uri: str) -> None:
        raise QMPError("Migrate recover can only be run when postcopy is paused.")


def _tcp_address(command: str, uri: str) -> tuple[str, int]:
    where = parse_migration_uri(uri)
    if not isinstance(where, TcpAddress):
        raise QMPError(f"{command}: this postcopy service migrates over TCP only; use tcp:HOST:PORT, not '{uri}'")
    return where.host, where.port


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes * 8 / 1e6 / seconds, 2) if seconds > 0 else 0.0


class DestinationService(_RoleService[R]):
    """``postcopy dest``: a Destination behind QMP and /metrics.

    With ``listen`` the migration is accepted there at once; else it waits for
    QMP ``migrate-incoming tcp:HOST:PORT``.
    """

    role_name: ClassVar[Role] = "destination"

    def __init__(self, spec: GuestSpec, *, preempt: bool = True, verify: bool = False,
                 listen: tuple[str, int] | None = None, options: ServiceOptions | None = None,
                 on_listening: Callable[[tuple[str, int]], None] | None = None,
                 fail_fast: bool = False, max_packaged: int | None = None,
                 owner: Callable[[], DestinationMemory] | None = None, link_timeout: float = 3.0,
                 prealloc: bool = True) -> None:
        """``owner`` makes the memory owner of each incoming migration (default: the built-in guest of
        ``spec``, its memory all allocated before the stream unless not ``prealloc``)."""
        options = options or ServiceOptions()
        if listen is None and options.qmp is None:
            raise ServiceError("the destination needs a listen address or a QMP socket to receive migrate-incoming")
        super().__init__(spec, options)
        self.preempt = preempt
        self.verify = verify
        self.listen = listen
        self.on_listening = on_listening
        self.fail_fast = fail_fast
        self.max_packaged = max_packaged
        self.make_owner: Callable[[], DestinationMemory] = owner or (lambda: BuiltinGuest(self.spec, prealloc=prealloc))
        self.link_timeout = link_timeout
        self.destination: Destination | None = None
        self.listen_address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._observed = 0
        self._recent: deque[int] = deque(maxlen=_LATENCY_WINDOW)
        self.metrics.collector.bind(self._snapshot_for_metrics, spec.vcpus)

    @property
    def dmetrics(self) -> DestinationMetrics:
        assert isinstance(self.metrics, DestinationMetrics)
        return self.metrics

    async def _begin(self) -> None:
        if self.listen is not None:
            await self._accept_on(self.listen, self.preempt)
        if self.control is not None:
            self.control.set_run_state("inmigrate")

    async def _accept_on(self, address: tuple[str, int], preempt: bool) -> None:
        # Bound first (a port in use fails before any memory is allocated), listening only once the
        # memory is built: a source that comes sooner is refused and retries, where a connection
        # accepted but not served would leave it waiting for a PONG (a preallocated 8 GiB guest
        # takes seconds to build; built off the event loop, which goes on answering QMP and /metrics)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
        except OSError as exc:
            listener.close()
            raise ServiceError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}") from None
        try:
            owner = await asyncio.to_thread(self.make_owner)
            self.destination = Destination(owner, preempt=preempt, verify=self.verify,
                                           on_status=self._status_from_thread, link_timeout=self.link_timeout,
                                           fail_fast=self.fail_fast, max_packaged=self.max_packaged)
            listener.listen(2)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.listen_address = listener.getsockname()[:2]
        self._set_status(MigrationStatus.SETUP)
        if self.on_listening is not None:
            self.on_listening(self.listen_address)
        dest = self.destination

        def serve() -> MigrationStats:
            try:
                return dest.serve(listener)
            finally:
                listener.close()

        self._start_worker("dest-serve", serve)

    async def migrate_incoming(self, uri: str) -> None:
        address = _tcp_address("migrate-incoming", uri)
        try:
            await self._accept_on(address, self._capability("postcopy-preempt", self.preempt))
        except ServiceError as exc:
            raise QMPError(f"Failed to bind socket: {exc}") from None

    async def pause(self) -> None:
        await self._role_call("migrate-pause", self.destination, "pause")

    async def recover(self, uri: str) -> None:
        address = _tcp_address("migrate-recover", uri)
        if address == self.listen_address and hasattr(self.destination, "recover"):
            return      # the incoming listener is still open there and takes the recovery itself
        await self._role_call("migrate-recover", self.destination, "recover", address)

    def _on_status(self, status: MigrationStatus) -> None:
        if self.control is not None and status is MigrationStatus.POSTCOPY_ACTIVE:
            self.control.set_run_state("running")

    def _partial_result(self) -> Any:
        return self.destination.result if self.destination is not None else None

    def _drain_latencies(self, dest: Destination) -> None:
        dest.poll_latencies()
        all_ns = dest.latencies_ns      # every latency stays there; observe the new ones
        new = all_ns[self._observed:]
        self._observed += len(new)
        hist = self.dmetrics.fault_latency
        for ns in new:
            hist.observe(ns * 1e-9)
        self.latency_histogram.add(new)
        self._recent.extend(new)
        requests, replies = dest.poll_latency_parts()
        for ns in requests:
            self.dmetrics.fault_request_delay.observe(ns * 1e-9)
        for ns in replies:
            self.dmetrics.page_request_latency.observe(ns * 1e-9)

    def _sample(self) -> Sample | None:
        dest = self.destination
        if dest is None:
            return None
        self._drain_latencies(dest)
        snap = dest.snapshot()
        m = self.dmetrics
        _sync_channels(self, m, snap)
        self._sync(m.page_faults, snap.remote_faults)
        self._sync(m.page_requests, snap.requests_sent)
        self._sync(m.page_requests_resent, snap.requests_resent)
        self._sync(m.discard_ranges, snap.discard_ranges)
        for reason, count in dest.session.refused.items():
            self._sync(m.refused_connections[reason], count)
        p50 = statistics.median_low(self._recent) / 1000 if self._recent else None
        return Sample(t=self.elapsed_seconds(), status=snap.status.value, pages=snap.pages_received,
                      pages_total=snap.pages_total, bytes=snap.bytes, faults=snap.remote_faults,
                      latency_p50_us=p50)

    def _snapshot_for_metrics(self) -> MigrationSnapshot:
        dest = self.destination
        if dest is None:
            return MigrationSnapshot(status=self._status, ram_total_bytes=self.spec_bytes())
        snap = dest.snapshot()
        total = (snap.pages_total or self.spec_bytes() // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE
        received = snap.pages_received * TARGET_PAGE_SIZE
        return MigrationSnapshot(
            status=self._status,
            pending_requests=snap.pending_requests,
            ram_total_bytes=total,
            ram_remaining_bytes=max(0, total - received),
            total_seconds=self.elapsed_seconds(),
            paused_seconds=self.paused_seconds(),
            blocktime_seconds=snap.blocktime_ns / 1e9,
            vcpu_blocktime_seconds=tuple(ns / 1e9 for ns in snap.vcpu_blocktime_ns),
        )

    def spec_bytes(self) -> int:
        return sum(b.size for b in self.spec.blocks)

    def migration_info(self) -> MigrationInfo:
        dest = self.destination
        if dest is None:
            return MigrationInfo()
        snap = dest.snapshot()
        normal = snap.main.normal_pages + snap.preempt.normal_pages
        zero = snap.main.zero_pages + snap.preempt.zero_pages
        transferred = snap.bytes
        total = snap.pages_total * TARGET_PAGE_SIZE
        received = snap.pages_received * TARGET_PAGE_SIZE
        seconds = self.elapsed_seconds()
        ram = RamStats(transferred=transferred, total=total, remaining=max(0, total - received), normal=normal,
                       normal_bytes=normal * TARGET_PAGE_SIZE, duplicate=zero,
                       postcopy_requests=snap.requests_sent,
                       mbps=_mbps(transferred, seconds),
                       pages_per_second=int((normal + zero) / seconds) if seconds > 0 else 0,
                       postcopy_bytes=transferred)
        return MigrationInfo(
            total_time_ms=int(seconds * 1000), ram=ram,
            blocktime_ms=snap.blocktime_ns // 1_000_000,
            vcpu_blocktime_ms=tuple(ns // 1_000_000 for ns in snap.vcpu_blocktime_ns),
            extras={"faults": snap.remote_faults, "pages-received": snap.pages_received,
                    "pages-total": snap.pages_total, "error": snap.error,
                    "refused-connections": snap.refused_connections,
                    "last-refusal": dest.session.last_refusal or None},
        )


class SourceService(_RoleService[R]):
    """``postcopy source``: a Source behind QMP and /metrics.

    With ``connect`` it migrates there at once and switches to postcopy at once;
    else it waits for QMP ``migrate tcp:HOST:PORT`` (postcopy-ram must be on) and
    holds the switch until ``migrate-start-postcopy``.
    """

    role_name: ClassVar[Role] = "source"

    def __init__(self, spec: GuestSpec, memory: Any, guest: Guest | None, *, preempt: bool = True,
                 bandwidth_cap: int = 0, verify: bool = False, connect: tuple[str, int] | None = None,
                 connect_timeout: float = 30.0, options: ServiceOptions | None = None,
                 owner: SourceMemory | None = None, precopy: SwitchoverPolicy | None = None,
                 tracking: str = "auto", recover_connect: tuple[str, int] | None = None,
                 prefetch: bool = True, hot_set: HotSet | None = None, record_hot_set: bool = False) -> None:
        """``owner``: what to migrate (e.g. a snapshot); default: the built-in ``guest`` on ``memory``.
        ``recover_connect``: where to reconnect after a pause (default: where it migrates to).
        ``prefetch``: send ahead of the destination's sequential request streams (with preempt).
        ``hot_set``: push an earlier migration's hot set first; ``record_hot_set``: record this one's
        (``source.recorded_hot_set()`` once it finished)."""
        options = options or ServiceOptions()
        if connect is None and options.qmp is None:
            raise ServiceError("the source needs a destination address or a QMP socket to receive migrate")
        super().__init__(spec, options)
        self.memory = memory
        self.guest = guest
        self.owner = owner
        self.preempt = preempt
        self.bandwidth_cap = bandwidth_cap
        self.verify = verify
        self.connect = connect
        self.connect_timeout = connect_timeout
        self.precopy = precopy
        self.tracking = tracking
        self.recover_connect = recover_connect
        self.prefetch = prefetch
        self.hot_set = hot_set
        self.record_hot_set = record_hot_set
        self.source: Source | None = None
        self.switchover: threading.Event | None = None
        self._total_pages = sum(b.used_length for b in memory) // TARGET_PAGE_SIZE
        self.metrics.collector.bind(self._snapshot_for_metrics)

    @property
    def smetrics(self) -> SourceMetrics:
        assert isinstance(self.metrics, SourceMetrics)
        return self.metrics

    async def _begin(self) -> None:
        if self.control is None:
            assert self.connect is not None
            self._migrate_to(self.connect, self.preempt, self.bandwidth_cap, None)

    def _migrate_to(self, address: tuple[str, int], preempt: bool, cap: int,
                    switchover: threading.Event | None) -> None:
        # under QMP a paused source waits for "migrate resume", as QEMU's does
        owner = self.owner or BuiltinGuest(self.spec, self.memory, self.guest)
        self.source = Source(owner, preempt=preempt, bandwidth_cap=cap,
                             verify=self.verify, on_status=self._status_from_thread,
                             auto_recover=self.control is None, precopy=self.precopy, tracking=self.tracking,
                             recover_address=self.recover_connect, prefetch=self.prefetch,
                             hot_set=self.hot_set, record_hot_set=self.record_hot_set)
        self.switchover = switchover
        self._set_status(MigrationStatus.SETUP)
        source = self.source
        timeout = self.connect_timeout
        self._start_worker("source-migrate",
                           lambda: source.migrate(address, connect_timeout=timeout, switchover=switchover))

    def _phase_cap(self) -> int:
        """QEMU's rule: max-bandwidth before postcopy, max-postcopy-bandwidth (0 = none) after."""
        if self.control is None:
            return self.bandwidth_cap
        p = self.control.parameters
        postcopy = self._status not in (MigrationStatus.NONE, MigrationStatus.SETUP, MigrationStatus.ACTIVE)
        return p.max_postcopy_bandwidth if postcopy else p.max_bandwidth

    # -- MigrationActions -----------------------------------------------------------

    async def migrate(self, uri: str, *, resume: bool) -> None:
        address = _tcp_address("migrate", uri)
        if resume:
            await self._role_call("migrate (resume)", self.source, "resume", address)
            return
        assert self.control is not None
        if not self.control.capability("postcopy-ram"):
            raise QMPError("this postcopy service only migrates with postcopy: "
                           "enable the postcopy-ram capability with migrate-set-capabilities first")
        self._migrate_to(address, self.control.capability("postcopy-preempt"), self._phase_cap(),
                         threading.Event())

    async def start_postcopy(self) -> None:
        if self.switchover is not None:
            self.switchover.set()

    async def pause(self) -> None:
        await self._role_call("migrate-pause", self.source, "pause")

    def parameters_changed(self, parameters: MigrationParameters) -> None:
        if self.source is not None and self._status not in (MigrationStatus.COMPLETED, MigrationStatus.FAILED):
            self.source.set_bandwidth_cap(self._phase_cap())

    def _on_status(self, status: MigrationStatus) -> None:
        if status is MigrationStatus.POSTCOPY_ACTIVE and self.source is not None and self.control is not None:
            self.source.set_bandwidth_cap(self._phase_cap())
        if self.control is not None:
            if status is MigrationStatus.POSTCOPY_ACTIVE:
                self.control.set_run_state("finish-migrate")
            elif status is MigrationStatus.COMPLETED:
                self.control.set_run_state("postmigrate")

    def _partial_result(self) -> Any:
        return self.source.result if self.source is not None else None

    # -- figures --------------------------------------------------------------------

    def _sample(self) -> Sample | None:
        src = self.source
        if src is None:
            return None
        snap = src.snapshot()
        m = self.smetrics
        _sync_channels(self, m, snap)
        self._sync(m.page_requests, snap.remote_faults)
        self._sync(m.discard_ranges, snap.discard_ranges)
        self._sync(m.protocol_errors["bad_page_request"], snap.bad_requests)
        pre = snap.precopy
        if pre is not None:
            self._sync(m.precopy_rounds, pre.rounds)
            self._sync(m.precopy_bytes, pre.bytes)
            m.precopy_dirty_pages.set(pre.dirty_pages_last_round)
            m.precopy_dirty_rate.set(pre.dirty_rate_pages_per_s)
        self._sync(m.bulk_pauses, snap.counters.get("bulk_pauses", 0))
        self._sync(m.bulk_pause_seconds, snap.counters.get("bulk_pause_ns", 0) / 1e9)
        self._sync(m.page_requests_preempt, snap.counters.get("requests_preempt", 0))
        pf = snap.prefetch
        if pf is not None:
            self._sync(m.prefetch_pages_sent, pf.pages_sent)
            self._sync(m.prefetch_pages_used, pf.pages_used)
            self._sync(m.prefetch_windows, pf.windows)
            self._sync(m.prefetch_requests["hit"], pf.hits)
            self._sync(m.prefetch_requests["miss"], pf.misses)
            m.prefetch_wasted_pages.set(pf.wasted_estimate)
        hot = snap.hot_set
        if hot is not None:
            m.hot_set_pages.set(hot.pages)
            on_preempt = snap.counters.get("hot_pages_preempt", 0)
            self._sync(m.hot_set_pages_pushed["main"], hot.pushed - on_preempt)
            self._sync(m.hot_set_pages_pushed["preempt"], on_preempt)
            self._sync(m.hot_set_pages_recorded, hot.recorded)
        return Sample(t=self.elapsed_seconds(), status=snap.status.value, pages=snap.pages_sent,
                      pages_total=self._total_pages, bytes=snap.bytes, faults=snap.remote_faults,
                      rounds=pre.rounds if pre is not None else 0)

    def _snapshot_for_metrics(self) -> MigrationSnapshot:
        src = self.source
        total = self._total_pages * TARGET_PAGE_SIZE
        if src is None:
            return MigrationSnapshot(status=self._status, ram_total_bytes=total, ram_remaining_bytes=total)
        snap = src.snapshot()
        downtime_ns = snap.downtime_ns
        return MigrationSnapshot(
            status=self._status,
            ram_total_bytes=total,
            ram_remaining_bytes=max(0, total - snap.pages_sent * TARGET_PAGE_SIZE),
            total_seconds=self.elapsed_seconds(),
            downtime_seconds=downtime_ns / 1e9 if downtime_ns else None,
            paused_seconds=self.paused_seconds(),
        )

    def migration_info(self) -> MigrationInfo:
        src = self.source
        if src is None:
            return MigrationInfo()
        snap = src.snapshot()
        normal = snap.main.normal_pages + snap.preempt.normal_pages
        zero = snap.main.zero_pages + snap.preempt.zero_pages
        transferred = snap.bytes
        total = self._total_pages * TARGET_PAGE_SIZE
        seconds = self.elapsed_seconds()
        downtime_ns = snap.downtime_ns
        ram = RamStats(transferred=transferred, total=total,
                       remaining=max(0, total - (normal + zero) * TARGET_PAGE_SIZE), normal=normal,
                       normal_bytes=normal * TARGET_PAGE_SIZE, duplicate=zero,
                       postcopy_requests=snap.remote_faults,
                       mbps=_mbps(transferred, seconds),
                       pages_per_second=int((normal + zero) / seconds) if seconds > 0 else 0,
                       dirty_sync_count=snap.precopy.rounds if snap.precopy is not None else 0,
                       precopy_bytes=snap.precopy.bytes if snap.precopy is not None else 0,
                       postcopy_bytes=transferred - (snap.precopy.bytes if snap.precopy is not None else 0))
        extras: dict[str, object] = {"dirty-pages": snap.dirty_pages, "error": snap.error}
        if snap.precopy is not None:
            extras["precopy"] = snap.precopy.as_dict()
        return MigrationInfo(total_time_ms=int(seconds * 1000), ram=ram,
                             downtime_ms=downtime_ns // 1_000_000 if downtime_ns else None, extras=extras)



def _sync_channels(service: _RoleService[Any], metrics: DestinationMetrics | SourceMetrics, snap: MigrationStats) -> None:
    for name, ch in (("main", snap.main), ("preempt", snap.preempt)):
        counters = metrics.channel(name)
        service._sync(counters.normal_pages, ch.normal_pages)
        service._sync(counters.zero_pages, ch.zero_pages)
        service._sync(counters.bytes, ch.bytes)
