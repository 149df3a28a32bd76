"""Our destination against a scripted QEMU 7.2 source (no QEMU process): a recorded main
stream replayed byte for byte, or one built with the codec, with what a real source does
around it (another connection, a trailer after EOF) at the moments that matter."""

from __future__ import annotations

import contextlib
import lzma
import socket
import struct
from pathlib import Path

import pytest

from postcopy import wire

from .qemu import PostcopyProcess, _postcopy_dest

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


def _precopy_stream(size: int) -> tuple[bytes, bytes]:
    """A QEMU 7.2 precopy that converged (no postcopy switch): the stream up to and including
    its EOF, and the VMDESCRIPTION trailer it writes after that (``should_send_vmdesc``)."""
    head = [wire.StreamHeader(), wire.Configuration(machine_type="pc-i440fx-7.2"), wire.OpenReturnPath(),
            wire.Ping(value=1), wire.PostcopyAdvise(pagesize_summary=4096, target_page_size=4096),
            wire.SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4),
            wire.RamSetup(total_bytes=size, blocks=(wire.RamBlockEntry(idstr="pc.ram", used_length=size),)),
            wire.RamEos(), wire.SectionFooter(section_id=2), wire.SectionPart(section_id=2)]
    records = []
    for i, offset in enumerate(range(0, size, 4096)):
        flags = 0x02 if i % 8 == 7 else 0x08          # ZERO or PAGE, CONTINUE after the first
        name = b"\x06pc.ram" if offset == 0 else b""
        body = b"\x00" if flags == 0x02 else bytes((i & 0xFF,)) * 4096
        records.append(struct.pack(">Q", offset | flags | (0x20 if offset else 0)) + name + body)
    eos = struct.pack(">Q", 0x10)
    footer = wire.encode(wire.SectionFooter(section_id=2))
    data = b"".join(wire.encode(e) for e in head) + b"".join(records) + eos + footer
    data += wire.encode(wire.SectionEnd(section_id=2)) + eos + footer
    data += wire.encode(wire.DeviceSection(section_id=3, idstr="timer", instance_id=0, version_id=2,
                                           payload=b"\x01" * 16))
    data += wire.encode(wire.EndOfStream())
    trailer = wire.encode(wire.VmDescription(json=b'{"page_size": 4096, "devices": []}' + b" " * 30000))
    return data, trailer


def _return_path_until_fin(main: socket.socket, rp: wire.ReturnPathDecoder,
                           seen: list[wire.WireEvent] | None = None) -> list[wire.WireEvent]:
    """What the destination says on the return path until it ends its side (FIN), added to
    ``seen``: what came before the socket's timeout stays there when recv() raises it."""
    seen = [] if seen is None else seen
    while chunk := main.recv(4096):
        rp.receive_data(chunk)
        seen += rp.events()
    return seen


def _end_and_wait(main: socket.socket, d: PostcopyProcess) -> int:
    """End our side too; the destination's exit code. A close on unread bytes sends a reset,
    which only the socket's error shows after a FIN: there must be none."""
    main.shutdown(socket.SHUT_WR)
    rc = d.wait(30)
    assert main.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return rc


def test_a_precopy_finish_waits_for_the_sources_last_bytes_before_it_closes(tmp_path: Path) -> None:
    """QEMU ends a converged precopy with EOF and then its VMDESCRIPTION, and reads SHUT
    meanwhile; its migration fails when a write fails. A destination that answered SHUT and
    closed with the trailer unread, or still coming, reset the connection (QEMU 7.2 here: one
    run in ten failed, ``migration_completion_file_err``). Here the trailer comes even after
    the destination has ended its side: it must still be read, and nothing reset."""
    data, trailer = _precopy_stream(2 << 20)
    d, port = _postcopy_dest(tmp_path, tmp_path / "snapshot", preempt=False)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as main:
            main.sendall(data)
            assert wire.Shut(value=0) in _return_path_until_fin(main, wire.ReturnPathDecoder())
            main.sendall(trailer)
            rc = _end_and_wait(main, d)
    finally:
        d.stop()
    assert rc == 0, d.stderr()
    assert (tmp_path / "snapshot" / "manifest.json").exists()


def test_a_precopy_finish_reads_the_vmdescription_before_it_answers_shut(tmp_path: Path) -> None:
    """QEMU 7.2's return-path thread closes the connection it shares with the stream when SHUT
    comes; a SHUT sent while QEMU still writes its VMDESCRIPTION fails the migration there
    (``migration_completion_file_err``: one CI run, 2 of ~180 runs under load here). Like QEMU's
    destination, ours reads the description first: here its second half comes 0.5 s late, and
    SHUT must wait for it."""
    data, trailer = _precopy_stream(2 << 20)
    half = len(trailer) // 2
    d, port = _postcopy_dest(tmp_path, tmp_path / "snapshot", preempt=False)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as main:
            main.sendall(data + trailer[:half])
            rp = wire.ReturnPathDecoder()
            seen: list[wire.WireEvent] = []
            main.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                _return_path_until_fin(main, rp, seen)      # no FIN yet: what came in 0.5 s
            assert wire.Pong(value=1) in seen      # the destination answered while the stream ran ...
            assert wire.Shut(value=0) not in seen  # ... but not SHUT before the whole description
            main.settimeout(20)
            main.sendall(trailer[half:])
            assert wire.Shut(value=0) in _return_path_until_fin(main, rp)
            rc = _end_and_wait(main, d)
    finally:
        d.stop()
    assert rc == 0, d.stderr()
    assert (tmp_path / "snapshot" / "manifest.json").exists()
