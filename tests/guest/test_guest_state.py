"""Saved guest state: format, round trip, and clear errors for bad bytes."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from postcopy.guest import Guest, GuestBusyError, GuestStateError, Pattern

KiB = 1024
HEADER = struct.Struct(
    "<8sIIIIII Q"
)  # magic, version, length, pattern, nvcpus, nregions, write_percent, seed


@pytest.fixture
def saved(memory: Any) -> tuple[list[tuple[int, int, int]], bytes]:
    mems = [memory(64 * KiB), memory(128 * KiB)]
    regions = [m.region() for m in mems]
    with Guest(regions, nvcpus=2, pattern=Pattern.RANDOM, seed=11, write_percent=30) as g:
        g.fill_initial()
        g.run(1_234)
        return regions, g.save_state()


def guest_for(regions: list[tuple[int, int, int]], **overrides: Any) -> Guest:
    config = {"nvcpus": 2, "pattern": Pattern.RANDOM, "seed": 11, "write_percent": 30} | overrides
    return Guest(regions, **config)


def test_state_layout_is_versioned_little_endian(saved: Any) -> None:
    _, state = saved
    magic, version, length, pattern, nvcpus, nregions, write_percent, seed = HEADER.unpack_from(
        state
    )
    assert (magic, version, length) == (b"PCGUEST\0", 1, len(state))
    assert (pattern, nvcpus, nregions, write_percent, seed) == (Pattern.RANDOM, 2, 2, 30, 11)
    assert struct.unpack_from("<2Q", state, 40) == (64 * KiB, 128 * KiB)
    steps, reads, writes = struct.unpack_from("<3Q", state, 56)
    assert steps == 1_234
    assert reads + writes == steps
    assert len(state) == 40 + 2 * 8 + 2 * 48 + 8


def test_round_trip_restores_counters(saved: Any) -> None:
    regions, state = saved
    with guest_for(regions) as g:
        assert g.stats().steps == (0, 0)
        g.load_state(state)
        assert g.stats().steps == (1_234, 1_234)
        assert g.save_state() == state
        g.load_state(bytearray(state))  # any bytes-like object
        g.load_state(memoryview(state))


def expect_error(
    regions: list[tuple[int, int, int]], data: bytes, match: str, **overrides: Any
) -> None:
    with guest_for(regions, **overrides) as g:
        before = g.save_state()
        with pytest.raises(GuestStateError, match=match):
            g.load_state(data)
        assert g.save_state() == before  # a rejected state changes nothing


def test_truncated_state(saved: Any) -> None:
    regions, state = saved
    expect_error(regions, state[:-1], r"declares 160 bytes but 159 were given \(truncated\)")
    expect_error(regions, state[:10], "10 bytes, shorter than its 40-byte header")
    expect_error(regions, b"", "0 bytes")
    expect_error(regions, state + b"\0", r"161 were given \(trailing bytes\)")


def test_wrong_magic(saved: Any) -> None:
    regions, state = saved
    expect_error(regions, b"QEVM" + state[4:], 'bad magic 5145564d.*expected "PCGUEST')


def test_wrong_version(saved: Any) -> None:
    regions, state = saved
    bad = state[:8] + struct.pack("<I", 2) + state[12:]
    expect_error(regions, bad, "state version 2 is not supported .*version 1")


def test_wrong_nvcpus(memory: Any, saved: Any) -> None:
    regions, state = saved
    expect_error(regions, state, "state has nvcpus=2 but this guest has nvcpus=4", nvcpus=4)
    # a state that claims another nvcpus (size adjusted) is also refused by name
    bad = bytearray(state)
    struct.pack_into("<I", bad, 20, 3)
    expect_error(regions, bytes(bad), "nvcpus=3 but this guest has nvcpus=2")


def test_wrong_configuration(memory: Any, saved: Any) -> None:
    regions, state = saved
    expect_error(regions, state, "pattern=1 but this guest has pattern=2", pattern=Pattern.HOT)
    expect_error(regions, state, "seed=0xb but this guest has seed=0xc", seed=12)
    expect_error(
        regions, state, "write_percent=30 but this guest has write_percent=31", write_percent=31
    )
    other = memory(256 * KiB).region()
    expect_error(
        [regions[0], other], state, "region 1 has length=131072 but this guest's has length=262144"
    )
    expect_error(regions[:1], state, "state has 2 regions but this guest has 1")


def test_corrupted_body_is_caught_by_checksum(saved: Any) -> None:
    regions, state = saved
    bad = bytearray(state)
    bad[60] ^= 0x01  # inside vCPU 0's step counter
    with pytest.raises(GuestStateError, match="checksum") as info, guest_for(regions) as g:
        g.load_state(bytes(bad))
    assert isinstance(info.value, ValueError)
    assert info.value.errno > 0


def test_inconsistent_counters_are_refused(saved: Any) -> None:
    """A well-formed state whose per-vCPU values cannot come from a real run."""
    regions, state = saved

    def reseal(mutate: Any) -> bytes:
        body = bytearray(state[:-8])
        mutate(body)
        h = 0xCBF29CE484222325
        for b in body:
            h = ((h ^ b) * 0x100000001B3) % 2**64
        return bytes(body) + struct.pack("<Q", h)

    def one_more_step(body: bytearray) -> None:
        steps, reads, writes = struct.unpack_from("<3Q", body, 56)
        struct.pack_into("<3Q", body, 56, steps + 1, reads, writes + 1)

    expect_error(
        regions, reseal(lambda b: struct.pack_into("<Q", b, 56, 1_235)), "reads=.* != steps=1235"
    )
    # counters agree with each other but the PRNG is where 1234 steps left it
    expect_error(regions, reseal(one_more_step), "vCPU 0: PRNG state .* after 1235 steps")


def test_load_while_running_is_refused(memory: Any, saved: Any) -> None:
    regions, state = saved
    with guest_for(regions) as g:
        g.start()
        try:
            with pytest.raises(GuestBusyError, match="load guest state"):
                g.load_state(state)
        finally:
            g.stop()
