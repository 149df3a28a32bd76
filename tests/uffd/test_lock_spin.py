"""The return-path lock is taken spinning, then sleeping (pc_mutex_lock_spinning in core.h): a
thread on the fault path that sleeps for a lock gives up its CPU, and when every CPU is busy it
waits a time slice to get it back (traced: the destination's switch thread slept 40 us on the
return-path lock while the fault service sent the started guest's first requests, then waited
1.7 ms for a CPU, and PONG 3 with it). Real threads: one holds a lock busy on its CPU; the probe
counts how often the taker slept (its voluntary context switches)."""

from __future__ import annotations

from uffd._native import lib

MS = 1_000_000


def test_a_plain_wait_sleeps_so_the_probe_sees_sleeping() -> None:
    # spin 0: the taker goes straight to pthread_mutex_lock while the holder keeps it 5 ms
    assert lib.pc_lock_wait_probe(5 * MS, 0) >= 1


def test_a_lock_held_briefly_is_taken_without_sleeping() -> None:
    # held 5 ms, spun for up to 50: ten times the margin a descheduled holder would need
    assert lib.pc_lock_wait_probe(5 * MS, 50 * MS) == 0


def test_a_lock_held_longer_than_the_spin_is_waited_for_asleep() -> None:
    # the spin is bounded: past it the taker sleeps, and it still gets the lock once released
    assert lib.pc_lock_wait_probe(30 * MS, 1 * MS) >= 1

