"""Running the synthetic guest: determinism, initial content, stop, counters, rate limit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from postcopy.guest import TARGET_PAGE_SIZE, Guest, GuestBusyError, Pattern

KiB = 1024
MiB = 1024 * KiB
# several regions of different sizes (pages: 16, 256, 64)
SIZES = (64 * KiB, 1 * MiB, 256 * KiB)


def make_regions(memory: Any, sizes: tuple[int, ...] = SIZES) -> list[Any]:
    return [memory(n) for n in sizes]


def snapshot(mems: list[Any]) -> list[bytes]:
    # Python reads guest memory only while no vCPU runs and nothing is uffd-registered
    return [bytes(m.map) for m in mems]


@pytest.mark.parametrize("nvcpus", [1, 4])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_same_seed_and_steps_give_identical_memory(
    memory: Any, pattern: Pattern, nvcpus: int
) -> None:
    runs = []
    for _ in range(2):
        mems = make_regions(memory)
        with Guest([m.region() for m in mems], nvcpus=nvcpus, pattern=pattern, seed=42) as g:
            g.fill_initial()
            g.run(20_000)
            runs.append((snapshot(mems), g.save_state(), g.stats()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert runs[0][2] == runs[1][2]
    assert runs[0][2].steps == (20_000,) * nvcpus


@pytest.mark.parametrize("pattern", list(Pattern))
def test_run_in_chunks_equals_one_run_and_another_seed_differs(
    memory: Any, pattern: Pattern
) -> None:
    results = []
    for seed, chunks in ((9, (5_000, 2_500, 2_500)), (9, (10_000,)), (10, (10_000,))):
        mems = make_regions(memory)
        with Guest([m.region() for m in mems], nvcpus=2, pattern=pattern, seed=seed) as g:
            g.fill_initial()
            for n in chunks:
                g.run(n)
            assert g.verify().ok
            results.append((snapshot(mems), g.save_state()))
    assert results[0] == results[1]
    assert results[2][0] != results[1][0]


@pytest.mark.parametrize("pattern", list(Pattern))
def test_fill_initial_leaves_about_one_page_in_eight_zero(memory: Any, pattern: Pattern) -> None:
    mem = memory(8 * MiB)  # 2048 pages
    with Guest([mem.region()], nvcpus=1, pattern=pattern, seed=3) as g:
        g.fill_initial()
        pages = [mem.map[i : i + TARGET_PAGE_SIZE] for i in range(0, mem.length, TARGET_PAGE_SIZE)]
        zero = [p == bytes(TARGET_PAGE_SIZE) for p in pages]
        if pattern is Pattern.HOT:
            # the cold upper half is untouched memory; the lower half has the 1-in-8 zeros
            assert all(zero[1024:])
            lower = zero[:1024]
        else:
            lower = zero
        assert 0.07 < sum(lower) / len(lower) < 0.18
        # the non-zero pages are all different (the pattern depends on the page)
        data = [p for p, z in zip(pages, zero, strict=True) if not z]
        assert len(set(data)) == len(data)
        assert pages[5] == g.initial_page(0, 5 * TARGET_PAGE_SIZE)
        assert g.verify().ok


def test_fill_initial_pattern_depends_on_region_and_seed(memory: Any) -> None:
    a, b = memory(64 * KiB), memory(64 * KiB)
    with (
        Guest([a.region(), b.region()], nvcpus=1, seed=1) as g1,
        Guest([a.region()], nvcpus=1, seed=2) as g2,
    ):
        nonzero = [o for o in range(0, 64 * KiB, TARGET_PAGE_SIZE) if any(g1.initial_page(0, o))]
        assert nonzero
        o = nonzero[0]
        assert g1.initial_page(0, o) != g1.initial_page(1, o)
        assert g1.initial_page(0, o) != g2.initial_page(0, o)
        with pytest.raises(ValueError, match="region 0 offset 0x10000 length 0x1000"):
            g2.initial_page(0, 64 * KiB)
        with pytest.raises(ValueError, match=r"region 2 .*region index below 2"):
            g1.initial_page(2, 0)
        with pytest.raises(ValueError, match="offset 0x800"):
            g1.initial_page(0, 2048)
        with pytest.raises(ValueError, match="offset -0x1000"):
            g1.initial_page(0, -4096)
        with pytest.raises(ValueError, match="length 0x11000"):
            g1.initial_content(0, 0, 68 * KiB)
        whole = g1.initial_content(1, 0, 64 * KiB)
        assert whole[o : o + TARGET_PAGE_SIZE] == g1.initial_page(1, o)
        assert g1.initial_content(0, 0, 0) == b""


@pytest.mark.parametrize("nvcpus", [1, 4])
def test_free_running_guest_stops_at_access_boundary(
    memory: Any, wait_until: Any, nvcpus: int
) -> None:
    mems = make_regions(memory)
    with Guest([m.region() for m in mems], nvcpus=nvcpus, pattern=Pattern.RANDOM, seed=5) as g:
        g.fill_initial()
        g.start()
        assert g.running == nvcpus
        with pytest.raises(GuestBusyError, match="already started"):
            g.start()
        with pytest.raises(GuestBusyError, match="save guest state"):
            g.save_state()
        size = g.state_size()       # known while it runs (what a rehearsal of the save needs)
        with pytest.raises(GuestBusyError, match="verify"):
            g.verify()
        first = g.stats()
        wait_until(
            lambda: all(b > a for a, b in zip(first.steps, g.stats().steps, strict=True)),
            "every vCPU to make progress",
        )
        g.stop()
        assert g.running == 0
        final = g.stats()
        assert all(
            r + w == s for s, r, w in zip(final.steps, final.reads, final.writes, strict=True)
        )
        assert g.stats() == final  # nothing moves after stop
        result = g.verify()
        assert result.ok, result.summary()
        assert result.pages_checked == sum(SIZES) // TARGET_PAGE_SIZE
        assert len(g.save_state()) == size


def test_start_with_step_limit_stops_by_itself(memory: Any) -> None:
    mem = memory(256 * KiB)
    with Guest([mem.region()], nvcpus=2, seed=5) as g:
        g.start(1_000)
        assert g.wait(timeout=10)
        g.join()
        assert g.stats().steps == (1_000, 1_000)
        g.start(500)
        g.join()
        assert g.stats().steps == (1_500, 1_500)


def test_wait_times_out_while_running_and_request_stop_ends_it(memory: Any) -> None:
    mem = memory(256 * KiB)
    with Guest([mem.region()], nvcpus=2, seed=5, rate_limit=1_000) as g:
        g.fill_initial()
        g.start()
        assert not g.wait(timeout=0.05)
        g.request_stop()
        assert g.wait(timeout=5)
        g.join()
        assert g.verify().ok


def test_rate_limit_bounds_accesses_per_second(memory: Any) -> None:
    mem = memory(256 * KiB)
    with Guest([mem.region()], nvcpus=2, pattern=Pattern.HOT, seed=5, rate_limit=2_000) as g:
        g.fill_initial()
        t0 = time.monotonic()
        g.start()
        time.sleep(0.5)
        g.stop()
        elapsed = time.monotonic() - t0
        for steps in g.stats().steps:
            # at most rate * elapsed (+1 for the access at t=0); a busy 2-core box may lag
            assert 0.2 * 2_000 * elapsed < steps <= 2_000 * elapsed + 1
        assert g.verify().ok


def test_close_stops_a_running_guest(memory: Any) -> None:
    mem = memory(64 * KiB)
    g = Guest([mem.region()], nvcpus=4, seed=1)
    g.fill_initial()
    g.start()
    g.close()
    with pytest.raises(ValueError, match="closed guest"):
        g.stats()
    g.close()  # idempotent


def thread_states(tids: list[int]) -> list[str]:
    """States (R, S, ...) of those of these threads of this process that still exist."""
    out = []
    for tid in tids:
        try:
            out.append(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue        # ended
    return out


def wait_for_steps(g: Guest, steps: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 5
    while g.stats().steps != steps and time.monotonic() < deadline:
        time.sleep(0.005)
    assert g.stats().steps == steps


def test_a_vcpu_stopped_asleep_saves_the_state_of_one_that_left_its_loop(memory: Any) -> None:
    """An idle guest's stop (the source's downtime starts there) does not wait for its vCPUs to
    wake: asleep with their state written back, they are stopped where they sleep. The state
    saved then is the state of vCPUs that left their loops after the same accesses."""
    states = []
    for asleep in (True, False):
        mem = memory(256 * KiB)
        with Guest([mem.region()], nvcpus=2, pattern=Pattern.RANDOM, seed=9, rate_limit=1) as g:
            g.fill_initial()
            g.start(0 if asleep else 1)     # one access each, then asleep (or out: its limit)
            wait_for_steps(g, (1, 1))
            if asleep:
                time.sleep(0.05)
                g.stop()
            else:
                g.join()
            states.append((g.save_state(), bytes(mem.map)))
            assert g.verify().ok
    assert states[0] == states[1]


def test_stop_returns_with_the_asleep_vcpus_still_asleep(memory: Any) -> None:
    mem = memory(256 * KiB)
    with Guest([mem.region()], nvcpus=2, pattern=Pattern.RANDOM, seed=9, rate_limit=1) as g:
        g.fill_initial()
        g.start()
        wait_for_steps(g, (1, 1))
        time.sleep(0.05)        # both asleep until their next access, a second after the first
        tids = g.vcpu_tids()
        assert len(tids) == 2
        g.stop()
        assert g.running == 0
        assert thread_states(tids) == ["S", "S"]        # stopped, not woken, not ended
        state = g.save_state()                          # allowed: no vCPU runs
        assert g.stats().steps == (1, 1)
        g.start()                                       # joins the stopped threads first
        g.stop()
        tids += g.vcpu_tids()
        g.join()
        assert thread_states(tids) == []
        assert len(g.save_state()) == len(state)
        assert g.verify().ok
