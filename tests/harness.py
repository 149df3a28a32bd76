"""A whole migration in this process: Source and Destination over real loopback
TCP and real userfaultfd, the guest's vCPUs running as C threads on both sides."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from postcopy.destination import Destination
from postcopy.guest import Guest, Pattern
from postcopy.owner import BuiltinGuest
from postcopy.session import MigrationStats
from postcopy.source import Source
from postcopy.spec import GuestSpec

__all__ = ["Outcome", "check", "migrate"]


@dataclass
class Outcome:
    source: MigrationStats
    dest: MigrationStats
    hashes_match: bool
    guest_ok: bool
    guest_summary: str
    source_statuses: list[str] = field(default_factory=list)
    dest_statuses: list[str] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    """The destination's fault -> placed latencies."""
    dest_minor: tuple[bool, ...] = ()
    """Per block: the destination wrote its pages beside the guest and mapped them (UFFDIO_CONTINUE)."""


def migrate(spec: GuestSpec, *, preempt: bool, cap: int = 0, warmup: float = 0.2,
            during: Callable[[Source, Destination], None] | None = None,
            source_options: dict[str, object] | None = None,
            dest_options: dict[str, object] | None = None,
            address: Callable[[tuple[str, int]], tuple[str, int]] | None = None,
            prealloc: bool = True) -> Outcome:
    """Migrate ``spec``'s guest; ``during(source, dest)`` runs in a thread meanwhile;
    ``address`` may put something (a proxy) between the source and the listener;
    ``prealloc``: the destination's (BuiltinGuest)."""
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=spec.vcpus, pattern=Pattern[spec.pattern.upper()], seed=spec.seed,
                  write_percent=spec.write_percent, rate_limit=spec.rate_limit)
    src_statuses: list[str] = []
    dst_statuses: list[str] = []
    dest = Destination(BuiltinGuest(spec, prealloc=prealloc), preempt=preempt, verify=True, on_status=dst_statuses.append, **(dest_options or {}))
    try:
        guest.fill_initial()
        guest.start()
        time.sleep(warmup)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            box: dict[str, object] = {}

            def serve() -> None:
                try:
                    box["result"] = dest.serve(listener)
                except Exception as exc:
                    box["error"] = exc

            t = threading.Thread(target=serve, name="test-dest")
            t.start()
            src = Source(BuiltinGuest(spec, memory, guest), preempt=preempt, bandwidth_cap=cap, verify=True,
                         on_status=src_statuses.append, **(source_options or {}))
            helper = None
            if during is not None:
                helper = threading.Thread(target=during, args=(src, dest), name="test-during", daemon=True)
                helper.start()
            target = listener.getsockname()
            sres = src.migrate(address(target) if address else target)
            t.join(120)
            if helper is not None:
                helper.join(30)
        assert "error" not in box, box.get("error")
        dres = box["result"]
        assert isinstance(dres, MigrationStats)
        match = all(dest.path.placed_hashes(i) == src.hashes[b.idstr] for i, b in enumerate(dest.memory))
        time.sleep(0.1)             # the guest keeps running on the destination
        assert dest.guest is not None
        dest.guest.stop()
        v = dest.guest.verify()
        return Outcome(sres, dres, match, v.ok, v.summary(), src_statuses, dst_statuses, list(dest.latencies_ns),
                       dest.path.minor)
    finally:
        guest.close()
        dest.close()
        memory.close()


def check(o: Outcome, spec: GuestSpec) -> None:
    """Nothing lost, nothing corrupted, every page sent exactly once per link."""
    total = sum(b.size for b in spec.blocks) // 4096
    assert o.source.status == "completed", o.source.error
    assert o.dest.status == "completed", o.dest.error
    assert o.dest.pages_received == total
    assert o.hashes_match, "a placed page differs from the source's page at the switch"
    assert o.guest_ok, o.guest_summary
