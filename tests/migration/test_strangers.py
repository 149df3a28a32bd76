"""Strangers on the destination's port (issue 14): a real migration, with real
sockets, while another peer connects, sends garbage, stalls or knocks with a
fake recovery. The migration completes verified, and nobody pauses it."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import check, migrate

from postcopy import wire
from postcopy.destination import Destination
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root

HEADER = b"QEVM" + struct.pack(">I", 3)


def _spec() -> GuestSpec:
    return GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="random", rate_limit=2000)


def _listener_address(dst: Destination) -> tuple[str, int]:
    host, port = dst._listeners[0].getsockname()[:2]
    return str(host), int(port)


def _knock(address: tuple[str, int], payload: bytes, *, hold: float = 0.0) -> None:
    """Connect, send ``payload`` (may be empty), keep the connection ``hold`` seconds, close."""
    try:
        with socket.create_connection(address, timeout=2) as s:
            if payload:
                s.sendall(payload)
            time.sleep(hold)
    except OSError:
        pass        # refused or reset by the destination: that is its right


def _recovery_knock(block: str) -> bytes:
    """A recovery that looks right at first: RECV_BITMAP for a real block, then nothing."""
    name = block.encode()
    return bytes([0x08]) + struct.pack(">HH", 0x15, 1 + len(name)) + bytes([len(name)]) + name


def _strangers(src: Source, mix: list[Callable[[], None]]) -> int:
    """Knock with the mix, one every 25 ms, for as long as postcopy runs (at most 400)."""
    i = 0
    while src.result.status == "postcopy-active" and i < 400:
        mix[i % len(mix)]()
        i += 1
        time.sleep(0.025)
    return i


def test_strangers_during_postcopy_pause_nothing() -> None:
    """Cases 1 and 2: bare connects, a header and garbage, one byte then silence, OPEN_RETURN_PATH
    alone, a command that is not a recovery: the whole migration completes verified, no pause."""
    spec = _spec()
    knocked: list[int] = []

    def during(src: Source, dst: Destination) -> None:
        while src.result.status not in ("postcopy-active", "completed", "failed"):
            time.sleep(0.002)
        address = _listener_address(dst)
        mix = [
            lambda: _knock(address, b""),                                   # a port scan
            lambda: _knock(address, HEADER + b"\xff" * 64),                 # a header and garbage
            lambda: _knock(address, b"\x08", hold=0.2),                     # one byte, then silence
            lambda: _knock(address, bytes([0x08]) + struct.pack(">HH", 1, 0)),  # OPEN_RETURN_PATH alone
            lambda: _knock(address, b"GET / HTTP/1.0\r\n\r\n"),             # a health check
        ]
        knocked.append(_strangers(src, mix))

    o = migrate(spec, preempt=True, cap=8 << 20, during=during)
    check(o, spec)
    assert knocked[0] >= 10, knocked
    assert o.source.recoveries == 0, o.source.recovery_errors
    assert o.dest.recoveries == 0
    assert "postcopy-paused" not in o.dest_statuses
    assert o.dest.refused_connections > 0


def test_a_fake_recovery_that_stalls_does_not_pause_a_healthy_link() -> None:
    """A knock that starts like the source's recovery (RECV_BITMAP of a real block) from the
    source's own host does break the link: it is the source's way back. One that stalls
    before it says so, or says something else, never does."""
    spec = _spec()

    def during(src: Source, dst: Destination) -> None:
        while src.result.status not in ("postcopy-active", "completed", "failed"):
            time.sleep(0.002)
        address = _listener_address(dst)
        mix = [
            lambda: _knock(address, _recovery_knock(spec.blocks[0].idstr)[:3], hold=0.1),  # cut mid-command
            lambda: _knock(address, bytes([0x08]) + struct.pack(">HHI", 2, 4, 1), hold=0.05),  # a PING
        ]
        _strangers(src, mix)

    o = migrate(spec, preempt=True, cap=8 << 20, during=during)
    check(o, spec)
    assert o.source.recoveries == 0
    assert o.dest.recoveries == 0


def test_strangers_before_the_real_source_delay_no_one() -> None:
    """Case 3: before the source connects, a header followed by garbage, one byte then
    silence, and a stream that stops in its RAM setup: the destination drops each and
    serves the real source as soon as it comes."""
    spec = _spec()
    holders: list[threading.Thread] = []

    def address(real: tuple[str, int]) -> tuple[str, int]:
        _knock(real, HEADER + b"\x07garbage-after-the-header")
        for payload, hold in ((b"Q", 3.0), (HEADER, 3.0)):       # stall longer than the link timeout
            t = threading.Thread(target=_knock, args=(real, payload), kwargs={"hold": hold}, daemon=True)
            t.start()
            holders.append(t)
        time.sleep(0.1)
        return real

    start = time.monotonic()
    o = migrate(spec, preempt=True, address=address, dest_options={"link_timeout": 1.0})
    check(o, spec)
    assert o.dest.refused_connections >= 1
    assert time.monotonic() - start < 30
    for t in holders:
        t.join(5)


def test_a_stranger_stream_is_replaced_by_the_real_source() -> None:
    """A stranger that sends a valid header and then nothing is the main channel until the
    real source shows a complete RAM setup; then the real source takes over."""
    spec = _spec()

    def address(real: tuple[str, int]) -> tuple[str, int]:
        threading.Thread(target=_knock, args=(real, HEADER), kwargs={"hold": 5.0}, daemon=True).start()
        time.sleep(0.1)
        return real

    o = migrate(spec, preempt=False, address=address, dest_options={"link_timeout": 10.0})
    check(o, spec)
    assert o.dest.restarts >= 1


def test_an_oversized_packaged_is_refused_before_it_is_buffered() -> None:
    """Case 6: a PACKAGED that declares more than QEMU's own limit (16 MiB) is refused at its
    header, before anything is buffered; the destination listens on for the real source."""
    spec = _spec()

    def address(real: tuple[str, int]) -> tuple[str, int]:
        config = wire.encode(wire.Configuration(machine_type="pc-i440fx-7.2"))
        packaged = bytes([0x08]) + struct.pack(">HHI", 6, 4, 255 << 20)
        _knock(real, HEADER + config + packaged + b"\x00" * 65536, hold=0.2)
        return real

    o = migrate(spec, preempt=True, address=address)
    check(o, spec)
    assert o.dest.refused_connections >= 1


def test_fail_fast_ends_as_failed_with_the_error_in_the_report(tmp_path: Path) -> None:
    """Case 4: any failure ends as "failed" with its error in the JSON report and a non-zero
    exit; with --fail-fast a malformed stream before RUN is such a failure, as in QEMU."""
    report = tmp_path / "dest.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "postcopy", "dest", "--listen", "127.0.0.1:0", "--size", "16M",
         "--fail-fast", "--json", str(report), "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        host, port = line.split()[-1].rsplit(":", 1)
        _knock((host, int(port)), HEADER + b"\xee" * 32, hold=0.2)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "migration failed" in err, err
    data = json.loads(report.read_text())
    assert data["status"] == "failed"
    assert data["error_kind"] in ("bad_value", "unknown_section_type", "bad_magic", "malformed"), data
    assert data["error"]
