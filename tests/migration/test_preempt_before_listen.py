"""A source that goes away while the destination's preempt receiver waits for LISTEN (it waits
in C on a pipe, Receiver.run_after): the destination ends at once and releases the thread, no
join timeout. Real sockets; the source is a scripted stream up to READY's PONG, as our source
sends it (SourceSession's own preamble), then both of its connections close."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from postcopy import wire
from postcopy.destination import Destination
from postcopy.owner import BuiltinGuest
from postcopy.session import MigrationStatus, SourceSession
from postcopy.session._source import READY_PING
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root


@pytest.mark.parametrize("early", [False, True], ids=["after-setup", "before-setup"])
def test_a_source_gone_before_listen_releases_the_waiting_preempt_receiver(early: bool) -> None:
    """``early``: the preempt channel is taken (after its silence) before the RAM setup has come,
    so its thread has no receiver yet and waits for one in Python, on the same pipe."""
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=1)
    owner = BuiltinGuest(spec)
    layout = [wire.RamBlockLayout(idstr=b.idstr, used_length=b.used_length) for b in owner.memory]
    preamble = SourceSession(layout, owner.configuration(), preempt=True).preamble()
    dest = Destination(owner, preempt=True, fail_fast=True)
    box: dict[str, object] = {}
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            box["stats"] = dest.serve(listener)
        except Exception as exc:        # a failed migration raises; the test reads the status
            box["error"] = exc

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    main = socket.create_connection(listener.getsockname(), timeout=5)
    preempt = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        if early:
            main.sendall(wire.encode(preamble[0]))      # the stream's header alone
            deadline = time.monotonic() + 5.0
            while not any(c.preempt for c in dest._conns.values()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [c.rx for c in dest._conns.values() if c.preempt] == [None]
            preamble = preamble[1:]
        main.sendall(b"".join(wire.encode(e) for e in [*preamble, wire.Ping(value=READY_PING)]))
        rp = wire.ReturnPathDecoder()
        pongs: list[int] = []
        while READY_PING not in pongs:      # the RAM setup is in and the preempt channel taken
            data = main.recv(4096)
            assert data, "the destination closed the return path before READY's PONG"
            rp.receive_data(data)
            pongs += [e.value for e in rp.events() if isinstance(e, wire.Pong)]
        waiting = [c for c in dest._conns.values() if c.preempt]
        assert len(waiting) == 1
        assert waiting[0].listen is not None     # its receiver waits for LISTEN in C
    finally:
        main.close()
        preempt.close()
    # the source is gone before the switch: the destination starts over (a service waits for the
    # next source) and closes the preempt connection, whose receiver was waiting for LISTEN in C
    threads = [t for t in dest._threads if t.name.startswith("dest-preempt")]
    assert len(threads) == 1
    threads[0].join(5.0)
    try:
        assert not threads[0].is_alive()
        # a malformed stream then ends the destination (fail_fast), with nothing left running
        with socket.create_connection(listener.getsockname(), timeout=5) as stranger:
            stranger.sendall(b"QEVM\x00\x00\x00\x03" + b"\xee" * 32)
            serving.join(15)
        assert not serving.is_alive()
        assert dest.status == MigrationStatus.FAILED.value, box
    finally:
        if not serving.is_alive():
            dest.close()
        listener.close()
