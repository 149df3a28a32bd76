"""Fixtures for the userfaultfd tests: real mappings, real uffds, C toucher threads.

Teardown order matters: the uffd is closed first (which wakes any thread still
blocked on a fault, so it completes against an ordinary mapping), then the
toucher threads are joined, then the RAM blocks are unmapped.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from postcopy import _datapath as dp
from uffd import Feature, RamBlock, Userfaultfd

from .records import Channel, Feed

SETTLE_SECONDS = 0.05


class Toucher:
    """Runs one uffd.memtouch call on a thread; the GIL is released inside C."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.result = fn(*args)
        except BaseException as e:  # recorded and re-raised by wait()
            self.error = e
        finally:
            self._done.set()

    def is_blocked(self, settle: float = SETTLE_SECONDS) -> bool:
        return not self._done.wait(settle)

    def wait(self, timeout: float = 10.0) -> Any:
        if not self._done.wait(timeout):
            pytest.fail(f"toucher thread still blocked after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def _open_fds() -> dict[str, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used, gone by now
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every userfaultfd, memfd and event fd a test opens is closed by its end."""
    before = _open_fds()
    yield
    leaked = {fd: target for fd, target in _open_fds().items() if before.get(fd) != target}
    assert not leaked, f"file descriptors leaked by the test: {leaked}"


@pytest.fixture
def make_block() -> Iterator[Callable[..., RamBlock]]:
    made: list[RamBlock] = []

    def make(
        idstr: str, used_length: int, page_size: int = 4096, backing: str = "anon"
    ) -> RamBlock:
        b = RamBlock(idstr, used_length, page_size, backing)  # type: ignore[arg-type]
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def touch(make_block: Callable[..., RamBlock]) -> Iterator[Callable[..., Toucher]]:
    started: list[Toucher] = []

    def start(fn: Callable[..., Any], *args: Any) -> Toucher:
        t = Toucher(fn, *args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.thread.join(10)


@pytest.fixture
def make_uffd(touch: Callable[..., Toucher]) -> Iterator[Callable[..., Userfaultfd]]:
    opened: list[Userfaultfd] = []

    def make(features: Feature | None = None, **kw: Any) -> Userfaultfd:
        u = Userfaultfd(features or Feature(0), **kw)
        opened.append(u)
        return u

    yield make
    for u in opened:
        u.close()


@pytest.fixture
def uffd(make_uffd: Callable[..., Userfaultfd]) -> Userfaultfd:
    """User-mode-only, as the kernel selftests do: works without privileges."""
    return make_uffd(Feature.THREAD_ID, user_mode_only=True)


def wait_events(u: Userfaultfd, n: int, timeout: float = 5.0) -> list[Any]:
    """Read events until n arrived (poll, no sleeping on a guess)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"expected {n} userfaultfd events, got {len(got)}: {got}")
        select.select([u.fileno()], [], [], left)
        got.extend(u.read_events())
    return got


# Loopback TCP for the source path tests (real sockets, C threads).
TCP_SMALL_BUF = 64 << 10


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(writer, reader) over loopback; small: buffers that hold far less than the request."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.socket()
    if small:
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_SMALL_BUF)
    cli.connect(srv.getsockname())
    peer, _ = srv.accept()
    srv.close()
    if small:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TCP_SMALL_BUF)
    return cli, peer


def drain(sock: socket.socket, total: list[int], gate: threading.Event | None = None) -> None:
    if gate is not None:
        gate.wait()
    while chunk := sock.recv(1 << 20):
        total[0] += len(chunk)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# The receiver tests' record feeds (tests/uffd/records.py).
@pytest.fixture
def feeds() -> Iterator[Callable[..., Feed]]:
    made: list[Feed] = []

    def make(*args: object, **kw: object) -> Feed:
        f = Feed(*args, **kw)  # type: ignore[arg-type]
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


@pytest.fixture(params=["preempt", "main", "main+placer"])
def chan(request: pytest.FixtureRequest, feeds: Callable[..., Feed]) -> Channel:
    return Channel(request.param, feeds)


class Service:
    """serve_faults(stop, go) on its own thread; its return value once it ends."""

    def __init__(self, path: dp.DestinationPath, stop_fd: int, go_fd: int) -> None:
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(path, stop_fd, go_fd), daemon=True)
        self.thread.start()

    def _run(self, path: dp.DestinationPath, stop_fd: int, go_fd: int) -> None:
        self.rc = path.serve_faults(stop_fd, go_fd)

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def pipes() -> Callable[[], tuple[int, int]]:
    made: list[tuple[int, int]] = []

    def make() -> tuple[int, int]:
        made.append(os.pipe())
        return made[-1]

    yield make
    for r, w in made:
        os.close(r)
        os.close(w)


@contextlib.contextmanager
def serving(path: dp.DestinationPath, pipes: Callable[[], tuple[int, int]]) -> Iterator[tuple[int, socket.socket]]:
    """The fault service of ``path`` on its thread, waiting for LISTEN on a go pipe; yields the
    go pipe's write end and the far end of the return path. Stopped (and checked) on exit."""
    rp_near, rp_far = socket.socketpair()
    rp_far.settimeout(5.0)
    try:
        path.set_return_path(rp_near)
        stop, go = pipes(), pipes()
        s = Service(path, stop[0], go[0])
        yield go[1], rp_far
        os.write(stop[1], b"x")
        assert s.ended(5.0)
        assert s.rc == 0
    finally:
        rp_near.close()
        rp_far.close()
