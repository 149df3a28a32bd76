"""Fixtures: a real recording TCP server on 127.0.0.1 as the proxy's upstream.

Every async test here runs under both the stdlib loop and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@dataclass(eq=False)
class Peer:
    """One connection the upstream accepted: what it received and how its input ended."""

    index: int
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    end: str | None = None  # "eof" or "reset"
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    first_byte_at: float | None = None


async def read_to_end(reader: asyncio.StreamReader, sink: bytearray) -> str:
    """Read until EOF or reset into ``sink``; returns "eof" or "reset"."""
    try:
        while data := await reader.read(1 << 18):
            sink.extend(data)
    except ConnectionResetError:
        return "reset"
    return "eof"


class Upstream:
    """A real TCP server that records each connection; optionally echoes or sends a payload."""

    def __init__(self, *, echo: bool = False, send: bytes = b"") -> None:
        self.echo = echo
        self.send = send
        self.peers: list[Peer] = []
        self.accepted: asyncio.Queue[Peer] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        name = self.server.sockets[0].getsockname()
        return (name[0], name[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(len(self.peers), writer)
        self.peers.append(peer)
        self.accepted.put_nowait(peer)
        sender = None
        if self.send:
            sender = asyncio.create_task(self._send(writer))
            self._tasks.add(sender)
        try:
            while data := await reader.read(1 << 18):
                peer.first_byte_at = peer.first_byte_at or time.monotonic()
                peer.received.extend(data)
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            peer.end = "eof"
        except ConnectionResetError:
            peer.end = "reset"
        peer.ended.set()
        if sender is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await sender
        if peer.end == "eof":
            if self.echo and writer.can_write_eof():
                writer.write_eof()
            writer.close()
        else:
            writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        writer.write(self.send)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def next_peer(self) -> Peer:
        async with asyncio.timeout(5):
            return await self.accepted.get()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for p in self.peers:
            p.writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture(autouse=True)
async def loop_errors_fail_the_test() -> AsyncIterator[list[dict[str, Any]]]:
    """Anything the loop reports as unhandled (a callback or task error) fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    await asyncio.sleep(0)  # let callbacks scheduled by the teardown run
    loop.set_exception_handler(None)
    assert errors == []


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition the test cannot await (byte counts); the test's timeout bounds it."""
    while not predicate():  # noqa: ASYNC110 - nothing to await: counters are plain ints
        await asyncio.sleep(0.001)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def echo_upstream() -> AsyncIterator[Upstream]:
    up = Upstream(echo=True)
    await up.start()
    yield up
    await up.close()
