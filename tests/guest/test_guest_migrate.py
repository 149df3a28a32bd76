"""Source -> destination with plain memory copies: save, copy, load, continue, verify."""

from __future__ import annotations

import time
from typing import Any

import pytest

from postcopy.guest import Guest, Pattern

KiB = 1024
MiB = 1024 * KiB
SIZES = (64 * KiB, 1 * MiB, 256 * KiB)
HUGE_2M = 2 * MiB


def copy_memory(src: list[Any], dst: list[Any]) -> None:
    # plain Python copies, only while no vCPU of either guest runs
    for s, d in zip(src, dst, strict=True):
        d.map[:] = s.map[:]


@pytest.mark.parametrize("nvcpus", [1, 4])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_destination_continues_where_source_stopped(
    memory: Any, wait_until: Any, pattern: Pattern, nvcpus: int
) -> None:
    src_mems = [memory(n) for n in SIZES]
    dst_mems = [memory(n) for n in SIZES]
    config: dict[str, Any] = {
        "nvcpus": nvcpus,
        "pattern": pattern,
        "seed": 0xC0FFEE,
        "write_percent": 60,
    }
    with Guest([m.region() for m in src_mems], **config) as source:
        source.fill_initial()
        source.start()
        time.sleep(0.05)  # free-running: step counts differ per vCPU and per run
        source.stop()
        state = source.save_state()
        src_steps = source.stats().steps
        copy_memory(src_mems, dst_mems)

    with Guest([m.region() for m in dst_mems], **config) as dest:
        dest.load_state(state)
        assert dest.stats().steps == src_steps
        assert dest.verify().ok  # the copy is exactly the source's memory
        dest.start()
        wait_until(
            lambda: all(d > s for s, d in zip(src_steps, dest.stats().steps, strict=True)),
            "every destination vCPU to continue",
        )
        dest.stop()
        result = dest.verify()
        assert result.ok, result.summary()
        assert result.pages_checked == sum(SIZES) // 4096


def test_a_destination_without_the_state_fails_verification(memory: Any) -> None:
    """Memory copied but state not loaded: the destination restarts from step 0 and
    verify sees memory written by steps the state does not account for."""
    src, dst = memory(256 * KiB), memory(256 * KiB)
    with Guest([src.region()], nvcpus=2, seed=1) as source:
        source.fill_initial()
        source.run(3_000)
        dst.map[:] = src.map[:]
    with Guest([dst.region()], nvcpus=2, seed=1) as dest:
        result = dest.verify()
        assert not result.ok
        assert result.pages_mismatched > 0


@pytest.mark.hugetlb
@pytest.mark.parametrize("pattern", list(Pattern))
def test_migrate_hugetlb_and_small_page_regions(memory: Any, pattern: Pattern) -> None:
    """4 KiB target pages inside 2 MiB host pages, next to a normal region."""
    src = [memory(4 * MiB, HUGE_2M), memory(512 * KiB)]
    dst = [memory(4 * MiB, HUGE_2M), memory(512 * KiB)]
    assert src[0].addr % HUGE_2M == 0
    config: dict[str, Any] = {"nvcpus": 4, "pattern": pattern, "seed": 77}
    with Guest([m.region() for m in src], **config) as source:
        source.fill_initial()
        source.run(50_000)
        state = source.save_state()
        copy_memory(src, dst)
    with Guest([m.region() for m in dst], **config) as dest:
        dest.load_state(state)
        dest.run(50_000)
        result = dest.verify()
        assert result.ok, result.summary()
        assert result.pages_checked == (4 * MiB + 512 * KiB) // 4096
