"""A link that breaks after the source stopped its guest but before the
destination started it: no guest runs anywhere, so the destination drops what
it has and the source sends the whole stream again (after its recovery
attempt is answered with SHUT 2, "nothing to recover")."""

from __future__ import annotations

import pytest
from harness import check, migrate

from postcopy.destination import Destination
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root


def test_cut_between_listen_and_run_starts_over() -> None:
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="random", rate_limit=2000)

    def during(src: Source, dst: Destination) -> None:
        # hold the destination between LISTEN and RUN, then break the link there
        original = dst._run_guest
        gate: list[int] = []

        def held_run_guest() -> None:
            if not gate:
                gate.append(1)
                src._break_link()
                raise ConnectionError(104, "link broken before RUN (test)")
            original()

        dst._run_guest = held_run_guest  # type: ignore[method-assign]

    o = migrate(spec, preempt=True, during=during, warmup=0.3,
                source_options={"link_timeout": 1.0}, dest_options={"link_timeout": 1.0})
    check(o, spec)
    assert o.source.restarts == 1
    assert o.dest.restarts == 1
    assert o.dest.recoveries == 0         # the destination started over; it never had to pause
