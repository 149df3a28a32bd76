"""A real link failure: source and destination in two network namespaces joined
by a veth pair; the link goes down mid-postcopy and comes back."""

from __future__ import annotations

import time

import pytest
from netns import netns_pair

from postcopy.destination import Destination
from postcopy.guest import Guest, Pattern
from postcopy.owner import BuiltinGuest
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root

LINK = {"link_timeout": 0.5}


def test_link_down_and_up_during_postcopy() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="seq", rate_limit=100)
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=spec.vcpus, pattern=Pattern.SEQ, seed=spec.seed,
                  write_percent=spec.write_percent, rate_limit=spec.rate_limit)
    dest = Destination(BuiltinGuest(spec), preempt=True, verify=True, **LINK)
    src = Source(BuiltinGuest(spec, memory, guest), preempt=True, bandwidth_cap=4 << 20, verify=True, **LINK)
    box: dict[str, object] = {}
    try:
        guest.fill_initial()
        guest.start()
        with netns_pair() as net:
            listener = net.socket("b")
            listener.bind((net.addr_b, 0))
            listener.listen(4)
            port = listener.getsockname()[1]

            def serve() -> None:
                try:
                    box["dest"] = dest.serve(listener)
                except Exception as exc:
                    box["dest_error"] = exc

            def migrate() -> None:
                try:
                    box["source"] = src.migrate((net.addr_b, port))
                except Exception as exc:
                    box["source_error"] = exc

            td = net.start_thread("b", serve)
            ts = net.start_thread("a", migrate)
            deadline = time.monotonic() + 10
            while src.result.status != "postcopy-active" and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
            net.link_down("b")
            while src.result.status == "postcopy-active" and time.monotonic() < deadline + 10:
                time.sleep(0.01)
            paused = (src.result.status, dest.result.status)
            time.sleep(1.0)
            received_while_down = dest.path.received_pages()
            time.sleep(0.5)
            assert dest.path.received_pages() == received_while_down, "pages arrived over a down link"
            net.link_up()
            ts.join(60)
            td.join(60)
            listener.close()
        assert "source_error" not in box, box.get("source_error")
        assert "dest_error" not in box, box.get("dest_error")
        assert paused[0] in ("postcopy-paused", "postcopy-recover")
        assert src.result.status == "completed"
        assert dest.result.status == "completed"
        assert src.result.recoveries >= 1
        assert dest.result.recoveries >= 1
        assert all(dest.path.placed_hashes(i) == src.hashes[b.idstr] for i, b in enumerate(dest.memory))
        assert dest.guest is not None
        dest.guest.stop()
        v = dest.guest.verify()
        assert v.ok, v.summary()
    finally:
        guest.close()
        dest.close()
        memory.close()
