"""Who runs first on a busy host (issue 13, huge-page faults): the threads a faulting vCPU
waits on take nice -10 and a short scheduler slice, so they preempt a running background
thread the moment they wake; the built-in guest's vCPUs keep the guest's own priority
whichever thread starts them. Read back from /proc/self/task/TID (per thread on Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from harness import check, migrate

from postcopy import wire
from postcopy._datapath import DestinationPath
from postcopy._link import (
    BACKGROUND_NICE,
    SWITCH_NICE,
    background_priority,
    name_os_thread,
    set_thread_nice,
    urgent_priority,
)
from postcopy.guest import Guest, GuestConfigError, Pattern
from postcopy.owner import BuiltinGuest
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root

URGENT_SLICE_NS = 100_000


def _sched(tid: int) -> tuple[int, int]:
    """(nice, slice ns) of a thread of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        nice = int(f.read().rsplit(")", 1)[1].split()[16])
    with open(f"/proc/self/task/{tid}/sched") as f:
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    return nice, int(fields["se.slice"])


def _on_thread(fn: Callable[[], object]) -> object:
    """fn's result, run on a fresh thread (priorities stick to the thread that sets them)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:    # handed to the test's thread
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _default_slice() -> int:
    return _sched(threading.get_native_id())[1]


def test_an_urgent_thread_gets_a_short_slice_and_gives_it_back_when_lowered() -> None:
    default = _on_thread(_default_slice)
    assert isinstance(default, int)
    assert default > URGENT_SLICE_NS

    def urgent_then_background() -> list[tuple[int, int]]:
        me = threading.get_native_id()
        urgent_priority()
        raised = _sched(me)
        background_priority()
        lowered = _sched(me)
        set_thread_nice(0)
        return [raised, lowered, _sched(me)]

    assert _on_thread(urgent_then_background) == [
        (-10, URGENT_SLICE_NS), (BACKGROUND_NICE, default), (0, default)]


def test_without_cap_sys_nice_an_urgent_thread_still_takes_the_short_slice() -> None:
    # as nobody: raising the nice is refused, the slice (no privilege needed) still takes
    code = (
        "import os, threading\n"
        "from postcopy._link import urgent_priority\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "urgent_priority()\n"
        "tid = threading.get_native_id()\n"
        "stat = open(f'/proc/self/task/{tid}/stat').read().rsplit(')', 1)[1].split()\n"
        "sched = [l for l in open(f'/proc/self/task/{tid}/sched') if l.startswith('se.slice')]\n"
        "print(stat[16], sched[0].split(':')[1].strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["0", str(URGENT_SLICE_NS)]


def test_vcpus_run_at_the_guests_nice_not_at_the_nice_of_the_thread_that_starts_them() -> None:
    spec = GuestSpec.simple(4 << 20, PAGE_4K, vcpus=2, pattern="random")
    memory = spec.build_memory()
    try:
        default = _on_thread(_default_slice)
        guest = Guest(memory, nvcpus=2, pattern=Pattern.RANDOM, nice=5)
        try:
            guest.fill_initial()

            def start_while_urgent() -> None:
                urgent_priority()
                guest.start()

            _on_thread(start_while_urgent)
            assert [_sched(t) for t in guest.vcpu_tids()] == [(5, default), (5, default)]
        finally:
            guest.stop()
            guest.close()
    finally:
        memory.close()


def test_the_builtin_guest_started_on_an_urgent_thread_runs_at_its_setup_threads_nice() -> None:
    spec = GuestSpec.simple(4 << 20, PAGE_4K, vcpus=2, pattern="random")
    memory = spec.build_memory()
    source = Guest(memory, nvcpus=spec.vcpus, pattern=Pattern[spec.pattern.upper()], seed=spec.seed)
    try:
        source.fill_initial()
        sections = BuiltinGuest(spec, memory, source).save_device_state()
        destination = BuiltinGuest(spec, memory)        # made here, at this thread's nice (0)
        destination.load_device_state(sections)
        default = _on_thread(_default_slice)

        def start_while_urgent() -> None:
            urgent_priority()       # the destination's reader, when RUN starts the guest
            destination.start()

        _on_thread(start_while_urgent)
        try:
            assert [_sched(t) for t in destination.vcpu_thread_ids()] == [(0, default), (0, default)]
        finally:
            destination.stop()
            assert destination.guest is not None
            destination.guest.close()
    finally:
        source.close()
        memory.close()


def test_the_destination_starts_the_guest_above_the_fault_path_until_pong_3_is_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RUN's thread releases the vCPUs at SWITCH_NICE (their first faults wake the fault path at
    nice -10 at once) and writes PONG 3 so; after that batch it is back at -10."""
    seen: dict[str, tuple[int, int]] = {}
    start, send, set_vcpu_threads = BuiltinGuest.start, DestinationPath.send, DestinationPath.set_vcpu_threads
    pong3 = wire.encode(wire.Pong(value=3))

    def recording_start(self: BuiltinGuest) -> None:
        seen["release"] = _sched(threading.get_native_id())
        start(self)

    def recording_send(self: DestinationPath, message: bytes) -> None:
        if message.endswith(pong3):
            seen["pong 3"] = _sched(threading.get_native_id())
        send(self, message)

    def recording_set_vcpu_threads(self: DestinationPath, tids: list[int]) -> None:
        seen.setdefault("after", _sched(threading.get_native_id()))
        set_vcpu_threads(self, tids)

    monkeypatch.setattr(BuiltinGuest, "start", recording_start)
    monkeypatch.setattr(DestinationPath, "send", recording_send)
    monkeypatch.setattr(DestinationPath, "set_vcpu_threads", recording_set_vcpu_threads)
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="random")
    check(migrate(spec, preempt=True), spec)
    assert seen == {"release": (SWITCH_NICE, URGENT_SLICE_NS), "pong 3": (SWITCH_NICE, URGENT_SLICE_NS),
                    "after": (-10, URGENT_SLICE_NS)}


def test_a_guests_nice_out_of_range_is_refused() -> None:
    with pytest.raises(GuestConfigError, match="nice=20"):
        Guest([(0x10000, 4096, 4096)], nvcpus=1, nice=20)


def test_a_thread_named_for_the_os_shows_in_proc_cut_to_15_bytes() -> None:
    def name_and_read() -> str:
        name_os_thread("dest-preempt-123456789")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    assert _on_thread(name_and_read) == "dest-preempt-12"
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        assert f.read().strip() != "dest-preempt-12"     # the caller's own name is untouched
