"""Faults: exact cuts (RST and EOF, both directions), seeded random cuts, stalls, throttles, blackholes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from postcopy.faultproxy import (
    ConnectionNotFound,
    CutMode,
    Direction,
    FaultProxy,
    PlanError,
    ProxyEvent,
    blackhole,
    cut,
    random_cuts,
    stall,
    throttle,
)

from .conftest import Upstream, read_to_end, until

KiB = 1024
PAYLOAD = random.Random(3).randbytes(2 * 1024 * KiB)


async def send_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write as a migration source would; the cut makes the write fail, which is expected."""
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(data)
        await writer.drain()


@pytest.mark.parametrize(("mode", "end"), [(CutMode.RST, "reset"), (CutMode.EOF, "eof")])
@pytest.mark.parametrize("offset", [1, 65_536, 123_457, 1_000_003])
async def test_cut_upstream_bound_stream_at_exact_offset(
    upstream: Upstream, mode: CutMode, end: str, offset: int
) -> None:
    async with (
        asyncio.timeout(15),
        FaultProxy(upstream.address, [cut(0, at_bytes=offset, mode=mode)]) as proxy,
    ):
        reader, writer = await asyncio.open_connection(*proxy.address)
        await send_quietly(writer, PAYLOAD)
        peer = await upstream.next_peer()
        await peer.ended.wait()
        assert peer.end == end
        assert bytes(peer.received) == PAYLOAD[:offset]
        # The client side is cut too: it reads the matching end.
        assert await read_to_end(reader, bytearray()) == end
        writer.close()
        entry = await proxy.wait_for(ProxyEvent.CUT, 0)
        assert (entry["direction"], entry["bytes"], entry["mode"]) == ("up", offset, mode.value)
        assert proxy.stats().connections[0].state == "cut"
        assert proxy.stats().cuts == 1


@pytest.mark.parametrize(("mode", "end"), [(CutMode.RST, "reset"), (CutMode.EOF, "eof")])
async def test_cut_return_path_at_exact_offset(mode: CutMode, end: str) -> None:
    offset = 777_777
    up = Upstream(send=PAYLOAD)
    await up.start()
    try:
        plan = [cut(0, direction=Direction.DOWN, at_bytes=offset, mode=mode)]
        async with asyncio.timeout(15), FaultProxy(up.address, plan) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            got = bytearray()
            assert await read_to_end(reader, got) == end
            assert bytes(got) == PAYLOAD[:offset]
            peer = await up.next_peer()
            await peer.ended.wait()
            assert peer.end == end
            writer.close()
            entry = await proxy.wait_for(ProxyEvent.CUT, 0)
            assert (entry["direction"], entry["bytes"]) == ("down", offset)
    finally:
        await up.close()


async def test_after_a_cut_the_next_connection_is_forwarded(upstream: Upstream) -> None:
    async with asyncio.timeout(15), FaultProxy(upstream.address, [cut(0, at_bytes=5000)]) as proxy:
        _, w0 = await asyncio.open_connection(*proxy.address)
        await send_quietly(w0, PAYLOAD[:100_000])
        first = await upstream.next_peer()
        await first.ended.wait()
        w0.close()
        # The recovery connection gets everything.
        _, w1 = await asyncio.open_connection(*proxy.address)
        await send_quietly(w1, PAYLOAD)
        w1.write_eof()
        second = await upstream.next_peer()
        await second.ended.wait()
        w1.close()
        assert (len(first.received), first.end) == (5000, "reset")
        assert (bytes(second.received), second.end) == (PAYLOAD, "eof")


async def cut_offsets(
    address: tuple[str, int], seed: int, upstream: Upstream, nconn: int
) -> list[int]:
    plan = [cut(None, random_bytes=(1, 200 * KiB))]
    offsets = []
    async with FaultProxy(address, plan, seed=seed) as proxy:
        for i in range(nconn):
            _, w = await asyncio.open_connection(*proxy.address)
            await send_quietly(w, PAYLOAD[: 300 * KiB])
            peer = await upstream.next_peer()
            await peer.ended.wait()
            w.close()
            entry = await proxy.wait_for(ProxyEvent.CUT, i)
            assert entry["bytes"] == len(peer.received) == entry["trigger_bytes"]
            assert bytes(peer.received) == PAYLOAD[: len(peer.received)]
            offsets.append(len(peer.received))
    return offsets


async def test_random_cuts_are_reproducible_with_a_seed(upstream: Upstream) -> None:
    async with asyncio.timeout(30):
        a = await cut_offsets(upstream.address, 42, upstream, 4)
        b = await cut_offsets(upstream.address, 42, upstream, 4)
        c = await cut_offsets(upstream.address, 43, upstream, 4)
    assert a == b
    assert a != c
    assert all(1 <= x <= 200 * KiB for x in a + c)
    assert len(set(a)) == 4  # each connection draws its own offset


async def test_random_cuts_stop_after_the_total(upstream: Upstream) -> None:
    async with (
        asyncio.timeout(30),
        FaultProxy(upstream.address, random_cuts(3, max_bytes=50 * KiB), seed=5) as proxy,
    ):
        for _ in range(5):
            _, w = await asyncio.open_connection(*proxy.address)
            await send_quietly(w, PAYLOAD[: 100 * KiB])
            with contextlib.suppress(OSError):
                w.write_eof()
            peer = await upstream.next_peer()
            await peer.ended.wait()
            w.close()
        ends = [(p.end, len(p.received)) for p in upstream.peers]
        assert [e for e, _ in ends] == ["reset"] * 3 + ["eof"] * 2
        assert all(n <= 50 * KiB for _, n in ends[:3])
        assert all(n == 100 * KiB for _, n in ends[3:])
        assert proxy.stats().cuts == 3


async def test_cut_after_time(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address, [cut(0, at_seconds=0.3)]) as proxy:
        start = time.monotonic()
        _, w = await asyncio.open_connection(*proxy.address)
        peer = await upstream.next_peer()
        await send_quietly(w, b"hello")
        await peer.ended.wait()
        assert time.monotonic() - start >= 0.3
        assert (bytes(peer.received), peer.end) == (b"hello", "reset")
        entry = await proxy.wait_for(ProxyEvent.CUT, 0)
        opened = await proxy.wait_for(ProxyEvent.OPENED, 0)
        assert entry["time"] - opened["time"] >= 0.3
        w.close()


async def test_cut_now_and_cut_all(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address) as proxy:
        conns = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        peers = [await upstream.next_peer() for _ in range(3)]
        await send_quietly(conns[0][1], b"abc")
        await until(lambda: len(peers[0].received) >= 3)
        assert await proxy.cut_now(0, CutMode.EOF) is True
        assert await proxy.cut_now(0) is False  # already cut
        await peers[0].ended.wait()
        assert (bytes(peers[0].received), peers[0].end) == (b"abc", "eof")
        assert await proxy.cut_all() == [1, 2]
        for p in peers[1:]:
            await p.ended.wait()
            assert p.end == "reset"
        for _, w in conns:
            w.close()
        with pytest.raises(ConnectionNotFound, match="no connection 7: the proxy has accepted 3"):
            await proxy.cut_now(7)


async def test_stall_from_the_plan_delays_delivery(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address, [stall(0, seconds=0.4)]) as proxy:
        start = time.monotonic()
        _, w = await asyncio.open_connection(*proxy.address)
        w.write(b"ping")
        await w.drain()
        peer = await upstream.next_peer()
        await until(lambda: len(peer.received) >= 4)
        assert peer.first_byte_at is not None
        assert peer.first_byte_at - start >= 0.4
        assert bytes(peer.received) == b"ping"
        assert [e["event"] for e in proxy.log if e["direction"] == "up"][:2] == [
            "stalled",
            "resumed",
        ]
        w.close()


async def test_stall_until_release_loses_nothing(echo_upstream: Upstream) -> None:
    async with asyncio.timeout(15), FaultProxy(echo_upstream.address) as proxy:
        reader, w = await asyncio.open_connection(*proxy.address)
        await echo_upstream.next_peer()
        await proxy.wait_for(ProxyEvent.OPENED, 0)
        proxy.stall(0)  # both directions, until released
        echoed = bytearray()
        reading = asyncio.create_task(read_to_end(reader, echoed))
        writing = asyncio.create_task(send_quietly(w, PAYLOAD))
        await asyncio.sleep(0.3)
        assert len(echoed) == 0
        assert len(echo_upstream.peers[0].received) == 0
        proxy.release(0)
        await writing
        w.write_eof()
        assert await reading == "eof"
        assert bytes(echoed) == PAYLOAD
        w.close()


async def test_throttle_bounds_the_rate(upstream: Upstream) -> None:
    rate = 1024 * KiB
    size = 400 * KiB
    plan = [throttle(0, rate=rate, direction=Direction.UP)]
    async with asyncio.timeout(15), FaultProxy(upstream.address, plan) as proxy:
        _, w = await asyncio.open_connection(*proxy.address)
        await proxy.wait_for(ProxyEvent.THROTTLED, 0)
        start = time.monotonic()
        w.write(PAYLOAD[:size])
        await w.drain()
        w.write_eof()
        peer = await upstream.next_peer()
        await peer.ended.wait()
        elapsed = time.monotonic() - start
        assert bytes(peer.received) == PAYLOAD[:size]
        assert elapsed >= size / rate
        w.close()


async def test_runtime_throttle_then_unthrottle(upstream: Upstream) -> None:
    async with asyncio.timeout(15), FaultProxy(upstream.address) as proxy:
        _, w = await asyncio.open_connection(*proxy.address)
        peer = await upstream.next_peer()
        proxy.throttle(0, 200 * KiB, Direction.UP)
        start = time.monotonic()
        await send_quietly(w, PAYLOAD[: 60 * KiB])
        await until(lambda: len(peer.received) >= 60 * KiB)
        assert time.monotonic() - start >= 60 / 200
        proxy.throttle(0, None)
        start = time.monotonic()
        await send_quietly(w, PAYLOAD[: 1024 * KiB])
        await until(lambda: len(peer.received) >= 1084 * KiB)
        assert time.monotonic() - start < 5.0 * 0.8  # far below the 5 s the old rate would need
        w.close()


async def test_blackhole_keeps_the_connection_and_forwards_nothing(upstream: Upstream) -> None:
    async with (
        asyncio.timeout(15),
        FaultProxy(upstream.address, [blackhole(0, direction=Direction.UP)]) as proxy,
    ):
        _, w = await asyncio.open_connection(*proxy.address)
        peer = await upstream.next_peer()
        await proxy.wait_for(ProxyEvent.BLACKHOLED, 0)
        writing = asyncio.create_task(send_quietly(w, PAYLOAD[: 100 * KiB]))
        await asyncio.sleep(0.3)
        assert len(peer.received) == 0
        assert not peer.ended.is_set()
        assert proxy.stats().connections[0].state == "open"
        proxy.release(0)  # the link comes back: held bytes arrive, none lost
        await writing
        w.write_eof()
        await peer.ended.wait()
        assert bytes(peer.received) == PAYLOAD[: 100 * KiB]
        w.close()


async def test_discarding_blackhole_drops_what_it_reads(upstream: Upstream) -> None:
    async with asyncio.timeout(15), FaultProxy(upstream.address) as proxy:
        _, w = await asyncio.open_connection(*proxy.address)
        peer = await upstream.next_peer()
        await send_quietly(w, b"before")
        await until(lambda: len(peer.received) >= 6)
        proxy.blackhole(0, Direction.UP, discard=True)
        await send_quietly(w, PAYLOAD[: 100 * KiB])  # the sender is never held back
        await until(lambda: proxy.stats().connections[0].dropped_up >= 100 * KiB)
        assert bytes(peer.received) == b"before"
        proxy.release(0)
        await send_quietly(w, b"after")
        w.write_eof()
        await peer.ended.wait()
        assert bytes(peer.received) == b"beforeafter"
        stats = proxy.stats().connections[0]
        assert (stats.bytes_up, stats.dropped_up) == (11, 100 * KiB)
        w.close()


async def test_on_event_callback_sees_every_log_entry(upstream: Upstream) -> None:
    seen: list[dict[str, object]] = []
    async with (
        asyncio.timeout(10),
        FaultProxy(upstream.address, [cut(0, at_bytes=10)], on_event=seen.append) as proxy,
    ):
        _, w = await asyncio.open_connection(*proxy.address)
        await send_quietly(w, b"0123456789abcdef")
        await proxy.wait_for(ProxyEvent.CLOSED, 0)
        w.close()
        assert seen == proxy.log
        assert [e["event"] for e in seen] == ["accepted", "opened", "cut", "closed"]


async def test_set_plan_applies_to_new_connections(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address) as proxy:
        _, w0 = await asyncio.open_connection(*proxy.address)
        p0 = await upstream.next_peer()
        proxy.set_plan([cut(None, at_bytes=3)])
        _, w1 = await asyncio.open_connection(*proxy.address)
        p1 = await upstream.next_peer()
        for w in (w0, w1):
            await send_quietly(w, b"abcdef")
            with contextlib.suppress(OSError):
                w.write_eof()
        await p0.ended.wait()
        await p1.ended.wait()
        assert (bytes(p0.received), p0.end) == (b"abcdef", "eof")
        assert (bytes(p1.received), p1.end) == (b"abc", "reset")
        w0.close()
        w1.close()


async def test_runtime_requests_are_validated(upstream: Upstream) -> None:
    async with asyncio.timeout(10), FaultProxy(upstream.address) as proxy:
        with pytest.raises(ConnectionNotFound, match="no connection 0"):
            proxy.stall(0, 1.0)
        _, w = await asyncio.open_connection(*proxy.address)
        await proxy.wait_for(ProxyEvent.OPENED, 0)
        with pytest.raises(PlanError, match="rate must be > 0 bytes per second or None, got -5"):
            proxy.throttle(0, -5)
        with pytest.raises(PlanError, match="stall seconds must be >= 0 or None, got -1"):
            proxy.stall(0, -1)
        w.close()
