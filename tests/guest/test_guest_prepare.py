"""vCPU threads made before the start (Guest.prepare): a destination starts its guest inside
the downtime, and making threads there cost 80-300 us and took the switch's CPU. The parked
threads are real threads of this process (counted in /proc/self/task); started, they run exactly
as threads made at the start; never started, they end with the guest."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from postcopy.guest import Guest, GuestBusyError, Pattern

KiB = 1024
SIZES = (64 * KiB, 1024 * KiB, 256 * KiB)


def threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def regions(memory: Any) -> list[Any]:
    return [memory(n) for n in SIZES]


@pytest.mark.parametrize("pattern", list(Pattern))
def test_a_prepared_guest_runs_exactly_as_one_started_plainly(memory: Any, pattern: Pattern) -> None:
    results = []
    for prepared in (False, True):
        mems = regions(memory)
        with Guest([m.region() for m in mems], nvcpus=3, pattern=pattern, seed=7) as g:
            g.fill_initial()
            if prepared:
                g.prepare()
            g.run(20_000)
            assert g.verify().ok
            results.append(([bytes(m.map) for m in mems], g.save_state(), g.stats()))
    assert results[0] == results[1]


def test_the_threads_exist_before_the_start_and_the_start_makes_none(memory: Any) -> None:
    mems = regions(memory)
    before = threads()
    with Guest([m.region() for m in mems], nvcpus=2, seed=1) as g:
        g.fill_initial()
        g.prepare()
        parked = threads() - before
        assert len(parked) == 2
        assert sorted(g.vcpu_tids(wait=0)) == sorted(parked)    # known before RUN, as QEMU's are
        g.start(5_000)
        assert threads() - before <= parked     # (a vCPU done already has ended)
        g.join()
        assert g.stats().steps == (5_000, 5_000)
    assert threads() - before == set()


def test_parked_vcpus_wait_as_batch_threads_and_run_as_ordinary_ones(memory: Any) -> None:
    """Parked SCHED_BATCH, whose wakeup does not preempt the thread that releases them (the
    switch's, on its way to PONG 3); running, SCHED_OTHER again, so that a vCPU woken by its
    placed page preempts as before."""
    mems = regions(memory)
    with Guest([m.region() for m in mems], nvcpus=2, seed=3) as g:
        g.fill_initial()
        g.prepare()
        tids = g.vcpu_tids(wait=0)
        assert [os.sched_getscheduler(t) for t in tids] == [os.SCHED_BATCH] * 2
        nice = [os.getpriority(os.PRIO_PROCESS, t) for t in tids]
        g.start()
        deadline = time.monotonic() + 10
        # a vCPU back to SCHED_OTHER before its first access: one that has stepped has switched
        while min(g.stats().steps) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert min(g.stats().steps) > 0
        assert [os.sched_getscheduler(t) for t in tids] == [os.SCHED_OTHER] * 2
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == nice     # the nice kept
        g.stop()


def test_a_guest_never_started_ends_its_parked_threads(memory: Any) -> None:
    mems = regions(memory)
    before = threads()
    g = Guest([m.region() for m in mems], nvcpus=4, seed=2)
    g.fill_initial()
    g.prepare()
    g.prepare()     # once is enough: no second set of threads
    assert len(threads() - before) == 4
    g.close()
    assert threads() - before == set()


def test_a_parked_guest_takes_state_loaded_before_its_start(memory: Any) -> None:
    # the destination's order: threads parked early, the source's state loaded at RUN, then start
    mems = regions(memory)
    with Guest([m.region() for m in mems], nvcpus=2, seed=3) as src:
        src.fill_initial()
        src.run(5_000)
        state, pages = src.save_state(), [bytes(m.map) for m in mems]
    dst_mems = regions(memory)
    with Guest([m.region() for m in dst_mems], nvcpus=2, seed=3) as dst:
        dst.prepare()
        for m, content in zip(dst_mems, pages, strict=True):
            m.map[:] = content
        dst.load_state(state)
        dst.run(5_000)
        assert dst.stats().steps == (10_000, 10_000)
        assert dst.verify().ok


def test_prepare_while_running_is_refused(memory: Any) -> None:
    mems = regions(memory)
    with Guest([m.region() for m in mems], nvcpus=1, seed=4) as g:
        g.fill_initial()
        g.start()
        with pytest.raises(GuestBusyError):
            g.prepare()
        g.stop()
