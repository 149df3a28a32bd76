"""Our destination against a recorded QEMU 7.2 source (no QEMU process): its main stream
replayed byte for byte, with the connections a source that differs would make."""

from __future__ import annotations

import contextlib
import lzma
import socket
from pathlib import Path

import pytest

from postcopy import wire

from .qemu import _postcopy_dest

pytestmark = pytest.mark.root

IMMEDIATE = "64M-postcopy-immediate/capture/conn0.s2d.bin.xz"


def _packaged_offset(data: bytes) -> int:
    """Where the stream's PACKAGED command starts."""
    dec = wire.MainStreamDecoder()
    dec.receive_data(data)
    start = 0
    while not isinstance(event := dec.next_event(), wire.ConnectionClosed | None):
        if isinstance(event, wire.Packaged):
            return start
        start = dec.offset
    raise AssertionError("no PACKAGED in the capture")


def test_a_preempt_channel_opened_right_before_packaged_is_a_mismatch(tmp_path: Path, captures_dir: Path) -> None:
    """QEMU 7.2 with postcopy-preempt connects its preempt channel before PACKAGED and says
    nothing on it. Here its whole stream follows PACKAGED at once, so the migration would end
    long before any silence (link timeout 5 s) spoke: the destination (preempt off) must know
    of that connection at PACKAGED whenever its accept ran, and fail with one sentence."""
    with lzma.open(captures_dir / IMMEDIATE) as f:
        data = f.read()
    at = _packaged_offset(data)
    for attempt in range(3):
        run = tmp_path / str(attempt)
        run.mkdir()
        d, port = _postcopy_dest(run, run / "snapshot", preempt=False, link_timeout=5.0)
        try:
            with socket.create_connection(("127.0.0.1", port)) as main:
                main.sendall(data[:at])
                with socket.create_connection(("127.0.0.1", port)):
                    with contextlib.suppress(OSError):     # the destination may close it midway
                        main.sendall(data[at:])
                    rc = d.wait(30)
        finally:
            d.stop()
        err = d.stderr().strip().splitlines()
        assert rc == 2, (attempt, err[-3:])
        assert err[-1].startswith("postcopy dest: migration failed (preempt_mismatch): "), err
        assert not (run / "snapshot" / "manifest.json").exists()
