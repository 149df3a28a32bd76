"""A link that breaks after the source stopped its guest but before the
destination started it: no guest runs anywhere, so the destination drops what
it has and the source sends the whole stream again (after its recovery
attempt is answered with SHUT 2, "nothing to recover")."""

from __future__ import annotations

import pytest
from harness import check, migrate

from postcopy import wire
from postcopy.destination import Destination
from postcopy.session import ConnectionClosed, Input, StreamItem
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root


def test_cut_between_listen_and_run_starts_over() -> None:
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="random", rate_limit=2000)

    def during(src: Source, dst: Destination) -> None:
        # Let LISTEN through (memory registered, faults served), then cut the link
        # before RUN: the destination's main channel ends where PACKAGED's RUN would be.
        original = dst._feed
        gate: list[int] = []

        def feed(event: Input | None, **kw: bool) -> None:
            if not gate and isinstance(event, StreamItem) and isinstance(event.event, wire.Packaged):
                gate.append(1)
                original(StreamItem(event.conn, wire.PostcopyListen()))
                src.break_link()
                original(ConnectionClosed(event.conn, "link broken before RUN (test)"))
                return
            original(event, **kw)

        dst._feed = feed  # type: ignore[method-assign]

    o = migrate(spec, preempt=True, during=during, warmup=0.3,
                source_options={"link_timeout": 1.0}, dest_options={"link_timeout": 1.0})
    check(o, spec)
    assert o.source.restarts == 1
    assert o.dest.restarts == 1
    assert o.dest.recoveries == 0         # the destination started over; it never had to pause
