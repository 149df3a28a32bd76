"""Peers that misbehave: a clear error, no write outside a block, the guest not crashed."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from harness import check, migrate

from postcopy import wire
from postcopy.destination import Destination
from postcopy.guest import Guest, Pattern
from postcopy.owner import BUILTIN_MACHINE_TYPE as MACHINE_TYPE
from postcopy.owner import BuiltinGuest
from postcopy.session import MigrationFailed
from postcopy.session._source import RAM_SECTION_ID
from postcopy.source import Source
from postcopy.spec import DEVICE_IDSTR, DEVICE_VERSION, GuestSpec, encode_device_state
from uffd import PAGE_4K

pytestmark = pytest.mark.root


# -- a destination that sends bad page requests: the source counts and ignores them


def test_bad_page_requests_are_refused_and_the_migration_goes_on() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="seq", rate_limit=200)
    block = spec.blocks[0]
    bad = [
        # REQ_PAGES_ID naming a block the source does not have
        struct.pack(">HHQIB", 3, 13 + 4, 0, 4096, 4) + b"nope",
        # REQ_PAGES_ID inside pc.ram, then REQ_PAGES past its end and one misaligned
        struct.pack(">HHQIB", 3, 13 + len(block.idstr), 0, 4096, len(block.idstr)) + block.idstr.encode(),
        struct.pack(">HHQI", 4, 12, block.size, 4096),
        struct.pack(">HHQI", 4, 12, 4096 + 123, 4096),
        struct.pack(">HHQI", 4, 12, block.size - 4096, 8192),
    ]

    def during(src: Source, dst: Destination) -> None:
        while dst.result.status != "postcopy-active":     # its return path is open
            time.sleep(0.005)
        # in one write (one hold of the return path's lock): a request of the fault service's
        # own between them would be judged by the block the bad ones left named (none after
        # 'nope'), and refused as well
        dst.path.send(b"".join(bad))

    o = migrate(spec, preempt=True, cap=8 << 20, during=during)
    check(o, spec)
    assert o.source.bad_requests == 4    # the valid REQ_PAGES_ID is served, the other four refused


# -- a source that sends bad pages: the destination stops with a clear error


def _stream_until_run(spec: GuestSpec, memory, guest: Guest) -> bytes:  # type: ignore[no-untyped-def]
    guest.fill_initial()
    guest.start()
    time.sleep(0.05)
    guest.stop()
    state = guest.save_state()
    entries = tuple(wire.RamBlockEntry(idstr=b.idstr, used_length=b.size) for b in spec.blocks)
    events: list[wire.WireEvent] = [
        wire.StreamHeader(), wire.Configuration(machine_type=MACHINE_TYPE), wire.OpenReturnPath(),
        wire.Ping(value=1), wire.PostcopyAdvise(pagesize_summary=PAGE_4K, target_page_size=PAGE_4K),
        wire.SectionStart(section_id=RAM_SECTION_ID, idstr="ram", instance_id=0, version_id=4),
        wire.RamSetup(total_bytes=sum(b.size for b in spec.blocks), blocks=entries), wire.RamEos(),
        wire.SectionFooter(section_id=RAM_SECTION_ID),
        wire.Packaged(events=(
            wire.PostcopyListen(),
            wire.DeviceSection(section_id=3, idstr=DEVICE_IDSTR, instance_id=0, version_id=DEVICE_VERSION,
                               payload=encode_device_state(spec, state, time.monotonic_ns())),
            wire.Ping(value=3), wire.PostcopyRun())),
    ]
    return b"".join(wire.encode(e) for e in events)


def _record(offset: int, idstr: str | None, body: bytes, flags: int = 0x08) -> bytes:
    word = struct.pack(">Q", offset | flags | (0 if idstr else 0x20))
    return word + (bytes([len(idstr)]) + idstr.encode() if idstr else b"") + body


BAD_TAILS = {
    "offset_outside_block": lambda spec: _record(spec.blocks[1].size, spec.blocks[1].idstr, b"\x55" * 4096),
    "unknown_block": lambda spec: _record(0, "no.such.block", b"\x55" * 4096),
    "continue_without_block": lambda spec: _record(0, None, b"\x55" * 4096),
}


SPEC = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="random")


def _fake_source(after_run: bytes, *, close_after: bool) -> tuple[Destination, dict[str, object], list[str]]:
    """Run a real Destination against a hand-made source: a valid stream up to
    RUN, wait for PONG 3 (the guest runs there), then ``after_run``. Returns
    the destination (still open: the caller checks and closes it), what its
    serve() raised, and its statuses."""
    spec = SPEC
    src_memory = spec.build_memory()
    src_guest = Guest(src_memory, nvcpus=2, pattern=Pattern.RANDOM, seed=spec.seed, write_percent=50)
    statuses: list[str] = []
    dest = Destination(BuiltinGuest(spec), preempt=False, link_timeout=0.5, recover_timeout=1.0, on_status=statuses.append)
    box: dict[str, object] = {}
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            def serve() -> None:
                try:
                    dest.serve(listener)
                except Exception as exc:
                    box["error"] = exc

            t = threading.Thread(target=serve)
            t.start()
            with socket.create_connection(listener.getsockname()) as s:
                s.sendall(_stream_until_run(spec, src_memory, src_guest))
                got = b""
                while len(got) < 16:              # PONG 1 and PONG 3: the guest runs on the destination
                    got += s.recv(16 - len(got))
                s.sendall(bytes([0x02]) + struct.pack(">I", RAM_SECTION_ID) + after_run)
                if not close_after:
                    t.join(20)
            t.join(20)
        assert not t.is_alive()
    finally:
        src_guest.close()
        src_memory.close()
    return dest, box, statuses


@pytest.mark.parametrize("kind", sorted(BAD_TAILS))
def test_bad_page_from_the_source_is_a_clear_error_and_the_guest_survives(kind: str) -> None:
    # a ram PART whose first record is bad
    dest, box, _ = _fake_source(BAD_TAILS[kind](SPEC), close_after=False)
    try:
        error = box.get("error")
        assert isinstance(error, Exception), "the destination accepted a bad page"
        assert dest.result.status == "failed"
        text = str(error)
        assert "record" in text or "block" in text, text
        # nothing was placed, and the guest is alive: its vCPUs wait for pages, they did not crash
        assert dest.path.received_pages() == 0
        assert dest.guest is not None
        assert dest.guest.running == 2
    finally:
        dest.close()


def test_connection_dropped_mid_record_pauses_instead_of_failing() -> None:
    half = _record(0, SPEC.blocks[0].idstr, b"\x55" * 4096)[:2000]
    dest, box, statuses = _fake_source(half, close_after=True)
    try:
        assert "postcopy-paused" in statuses, box            # paused, waiting for a recovery ...
        error = box.get("error")
        assert isinstance(error, MigrationFailed)
        assert error.kind == "recovery_timeout"              # ... none came
        assert dest.path.received_pages() == 0
        assert dest.guest is not None
        assert dest.guest.running == 2
    finally:
        dest.close()
