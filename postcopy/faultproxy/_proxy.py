"""The asyncio fault-injecting TCP proxy.

Each accepted client connection is numbered in accept order and forwarded to
the upstream address by two pumps (UP: client -> upstream, DOWN: upstream ->
client). Upstream connections are made strictly in the same order, each one
only after the previous one is established (or has failed), because the
destination tells its main channel from its preempt channel by accept order.

Byte triggers are exact: a pump never writes past the next trigger offset, and
before an RST cut it waits (bounded) until the bytes it wrote have left the
kernel's send queue, so the receiver sees exactly the configured bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postcopy.faultproxy._plan import (
    Action,
    CutMode,
    Direction,
    PlanError,
    Rule,
    Trigger,
    validate_plan,
)

if TYPE_CHECKING:
    from postcopy.faultproxy._thread import ProxyThread

__all__ = [
    "ConnectionNotFound",
    "ConnectionStats",
    "FaultProxy",
    "ProxyEvent",
    "ProxyNotRunning",
    "ProxyStats",
]

CHUNK_BYTES = 256 * 1024
READER_LIMIT_BYTES = 1024 * 1024
# A throttled pump writes at most this much rate-time at once, so the rate
# holds over short windows too.
THROTTLE_QUANTUM_SECONDS = 0.02
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent
# An upstream that refuses (not listening yet) is tried again this often, within the connect timeout.
UPSTREAM_RETRY_SECONDS = 0.02


class ConnectionNotFound(LookupError):
    """A runtime fault named a connection index the proxy has not seen."""


class ProxyNotRunning(RuntimeError):
    """The proxy was used before start() or after close()."""


class ProxyEvent(enum.Enum):
    ACCEPTED = "accepted"
    OPENED = "opened"
    CONNECT_FAILED = "connect_failed"
    EOF = "eof"
    RESET = "reset"
    CUT = "cut"
    STALLED = "stalled"
    RESUMED = "resumed"
    THROTTLED = "throttled"
    BLACKHOLED = "blackholed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    conn: int
    state: str
    bytes_up: int
    bytes_down: int
    dropped_up: int
    dropped_down: int
    opened_at: float | None
    closed_at: float | None


@dataclass(frozen=True, slots=True)
class ProxyStats:
    connections: tuple[ConnectionStats, ...]
    bytes_up: int
    bytes_down: int
    cuts: int


class _Cutting(Exception):
    """Raised inside a pump once its connection is being cut: stop quietly."""


@dataclass
class _PlanState:
    rules: tuple[Rule, ...]
    seed: int
    fired: list[int]


@dataclass(eq=False)
class _Conn:
    index: int
    plan: _PlanState
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    state: str = "connecting"  # connecting, open, closed, cut, failed
    upstream_reader: asyncio.StreamReader | None = None
    upstream_writer: asyncio.StreamWriter | None = None
    established: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    opened_at: float | None = None
    closed_at: float | None = None
    counts: dict[Direction, int] = field(
        default_factory=lambda: {Direction.UP: 0, Direction.DOWN: 0}
    )
    dropped: dict[Direction, int] = field(
        default_factory=lambda: {Direction.UP: 0, Direction.DOWN: 0}
    )
    flowing: dict[Direction, asyncio.Event] = field(default_factory=dict)
    discard: dict[Direction, bool] = field(
        default_factory=lambda: {Direction.UP: False, Direction.DOWN: False}
    )
    stall_generation: dict[Direction, int] = field(
        default_factory=lambda: {Direction.UP: 0, Direction.DOWN: 0}
    )
    # Throttle: (rate bytes/s, origin time, bytes forwarded at origin).
    pace: dict[Direction, tuple[float, float, int] | None] = field(
        default_factory=lambda: {Direction.UP: None, Direction.DOWN: None}
    )
    # Armed byte triggers per direction: (offset, rule index, rule), kept sorted.
    byte_triggers: dict[Direction, list[tuple[int, int, Rule]]] = field(
        default_factory=lambda: {Direction.UP: [], Direction.DOWN: []}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    cutting: bool = False
    cut_mode: CutMode | None = None

    def __post_init__(self) -> None:
        for d in (Direction.UP, Direction.DOWN):
            ev = asyncio.Event()
            ev.set()
            self.flowing[d] = ev

    def cut_meanwhile(self) -> bool:
        """``cutting``, read after an await: another task may have started the cut.

        (A method, not the attribute, so that a type checker does not carry a
        check made before the await over it.)
        """
        return self.cutting

    def writer_for(self, d: Direction) -> asyncio.StreamWriter | None:
        return self.upstream_writer if d is Direction.UP else self.client_writer

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.upstream_writer) if w is not None]


def _sock_of(writer: asyncio.StreamWriter) -> Any:
    return writer.transport.get_extra_info("socket")


def _outq(writer: asyncio.StreamWriter, request: int) -> int:
    sock = _sock_of(writer)
    if sock is None or writer.transport.is_closing():
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class FaultProxy:
    """A loopback TCP proxy that cuts, stalls, throttles or blackholes connections.

    ``upstream`` is the (host, port) connections are forwarded to; ``plan`` the
    fault rules applied to connections accepted from now on; ``seed`` makes
    random triggers reproducible (None draws one; it is kept in ``.seed``).
    ``on_event`` is called in the loop with each log entry.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        plan: Iterable[Rule] = (),
        *,
        seed: int | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        connect_timeout_seconds: float = 10.0,
        drain_timeout_seconds: float = 2.0,
        eof_linger_seconds: float = 1.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self._plan = _PlanState(validate_plan(plan), self.seed, [])
        self._plan.fired = [0] * len(self._plan.rules)
        self.connect_timeout_seconds = connect_timeout_seconds
        self.drain_timeout_seconds = drain_timeout_seconds
        self.eof_linger_seconds = eof_linger_seconds
        self._on_event = on_event
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._conns: list[_Conn] = []
        self._serve_tasks: set[asyncio.Task[None]] = set()
        self._log: list[dict[str, Any]] = []
        self._waiters: list[
            tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]
        ] = []
        self._t0 = time.monotonic()
        self._closed = False
        self._cuts = 0

    @staticmethod
    def start_in_thread(
        upstream: tuple[str, int],
        plan: Iterable[Rule] = (),
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        **options: Any,
    ) -> ProxyThread:
        """Start a proxy on its own event loop in a daemon thread (options as for the constructor).

        The returned handle has ``.address``, ``.cut_now()``, ``.stats()``,
        ``.wait_for()``, ``.close()`` and the other runtime calls, all blocking.
        """
        from postcopy.faultproxy._thread import ProxyThread

        return ProxyThread(FaultProxy(upstream, plan, **options), loop_factory).start()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        if self._server is not None or self._closed:
            raise ProxyNotRunning("FaultProxy.start() may be called once")
        self._server = await asyncio.start_server(
            self._on_client, self.listen[0], self.listen[1], limit=READER_LIMIT_BYTES
        )
        sockname = self._server.sockets[0].getsockname()
        self._address = (str(sockname[0]), int(sockname[1]))
        return self._address

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise ProxyNotRunning("FaultProxy has no address before start()")
        return self._address

    async def aclose(self) -> None:
        """Stop listening and close every open connection (plainly, not as a fault)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if not c.finished.is_set():
                for w in c.writers():
                    w.transport.abort()
                for t in list(c.tasks):
                    t.cancel()
        for t in list(self._serve_tasks):
            t.cancel()
        if self._serve_tasks:
            await asyncio.gather(*self._serve_tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plan and runtime faults -------------------------------------------

    def set_plan(self, plan: Iterable[Rule], *, seed: int | None = None) -> None:
        """Replace the plan for connections accepted from now on (open ones keep theirs)."""
        rules = validate_plan(plan)
        self._plan = _PlanState(rules, self.seed if seed is None else seed, [0] * len(rules))

    def _conn(self, conn: int) -> _Conn:
        if not isinstance(conn, int) or not 0 <= conn < len(self._conns):
            raise ConnectionNotFound(
                f"no connection {conn!r}: the proxy has accepted {len(self._conns)} connection(s)"
            )
        return self._conns[conn]

    async def cut_now(self, conn: int, mode: CutMode = CutMode.RST) -> bool:
        """Cut one connection now; False when it had already ended."""
        c = self._conn(conn)
        if c.cutting or c.finished.is_set():
            return False
        await self._cut(c, mode, None, "request")
        return True

    async def cut_all(self, mode: CutMode = CutMode.RST) -> list[int]:
        """Cut every open connection at once (what a link failure does); returns their indexes."""
        live = [c for c in self._conns if not (c.cutting or c.finished.is_set())]
        await asyncio.gather(*(self._cut(c, mode, None, "request") for c in live))
        return [c.index for c in live]

    def stall(
        self, conn: int, seconds: float | None = None, direction: Direction = Direction.BOTH
    ) -> None:
        """Stop forwarding for ``seconds`` (None: until release()); nothing is lost."""
        if seconds is not None and not seconds >= 0:
            raise PlanError(f"stall seconds must be >= 0 or None, got {seconds}")
        self._stall(self._conn(conn), direction, seconds, None)

    def release(self, conn: int, direction: Direction = Direction.BOTH) -> None:
        """End a stall or blackhole (bytes a discarding blackhole dropped stay lost)."""
        c = self._conn(conn)
        for d in direction.members():
            c.stall_generation[d] += 1
            c.discard[d] = False
            if not c.flowing[d].is_set():
                c.flowing[d].set()
                self._record(c, d, ProxyEvent.RESUMED)

    def throttle(
        self, conn: int, rate: float | None, direction: Direction = Direction.BOTH
    ) -> None:
        """Limit forwarding to ``rate`` bytes per second (None: unlimited)."""
        if rate is not None and not rate > 0:
            raise PlanError(f"throttle rate must be > 0 bytes per second or None, got {rate}")
        self._throttle(self._conn(conn), direction, rate, None)

    def blackhole(
        self, conn: int, direction: Direction = Direction.BOTH, *, discard: bool = False
    ) -> None:
        """Keep the connection open but forward nothing (``discard``: read and drop)."""
        self._blackhole(self._conn(conn), direction, discard, None)

    # -- observability -----------------------------------------------------

    @property
    def log(self) -> list[dict[str, Any]]:
        return list(self._log)

    def stats(self) -> ProxyStats:
        conns = tuple(
            ConnectionStats(
                conn=c.index,
                state=c.state,
                bytes_up=c.counts[Direction.UP],
                bytes_down=c.counts[Direction.DOWN],
                dropped_up=c.dropped[Direction.UP],
                dropped_down=c.dropped[Direction.DOWN],
                opened_at=c.opened_at,
                closed_at=c.closed_at,
            )
            for c in self._conns
        )
        return ProxyStats(
            connections=conns,
            bytes_up=sum(s.bytes_up for s in conns),
            bytes_down=sum(s.bytes_down for s in conns),
            cuts=self._cuts,
        )

    async def wait_for(
        self, event: ProxyEvent | str, conn: int | None = None, *, since: int = 0
    ) -> dict[str, Any]:
        """The first log entry (from index ``since``) for ``event`` (and ``conn``); waits for it.

        Callers bound the wait with ``asyncio.timeout()``.
        """
        name = ProxyEvent(event).value

        def match(entry: dict[str, Any]) -> bool:
            return entry["event"] == name and (conn is None or entry["conn"] == conn)

        for entry in self._log[since:]:
            if match(entry):
                return entry
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, fut))
        try:
            return await fut
        finally:
            self._waiters = [(m, f) for m, f in self._waiters if f is not fut]

    def _record(
        self, c: _Conn, d: Direction | None, event: ProxyEvent, **extra: Any
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": time.monotonic() - self._t0,
            "conn": c.index,
            "direction": d.value if d is not None else None,
            "bytes": c.counts[d]
            if d is not None
            else c.counts[Direction.UP] + c.counts[Direction.DOWN],
            "event": event.value,
            "bytes_up": c.counts[Direction.UP],
            "bytes_down": c.counts[Direction.DOWN],
        }
        entry.update(extra)
        self._log.append(entry)
        for match, fut in self._waiters:
            if not fut.done() and match(entry):
                fut.set_result(entry)
        if self._on_event is not None:
            try:
                self._on_event(entry)
            except Exception as exc:  # a faulty observer must not break forwarding
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "FaultProxy on_event callback failed", "exception": exc}
                )
        return entry

    # -- connection handling -----------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called once per accepted socket, in accept order: number it here, synchronously.
        previous = self._conns[-1] if self._conns else None
        c = _Conn(len(self._conns), self._plan, reader, writer)
        self._conns.append(c)
        if self._closed:
            writer.transport.abort()
            return
        # Serve in a task we own (tracked, cancelled and awaited by aclose()): the task
        # start_server made for this callback must not end cancelled, which Python 3.11's
        # streams code reports as an unhandled exception.
        task = asyncio.create_task(
            self._serve_connection(c, previous), name=f"faultproxy-conn-{c.index}"
        )
        self._serve_tasks.add(task)
        task.add_done_callback(self._serve_tasks.discard)

    async def _serve_connection(self, c: _Conn, previous: _Conn | None) -> None:
        try:
            await self._serve(c, previous)
        except asyncio.CancelledError:
            for w in c.writers():
                w.transport.abort()
            raise
        finally:
            if c.state in ("connecting", "open"):
                c.state = "closed"
            if not c.finished.is_set():
                c.closed_at = time.monotonic() - self._t0
                c.finished.set()
                self._record(c, None, ProxyEvent.CLOSED, state=c.state)

    async def _connect_upstream(
        self, refusals: list[ConnectionRefusedError]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the upstream, tried again while it refuses: a destination still starting
        is not listening yet, and the client, already connected to us, would otherwise see a reset
        where connecting to the destination itself would have been refused and tried again."""
        while True:
            try:
                return await asyncio.open_connection(*self.upstream, limit=READER_LIMIT_BYTES)
            except ConnectionRefusedError as exc:
                refusals.append(exc)
                await asyncio.sleep(UPSTREAM_RETRY_SECONDS)

    async def _serve(self, c: _Conn, previous: _Conn | None) -> None:
        self._record(
            c, None, ProxyEvent.ACCEPTED, peer=str(c.client_writer.get_extra_info("peername"))
        )
        _nodelay(c.client_writer)
        if previous is not None:
            # Keep upstream accept order equal to ours (main before preempt).
            await previous.established.wait()
        refusals: list[ConnectionRefusedError] = []
        try:
            async with asyncio.timeout(self.connect_timeout_seconds):
                ur, uw = await self._connect_upstream(refusals)
        except (OSError, TimeoutError) as exc:
            c.state = "failed"
            c.established.set()
            # refused until the timeout: that is what the upstream said, not the timeout
            why = refusals[-1] if isinstance(exc, TimeoutError) and refusals else exc
            self._record(c, None, ProxyEvent.CONNECT_FAILED, error=f"{type(why).__name__}: {why}"
                         + (f" ({len(refusals)} tries)" if refusals else ""))
            c.client_writer.transport.abort()
            return
        c.established.set()
        c.upstream_reader, c.upstream_writer = ur, uw
        _nodelay(uw)
        if c.cutting:  # cut while still connecting: the upstream side gets the same end
            if c.cut_mode is CutMode.EOF:
                uw.write_eof()
            else:
                _abort_with_rst(uw)
        else:
            c.state = "open"
            c.opened_at = time.monotonic() - self._t0
            self._record(c, None, ProxyEvent.OPENED)
            try:
                async with asyncio.TaskGroup() as tg:
                    self._arm(c, tg)
                    if not c.cutting:
                        self._spawn(c, tg, self._pump(c, Direction.UP, c.client_reader, uw))
                        self._spawn(c, tg, self._pump(c, Direction.DOWN, ur, c.client_writer))
            finally:
                c.tasks.clear()
        if c.cut_mode is CutMode.EOF:
            await self._linger(c)
        for w in c.writers():
            w.close()

    def _spawn(self, c: _Conn, tg: asyncio.TaskGroup, coro: Any) -> None:
        task = tg.create_task(coro)
        c.tasks.add(task)
        task.add_done_callback(c.tasks.discard)

    def _arm(self, c: _Conn, tg: asyncio.TaskGroup) -> None:
        for i, rule in enumerate(c.plan.rules):
            if not rule.matches(c.index):
                continue
            trigger = rule.trigger_for(c.plan.seed, i, c.index)
            if trigger.at_bytes is not None:
                if trigger.at_bytes == 0:
                    self._spawn(c, tg, self._fire(c, i, rule, trigger))
                else:
                    c.byte_triggers[rule.direction].append((trigger.at_bytes, i, rule))
                    c.byte_triggers[rule.direction].sort(key=lambda t: t[0])
            elif trigger.at_seconds is not None:
                self._spawn(c, tg, self._fire_later(c, i, rule, trigger))
            else:
                self._spawn(c, tg, self._fire(c, i, rule, trigger))

    async def _fire_later(self, c: _Conn, i: int, rule: Rule, trigger: Trigger) -> None:
        assert trigger.at_seconds is not None
        assert c.opened_at is not None
        await _sleep_until(self._t0 + c.opened_at + trigger.at_seconds)
        await self._fire(c, i, rule, trigger)

    async def _fire(self, c: _Conn, i: int, rule: Rule, trigger: Trigger) -> None:
        if c.cutting or c.finished.is_set():
            return
        if rule.times is not None and c.plan.fired[i] >= rule.times:
            return
        c.plan.fired[i] += 1
        detail = {
            "rule": i,
            "trigger_bytes": trigger.at_bytes,
            "trigger_seconds": trigger.at_seconds,
        }
        if rule.action is Action.CUT:
            await self._cut(c, rule.mode, rule.direction, "plan", **detail)
        elif rule.action is Action.STALL:
            self._stall(c, rule.direction, rule.seconds, detail)
        elif rule.action is Action.THROTTLE:
            self._throttle(c, rule.direction, rule.rate, detail)
        else:
            self._blackhole(c, rule.direction, rule.discard, detail)

    # -- faults --------------------------------------------------------------

    def _stall(
        self, c: _Conn, direction: Direction, seconds: float | None, detail: dict[str, Any] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        for d in direction.members():
            c.stall_generation[d] += 1
            generation = c.stall_generation[d]
            c.flowing[d].clear()
            self._record(c, d, ProxyEvent.STALLED, seconds=seconds, **(detail or {}))
            if seconds is not None:
                deadline = time.monotonic() + seconds
                loop.call_later(seconds, self._unstall, c, d, generation, deadline)

    def _unstall(self, c: _Conn, d: Direction, generation: int, deadline: float) -> None:
        if c.stall_generation[d] != generation:
            return  # released or stalled again since
        left = deadline - time.monotonic()
        if left > 0:  # timer wheels (uvloop: ms) may fire a little early
            asyncio.get_running_loop().call_later(
                left + 0.0005, self._unstall, c, d, generation, deadline
            )
            return
        c.flowing[d].set()
        self._record(c, d, ProxyEvent.RESUMED)

    def _throttle(
        self, c: _Conn, direction: Direction, rate: float | None, detail: dict[str, Any] | None
    ) -> None:
        for d in direction.members():
            c.pace[d] = None if rate is None else (rate, time.monotonic(), c.counts[d])
            self._record(c, d, ProxyEvent.THROTTLED, rate=rate, **(detail or {}))

    def _blackhole(
        self, c: _Conn, direction: Direction, discard: bool, detail: dict[str, Any] | None
    ) -> None:
        for d in direction.members():
            c.stall_generation[d] += 1
            c.discard[d] = discard
            if discard:
                c.flowing[d].set()
            else:
                c.flowing[d].clear()
            self._record(c, d, ProxyEvent.BLACKHOLED, discard=discard, **(detail or {}))

    async def _cut(
        self, c: _Conn, mode: CutMode, d: Direction | None, cause: str, **detail: Any
    ) -> None:
        if c.cutting or c.finished.is_set():
            return
        c.cutting = True
        c.cut_mode = mode
        c.state = "cut"
        self._cuts += 1
        for ev in c.flowing.values():
            ev.set()  # stalled pumps wake up and see c.cutting
        me = asyncio.current_task()
        if mode is CutMode.RST:
            # Let what was written reach the peer first: SO_LINGER 0 drops unsent bytes.
            await self._drain_kernel(c)
            undelivered = {
                w_dir.value: _outq(w, SIOCOUTQNSD) for w_dir, w in self._writers_by_dir(c)
            }
            for w in c.writers():
                _abort_with_rst(w)
        else:
            undelivered = {}
            for w in c.writers():
                if not w.transport.is_closing() and w.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        w.write_eof()
        self._record(
            c, d, ProxyEvent.CUT, mode=mode.value, cause=cause, undelivered=undelivered, **detail
        )
        for t in list(c.tasks):
            if t is not me:
                t.cancel()

    def _writers_by_dir(self, c: _Conn) -> list[tuple[Direction, asyncio.StreamWriter]]:
        out = []
        for d in (Direction.UP, Direction.DOWN):
            w = c.writer_for(d)
            if w is not None:
                out.append((d, w))
        return out

    async def _drain_kernel(self, c: _Conn) -> None:
        deadline = time.monotonic() + self.drain_timeout_seconds
        while time.monotonic() < deadline:
            pending = False
            for w in c.writers():
                if w.transport.is_closing():
                    continue
                if w.transport.get_write_buffer_size() or _outq(w, termios.TIOCOUTQ):
                    pending = True
            if not pending:
                return
            await asyncio.sleep(0.001)  # the kernel's send queue has no event to wait on

    async def _linger(self, c: _Conn) -> None:
        """After an EOF cut: read and drop until each peer closes, so close() sends no RST."""

        async def drain(reader: asyncio.StreamReader | None) -> None:
            if reader is None:
                return
            with contextlib.suppress(OSError):
                while await reader.read(CHUNK_BYTES):
                    pass

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.eof_linger_seconds):
                await asyncio.gather(drain(c.client_reader), drain(c.upstream_reader))

    # -- forwarding ----------------------------------------------------------

    async def _pump(
        self, c: _Conn, d: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                await self._wait_flowing(c, d)
                data = await reader.read(CHUNK_BYTES)
                if c.cutting:
                    return
                if not data:
                    self._record(c, d, ProxyEvent.EOF)
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                while data:
                    await self._wait_flowing(c, d)
                    if c.discard[d]:
                        c.dropped[d] += len(data)
                        break
                    n = len(data)
                    triggers = c.byte_triggers[d]
                    if triggers:
                        n = min(n, triggers[0][0] - c.counts[d])
                    n = await self._pace(c, d, n)
                    if c.cut_meanwhile():
                        return
                    writer.write(data[:n] if n < len(data) else data)
                    c.counts[d] += n
                    data = data[n:]
                    await writer.drain()
                    while triggers and triggers[0][0] <= c.counts[d]:
                        _, i, rule = triggers.pop(0)
                        await self._fire(c, i, rule, rule.trigger_for(c.plan.seed, i, c.index))
                        if c.cut_meanwhile():
                            return
        except _Cutting:
            return
        except (ConnectionError, OSError) as exc:
            if c.cutting:
                return
            # A peer reset or vanished: pass it on as a reset to the other side.
            c.cutting = True
            c.state = "closed"
            self._record(c, d, ProxyEvent.RESET, error=f"{type(exc).__name__}: {exc}")
            for w in c.writers():
                _abort_with_rst(w)
            me = asyncio.current_task()
            for t in list(c.tasks):
                if t is not me:
                    t.cancel()

    async def _wait_flowing(self, c: _Conn, d: Direction) -> None:
        if not c.flowing[d].is_set():
            await c.flowing[d].wait()
        if c.cutting:
            raise _Cutting  # stop before touching sockets the cut is closing

    async def _pace(self, c: _Conn, d: Direction, n: int) -> int:
        pace = c.pace[d]
        if pace is None:
            return n
        rate, origin, base = pace
        n = max(1, min(n, int(rate * THROTTLE_QUANTUM_SECONDS)))
        # Write these n bytes no earlier than the rate allows for all bytes so far.
        due = origin + (c.counts[d] - base + n) / rate
        now = time.monotonic()
        if due < now:  # idle time earns no credit: no burst after a pause
            c.pace[d] = (rate, now, c.counts[d])
            due = now + n / rate
        await _sleep_until(due)
        return n


async def _sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() >= deadline (loop timers, uvloop's in ms, may wake early)."""
    while (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110 - a time, not an event
        await asyncio.sleep(left)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = _sock_of(writer)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = _sock_of(writer)
    if sock is not None and not writer.transport.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
