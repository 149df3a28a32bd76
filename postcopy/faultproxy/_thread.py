"""Run a FaultProxy on its own event loop in a background thread.

The migration roles are blocking code in threads; this handle lets them (and
tests) drive the proxy with plain calls. Every call is forwarded to the
proxy's loop and waits for it, so it sees a consistent state.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from postcopy.faultproxy._plan import CutMode, Direction, Rule
from postcopy.faultproxy._proxy import FaultProxy, ProxyEvent, ProxyNotRunning, ProxyStats

__all__ = ["ProxyThread", "default_loop_factory"]

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 30.0


def default_loop_factory() -> asyncio.AbstractEventLoop:
    """uvloop when installed (as in production), else the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProxyThread:
    """Handle of a FaultProxy running in a daemon thread; use as a context manager."""

    def __init__(
        self, proxy: FaultProxy, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    ) -> None:
        self.proxy = proxy
        self._loop_factory = loop_factory or default_loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="faultproxy", daemon=True)

    def start(self, timeout_seconds: float = CALL_TIMEOUT_SECONDS) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(timeout_seconds):
            raise ProxyNotRunning(f"fault proxy thread did not start within {timeout_seconds} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.proxy.start()
        except BaseException as exc:  # handed to start() in the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.proxy.aclose()

    def _run(
        self, coro: Coroutine[Any, Any, T], timeout_seconds: float = CALL_TIMEOUT_SECONDS
    ) -> T:
        if self._loop is None or not self._thread.is_alive():
            coro.close()
            raise ProxyNotRunning("the fault proxy thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_seconds)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return fn(*args, **kwargs)

        return self._run(call())

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.address

    @property
    def seed(self) -> int:
        return self.proxy.seed

    def cut_now(self, conn: int, mode: CutMode = CutMode.RST) -> bool:
        return self._run(self.proxy.cut_now(conn, mode))

    def cut_all(self, mode: CutMode = CutMode.RST) -> list[int]:
        return self._run(self.proxy.cut_all(mode))

    def stall(
        self, conn: int, seconds: float | None = None, direction: Direction = Direction.BOTH
    ) -> None:
        self._call(self.proxy.stall, conn, seconds, direction)

    def release(self, conn: int, direction: Direction = Direction.BOTH) -> None:
        self._call(self.proxy.release, conn, direction)

    def throttle(
        self, conn: int, rate: float | None, direction: Direction = Direction.BOTH
    ) -> None:
        self._call(self.proxy.throttle, conn, rate, direction)

    def blackhole(
        self, conn: int, direction: Direction = Direction.BOTH, *, discard: bool = False
    ) -> None:
        self._call(self.proxy.blackhole, conn, direction, discard=discard)

    def set_plan(self, plan: Iterable[Rule], *, seed: int | None = None) -> None:
        rules = list(plan)
        self._call(self.proxy.set_plan, rules, seed=seed)

    def stats(self) -> ProxyStats:
        return self._call(self.proxy.stats)

    def log(self) -> list[dict[str, Any]]:
        return self._call(lambda: self.proxy.log)

    def wait_for(
        self,
        event: ProxyEvent | str,
        conn: int | None = None,
        *,
        timeout_seconds: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """Block until the event is in the log; TimeoutError after ``timeout_seconds``."""

        async def wait() -> dict[str, Any]:
            async with asyncio.timeout(timeout_seconds):
                return await self.proxy.wait_for(event, conn, since=since)

        return self._run(wait(), timeout_seconds + CALL_TIMEOUT_SECONDS)

    def close(self, timeout_seconds: float = CALL_TIMEOUT_SECONDS) -> None:
        """Close every connection, stop the loop and join the thread (idempotent)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                raise ProxyNotRunning(f"fault proxy thread did not stop within {timeout_seconds} s")

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
