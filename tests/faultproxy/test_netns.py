"""A real link failure between two network namespaces (veth; ip link set down/up)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from postcopy.faultproxy import FaultProxy, ProxyEvent
from netns import NETNS_RUN_DIR, NetnsError, NetnsPair, netns_pair

pytestmark = pytest.mark.root


def serve_echo(listener: socket.socket) -> None:
    """Echo every connection until the listener is shut down (one thread per connection)."""

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


@contextlib.contextmanager
def echo_server(net: NetnsPair) -> Iterator[tuple[str, int]]:
    """An echo server in namespace b, for the block; its address. At the end its listener is
    shut down (close alone leaves a thread blocked in accept() there) and its thread joined."""
    listener = net.socket("b")
    listener.bind((net.addr_b, 0))
    listener.listen()
    t = threading.Thread(target=serve_echo, args=(listener,), daemon=True)
    t.start()
    try:
        yield listener.getsockname()
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        t.join(5.0)
        listener.close()
        assert not t.is_alive()


def connect_from_a(
    net: NetnsPair, address: tuple[str, int], timeout_seconds: float
) -> socket.socket:
    sock = net.socket("a")
    sock.settimeout(timeout_seconds)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_until_end(sock: socket.socket) -> str:
    """Read until EOF or reset; returns "eof" or "reset"."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    # Send from a helper thread: a large echo fills both ways' buffers otherwise.
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(1 << 16)
        assert chunk, "EOF before the echo came back"
        got += chunk
    sender.join(10)
    return bytes(got)


def test_echo_across_the_link_and_subprocess_in_a_namespace() -> None:
    with netns_pair(subnet=7) as net, echo_server(net) as address:
        with connect_from_a(net, address, 5.0) as sock:
            assert sock.getsockname()[0] == net.addr_a
            payload = os.urandom(3 * 1024 * 1024)
            assert round_trip(sock, payload) == payload
        # A whole process in namespace a reaches b; the host's namespace cannot.
        code = (
            "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5);"
            "s.sendall(b'ping');print(s.recv(4).decode())"
        )
        proc = net.run(
            "a", [sys.executable, "-c", code, address[0], str(address[1])], timeout_seconds=30
        )
        assert proc.stdout.strip() == "ping"


def test_link_down_times_out_and_link_up_recovers() -> None:
    with netns_pair() as net, echo_server(net) as address:
        established = connect_from_a(net, address, 10.0)
        assert round_trip(established, b"before") == b"before"

        net.link_down()
        with pytest.raises(TimeoutError):
            connect_from_a(net, address, 1.0)
        # Sent on the established connection while the link is down: held, not lost.
        established.sendall(b"during the outage")
        established.settimeout(0.5)
        with pytest.raises(TimeoutError):
            established.recv(100)

        net.link_up()
        established.settimeout(15.0)  # TCP retransmission backoff decides when it goes out
        got = b""
        while len(got) < len(b"during the outage"):
            got += established.recv(100)
        assert got == b"during the outage"
        with connect_from_a(net, address, 5.0) as fresh:
            assert round_trip(fresh, b"after") == b"after"
        established.close()


def test_proxy_in_a_namespace_forwards_across_the_link() -> None:
    # The fault proxy on the source host (namespace a) in front of a destination in namespace b.
    with netns_pair(subnet=9) as net, echo_server(net) as address:
        proxy = net.call("a", FaultProxy.start_in_thread, address)
        try:
            with connect_from_a(net, proxy.address, 5.0) as sock:
                assert round_trip(sock, b"x" * 100_000) == b"x" * 100_000
                proxy.cut_now(0)
                sock.settimeout(5.0)
                assert read_until_end(sock) == "reset"
            assert proxy.wait_for(ProxyEvent.CUT, 0)["bytes_up"] == 100_000
        finally:
            proxy.close()


def test_namespaces_are_removed_even_when_the_test_fails() -> None:
    names: list[str] = []
    sleepers = []
    try:
        with netns_pair() as net:
            names = [net.ns_a, net.ns_b]
            assert all(os.path.exists(os.path.join(NETNS_RUN_DIR, n)) for n in names)
            sleepers.append(net.popen("a", ["sleep", "60"]))
            raise RuntimeError("boom")
    except RuntimeError as exc:
        assert str(exc) == "boom"  # noqa: PT017 - the body's own error must come through unchanged
    assert sleepers[0].poll() is not None
    assert not any(os.path.exists(os.path.join(NETNS_RUN_DIR, n)) for n in names)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(NetnsError, match=r"subnet must be 0\.\.255"), netns_pair(subnet=300):
        pass
    with netns_pair() as net:
        with pytest.raises(NetnsError, match="unknown link end 'c'"):
            net.link_down("c")
        with pytest.raises(NetnsError, match="unknown namespace 'x'"):
            net.socket("x")
