"""Forwarding without faults: byte-exact both ways, ordered upstream connects, counters, log."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

from postcopy.faultproxy import FaultProxy, ProxyEvent

from .conftest import Upstream, read_to_end, until

MiB = 1024 * 1024


async def test_large_payloads_both_directions_are_byte_exact() -> None:
    rng = random.Random(1)
    down_payload = rng.randbytes(6 * MiB)
    up_payload = rng.randbytes(8 * MiB + 13)
    up = Upstream(send=down_payload)
    await up.start()
    try:
        async with asyncio.timeout(30), FaultProxy(up.address) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            got_down = bytearray()
            reading = asyncio.create_task(read_to_end(reader, got_down))
            writer.write(up_payload)
            await writer.drain()
            writer.write_eof()
            peer = await up.next_peer()
            await peer.ended.wait()
            assert await reading == "eof"
            writer.close()
            await proxy.wait_for(ProxyEvent.CLOSED, 0)
            assert peer.end == "eof"
            assert bytes(peer.received) == up_payload
            assert bytes(got_down) == down_payload
            stats = proxy.stats()
            assert (stats.bytes_up, stats.bytes_down, stats.cuts) == (
                len(up_payload),
                len(down_payload),
                0,
            )
            [conn] = stats.connections
            assert (conn.conn, conn.state, conn.bytes_up, conn.bytes_down) == (
                0,
                "closed",
                len(up_payload),
                len(down_payload),
            )
            eofs = {e["direction"]: e["bytes"] for e in proxy.log if e["event"] == "eof"}
            assert eofs == {"up": len(up_payload), "down": len(down_payload)}
    finally:
        await up.close()


async def test_many_small_writes_round_trip_exactly(echo_upstream: Upstream) -> None:
    rng = random.Random(2)
    pieces = [rng.randbytes(rng.randint(1, 64)) for _ in range(20_000)]
    sent = b"".join(pieces)
    async with asyncio.timeout(30), FaultProxy(echo_upstream.address) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        echoed = bytearray()
        reading = asyncio.create_task(read_to_end(reader, echoed))
        for i, piece in enumerate(pieces):
            writer.write(piece)
            if i % 97 == 0:
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()
        writer.write_eof()
        assert await reading == "eof"
        writer.close()
        assert bytes(echoed) == sent
        assert bytes(echo_upstream.peers[0].received) == sent
        stats = proxy.stats()
        assert stats.bytes_up == stats.bytes_down == len(sent)


async def test_upstream_connects_in_client_accept_order(upstream: Upstream) -> None:
    async with asyncio.timeout(20), FaultProxy(upstream.address) as proxy:
        for round_ in range(10):
            # Two connections opened back to back, as a source opens main then preempt.
            first = await asyncio.open_connection(*proxy.address)
            second = await asyncio.open_connection(*proxy.address)
            second[1].write(b"second")
            first[1].write(b"first")
            await second[1].drain()
            await first[1].drain()
            peers = [await upstream.next_peer() for _ in range(2)]
            for _, w in (first, second):
                w.write_eof()
            for p in peers:
                await p.ended.wait()
            assert [bytes(p.received) for p in peers] == [b"first", b"second"], round_
            for _, w in (first, second):
                w.close()
        opened = [e["conn"] for e in proxy.log if e["event"] == "opened"]
        assert opened == list(range(20))


async def test_client_reset_is_passed_upstream_as_reset(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address) as proxy:
        _, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"x" * 1000)
        await writer.drain()
        peer = await upstream.next_peer()
        await until(lambda: len(peer.received) >= 1000)
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await peer.ended.wait()
        assert peer.end == "reset"
        entry = await proxy.wait_for("reset", 0)
        assert entry["direction"] == "up"
        assert entry["bytes_up"] == 1000


async def test_refused_upstream_is_logged_and_client_closed() -> None:
    up = Upstream()
    address = await up.start()
    await up.close()  # nothing listens there now
    async with asyncio.timeout(10), FaultProxy(address, connect_timeout_seconds=0.3) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        assert await read_to_end(reader, bytearray()) in ("eof", "reset")
        entry = await proxy.wait_for(ProxyEvent.CONNECT_FAILED, 0)
        assert "ConnectionRefusedError" in entry["error"]
        assert "tries" in entry["error"]
        writer.close()
        assert proxy.stats().connections[0].state == "failed"


async def test_an_upstream_that_starts_listening_late_still_gets_the_connection() -> None:
    # a destination still starting refuses; connecting to it directly, a source would try again
    # (it connected to us, so it cannot): the proxy tries again for it, within its connect timeout
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = probe.getsockname()      # bound, not listening: connections are refused
    async with asyncio.timeout(10), FaultProxy(address, connect_timeout_seconds=5) as proxy:
        _, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"early bytes")
        await writer.drain()
        await asyncio.sleep(0.2)       # several refusals
        probe.listen(1)
        probe.setblocking(False)
        peer, _ = await asyncio.get_running_loop().sock_accept(probe)
        got = b""
        while len(got) < 11:
            got += await asyncio.get_running_loop().sock_recv(peer, 64)
        assert got == b"early bytes"
        writer.close()
        peer.close()
        assert proxy.stats().connections[0].state != "failed"
    probe.close()


async def test_close_with_live_connections_aborts_them_quietly(
    upstream: Upstream, loop_errors_fail_the_test: list[dict[str, object]]
) -> None:
    async with asyncio.timeout(10):
        proxy = FaultProxy(upstream.address)
        await proxy.start()
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"live")
        await writer.drain()
        peer = await upstream.next_peer()
        await until(lambda: len(peer.received) >= 4)
        await proxy.aclose()
        await proxy.aclose()  # idempotent
        assert await read_to_end(reader, bytearray()) in ("eof", "reset")
        await peer.ended.wait()
        writer.close()
        assert [e["event"] for e in proxy.log][-1] == "closed"
        await asyncio.sleep(0.05)
        assert loop_errors_fail_the_test == []
