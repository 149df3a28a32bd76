"""The threaded handle, driven from blocking code as the migration roles are."""

from __future__ import annotations

import contextlib
import random
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from postcopy.faultproxy import (
    FaultProxy,
    ProxyEvent,
    ProxyNotRunning,
    ProxyThread,
    cut,
    random_cuts,
)

PAYLOAD = random.Random(9).randbytes(1024 * 1024)


class Recorder(socketserver.BaseRequestHandler):
    """Blocking upstream: records each connection's bytes and how it ended."""

    server: RecordingServer

    def handle(self) -> None:
        buf = bytearray()
        end = "eof"
        try:
            while data := self.request.recv(1 << 16):
                buf.extend(data)
        except ConnectionResetError:
            end = "reset"
        with self.server.lock:
            self.server.records.append((self.server.order.pop(self.request), bytes(buf), end))
            self.server.changed.notify_all()


class RecordingServer(socketserver.ThreadingTCPServer):
    """Its records come in the order of the connections (each has a thread: they may end in
    another order)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Recorder)
        self.records: list[tuple[int, bytes, str]] = []
        self.order: dict[object, int] = {}
        self.accepted = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:     # in the accepting thread: accept order
            self.order[request] = self.accepted
            self.accepted += 1
        super().process_request(request, client_address)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return (str(host), int(port))

    def wait_records(self, n: int, timeout_seconds: float = 10.0) -> list[tuple[bytes, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.records) >= n, timeout_seconds), (
                self.records
            )
            return [(data, end) for _, data, end in sorted(self.records, key=lambda r: r[0])]


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def read_until_end(sock: socket.socket) -> str:
    """Read until EOF or reset; returns "eof" or "reset"."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def send_all(address: tuple[str, int], data: bytes) -> bool:
    """Blocking send then half-close; False when the link was cut under us."""
    with socket.create_connection(address, timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):
                pass
        except (ConnectionError, OSError):
            return False
    return True


def test_cut_now_from_blocking_code(recording_server: RecordingServer) -> None:
    with FaultProxy.start_in_thread(recording_server.address) as proxy:
        assert isinstance(proxy, ProxyThread)
        with socket.create_connection(proxy.address, timeout=10) as s:
            s.sendall(b"x" * 5000)
            proxy.wait_for(ProxyEvent.OPENED, 0)
            while proxy.stats().bytes_up < 5000:
                pass
            assert proxy.cut_now(0) is True
            assert read_until_end(s) == "reset"
        [(data, end)] = recording_server.wait_records(1)
        assert (len(data), end) == (5000, "reset")
        assert proxy.stats().cuts == 1
        assert proxy.wait_for("cut", 0)["cause"] == "request"


def test_reconnecting_sender_survives_a_plan_of_cuts(recording_server: RecordingServer) -> None:
    # A stand-in for recovery: the sender reconnects after each cut until one transfer completes.
    with FaultProxy.start_in_thread(
        recording_server.address, random_cuts(3, max_bytes=300_000), seed=11
    ) as proxy:
        attempts = 0
        while not send_all(proxy.address, PAYLOAD):
            attempts += 1
            assert attempts <= 3
        records = recording_server.wait_records(4)
        assert attempts == 3
        assert [end for _, end in records] == ["reset"] * 3 + ["eof"]
        assert records[3][0] == PAYLOAD
        cuts = [e for e in proxy.log() if e["event"] == "cut"]
        assert [e["bytes"] for e in cuts] == [len(data) for data, _ in records[:3]]
        assert proxy.seed == 11


def test_runtime_calls_and_set_plan(recording_server: RecordingServer) -> None:
    with FaultProxy.start_in_thread(recording_server.address) as proxy:
        proxy.set_plan([cut(None, at_bytes=100)])
        assert not send_all(proxy.address, PAYLOAD)
        proxy.set_plan([])
        assert send_all(proxy.address, PAYLOAD)
        records = recording_server.wait_records(2)
        assert [(len(d), e) for d, e in records] == [(100, "reset"), (len(PAYLOAD), "eof")]
        stats = proxy.stats()
        assert [c.state for c in stats.connections] == ["cut", "closed"]
        with pytest.raises(TimeoutError):
            proxy.wait_for(ProxyEvent.CUT, 1, timeout_seconds=0.1)


def test_close_is_idempotent_and_later_calls_fail(recording_server: RecordingServer) -> None:
    proxy = FaultProxy.start_in_thread(recording_server.address)
    address = proxy.address
    proxy.close()
    proxy.close()
    with pytest.raises(ProxyNotRunning, match="not running"):
        proxy.stats()
    with (
        pytest.raises(ConnectionRefusedError),
        contextlib.closing(socket.create_connection(address, timeout=2)),
    ):
        pass


def test_start_failure_is_raised_in_the_caller(recording_server: RecordingServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            FaultProxy.start_in_thread(recording_server.address, listen=taken.getsockname())
