"""During precopy the guest's writers yield to the migration's threads (nice 19), and get
their priority back at the switch or when the migration ends otherwise. Read back from
/proc/.../task/TID/stat (nice is per thread on Linux)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from harness import check, migrate

from postcopy.destination import Destination
from postcopy.guest import Guest, Pattern
from postcopy.owner import BuiltinGuest, HeadlessMemory, WriterProcess
from postcopy.session import MigrationFailed, SwitchoverPolicy
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root


def _nice(tid: int, pid: int | None = None) -> int:
    where = f"/proc/{pid}/task/{tid}/stat" if pid else f"/proc/self/task/{tid}/stat"
    with open(where) as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_the_builtin_guests_vcpus_are_lowered_and_put_back_while_running() -> None:
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="random")
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=2, pattern=Pattern.RANDOM)
    try:
        guest.fill_initial()
        guest.start()
        owner = BuiltinGuest(spec, memory, guest)
        tids = guest.vcpu_tids()
        assert [_nice(t) for t in tids] == [0, 0]
        owner.set_writer_nice(19)
        assert [_nice(t) for t in tids] == [19, 19]
        assert guest.vcpu_nice == 19
        # a freeze (soft-dirty) starts new vCPU threads: they run lowered too
        owner.freeze_writers()
        owner.thaw_writers()
        time.sleep(0.05)
        assert [_nice(t) for t in guest.vcpu_tids()] == [19, 19]
        owner.set_writer_nice(None)
        assert [_nice(t) for t in guest.vcpu_tids()] == [0, 0]
        assert guest.vcpu_nice is None
    finally:
        guest.stop()
        guest.close()
        memory.close()


def test_every_thread_of_another_process_is_lowered_and_put_back() -> None:
    code = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 5
        while len(os.listdir(f"/proc/{child.pid}/task")) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 4
        os.setpriority(os.PRIO_PROCESS, tids[1], 5)        # one thread had a nice of its own
        owner = HeadlessMemory(writer=WriterProcess(pid=child.pid))
        owner.set_writer_nice(19)
        assert {_nice(t, child.pid) for t in tids} == {19}
        owner.set_writer_nice(None)
        assert [_nice(t, child.pid) for t in tids] == [0, 5, 0, 0]
        owner.close()
    finally:
        child.kill()
        child.wait()


def test_the_vcpus_run_lowered_during_precopy_only() -> None:
    spec = GuestSpec.simple(32 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=30, rate_limit=50_000)
    seen: list[tuple[str, int]] = []

    def sample(src: Source, dest: Destination) -> None:
        owner = src.owner
        assert isinstance(owner, BuiltinGuest)
        assert owner.guest is not None
        while src.status in ("none", "setup", "active"):
            if src.status == "active":
                with contextlib.suppress(OSError):     # a vCPU thread just ended (the stop)
                    seen.extend(("active", _nice(t)) for t in owner.guest.vcpu_tids(wait=0))
            time.sleep(0.02)

    o = migrate(spec, preempt=True, warmup=0.1, during=sample,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=0.8), "tracking": "wp-async"})
    check(o, spec)
    assert seen
    assert {n for _, n in seen} == {19}, seen
    pre = o.source.precopy
    assert pre is not None
    assert pre.writer_nice == 19


def test_a_guest_that_runs_on_after_a_failed_precopy_gets_its_priority_back() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=30)
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=2, pattern=Pattern.RANDOM, write_percent=30)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        lowered: list[int] = []

        def accept_then_drop() -> None:
            conn, _ = listener.accept()
            time.sleep(0.4)                 # precopy under way (the guest lowered) ...
            lowered.extend(_nice(t) for t in guest.vcpu_tids())
            conn.close()                    # ... and the destination goes away

        t = threading.Thread(target=accept_then_drop)
        try:
            guest.fill_initial()
            guest.start()
            t.start()
            src = Source(BuiltinGuest(spec, memory, guest), preempt=False,
                         precopy=SwitchoverPolicy(mode="time", max_seconds=30.0), tracking="wp-async")
            with pytest.raises(MigrationFailed):
                src.migrate(listener.getsockname())
            t.join(10)
            assert lowered == [19, 19]
            assert guest.running == 2       # the guest runs on here, at its own priority again
            assert [_nice(t) for t in guest.vcpu_tids()] == [0, 0]
            assert guest.vcpu_nice is None
        finally:
            guest.stop()
            guest.close()
            memory.close()
