"""The destination service listens only once its memory is built: a source that comes sooner is
refused and retries, instead of waiting (and failing) on a PONG that a destination still building
its memory cannot send; a port in use fails before any memory is built."""

from __future__ import annotations

import socket
import threading

import pytest

from postcopy.guest import Guest, Pattern
from postcopy.owner import BuiltinGuest
from postcopy.service import DestinationService, ServiceError
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

from .conftest import free_port

pytestmark = pytest.mark.root

SPEC = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="random", rate_limit=1000)


def test_a_source_that_comes_while_the_memory_is_built_migrates() -> None:
    address = ("127.0.0.1", free_port())
    refused = threading.Event()         # the source has been turned away at least once
    built_after_refusal = threading.Event()

    def slow_owner() -> BuiltinGuest:
        # the memory is built only after a connection was refused (the source's own attempts
        # count too) and after longer than the source waits for a PONG
        for _ in range(200):
            if refused.wait(0.01):
                break
            try:
                socket.create_connection(address, timeout=1).close()
            except ConnectionRefusedError:
                refused.set()
        threading.Event().wait(0.6)     # > the source's link timeout below
        built_after_refusal.set()
        return BuiltinGuest(SPEC)

    service: DestinationService[int] = DestinationService(SPEC, listen=address, owner=slow_owner)
    dest_outcome: list[object] = []
    server = threading.Thread(target=lambda: dest_outcome.append(service.run()), daemon=True)
    memory = SPEC.build_memory()
    guest = Guest(memory, nvcpus=2, pattern=Pattern.RANDOM, seed=SPEC.seed, rate_limit=1000)
    try:
        guest.fill_initial()
        guest.start()
        server.start()
        src = Source(BuiltinGuest(SPEC, memory, guest), preempt=True, link_timeout=0.4)
        stats = src.migrate(address, connect_timeout=30.0)
        server.join(60)
    finally:
        guest.close()
        memory.close()
        dest = service.destination
        if dest is not None:
            if dest.guest is not None:
                dest.guest.stop()
            dest.close()
    assert refused.is_set()
    assert built_after_refusal.is_set()
    assert stats.status.value == "completed"
    assert dest_outcome
    assert getattr(dest_outcome[0], "error", None) is None
    assert service.destination is not None
    assert service.destination.result.status.value == "completed"


def test_a_port_in_use_fails_before_the_memory_is_built() -> None:
    built: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as taken:
        service: DestinationService[int] = DestinationService(
            SPEC, listen=taken.getsockname()[:2], owner=lambda: built.append(1) or BuiltinGuest(SPEC))
        with pytest.raises(ServiceError, match="cannot listen"):
            service.run()
    assert built == []
