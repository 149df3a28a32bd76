"""Bad guest configurations give one clear error naming the operands."""

from __future__ import annotations

from typing import Any

import pytest

import uffd

from postcopy.guest import MAX_VCPUS, Guest, GuestConfigError, Pattern

KiB = 1024


@pytest.fixture
def mem(memory: Any) -> Any:
    return memory(64 * KiB)


@pytest.mark.parametrize(
    ("make_regions", "kwargs", "match"),
    [
        (lambda m: [], {}, "at least one region"),
        (lambda m: [m.region()], {"nvcpus": 0}, "nvcpus=0: need 1..32 vCPUs"),
        (lambda m: [m.region()], {"nvcpus": MAX_VCPUS + 1}, "nvcpus=33"),
        (lambda m: [m.region()], {"write_percent": 101}, "write_percent=101: must be 0..100"),
        (lambda m: [m.region()], {"nvcpus": -1}, r"nvcpus=-1: must be an integer"),
        (lambda m: [m.region()], {"seed": 2**64}, "seed=18446744073709551616"),
        (
            lambda m: [m.region()],
            {"pattern": 7},
            r"pattern=7: must be one of \['SEQ', 'RANDOM', 'HOT'\]",
        ),
        (
            lambda m: [(m.addr + 8, 4096, 4096)],
            {},
            r"region 0: addr=0x[0-9a-f]+8 is not aligned to host_page_size=4096",
        ),
        (
            lambda m: [(m.addr, 6000, 4096)],
            {},
            "region 0: length=6000 must be a non-zero multiple of host_page_size=4096",
        ),
        (lambda m: [(m.addr, 0, 4096)], {}, "length=0"),
        (
            lambda m: [(m.addr, 8192, 1000)],
            {},
            "host_page_size=1000 must be a power of two >= 4096",
        ),
        (lambda m: [(m.addr, 8192, 4096)], {"nvcpus": 4}, "2 pages for 4 vCPUs"),
        (
            lambda m: [m.region(), (m.addr + 32 * KiB, 32 * KiB, 4096)],
            {},
            r"region 1 \[0x[0-9a-f]+, \+32768\) overlaps region 0",
        ),
        (lambda m: [(m.addr, 64 * KiB, "4096")], {}, "region 0 host_page_size='4096'"),
        (lambda m: [m.region()[:2]], {}, r"region 0: expected \(addr, length, host_page_size\)"),
    ],
)
def test_bad_configuration(mem: Any, make_regions: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(GuestConfigError, match=match) as info:
        Guest(make_regions(mem), **kwargs)
    assert isinstance(info.value, ValueError)


def test_good_configuration_reports_itself(mem: Any) -> None:
    with Guest([mem.region()], nvcpus=3, pattern=Pattern.HOT, seed=0xAB, write_percent=0) as g:
        assert g.total_pages == 16
        assert g.nvcpus == 3
        assert (
            repr(g)
            == "Guest(regions=1, pages=16, nvcpus=3, pattern=HOT, seed=0xab, write_percent=0)"
        )
        assert g.stats().steps == (0, 0, 0)
        assert g.running == 0


def test_run_needs_a_positive_step_count(mem: Any) -> None:
    with Guest([mem.region()]) as g, pytest.raises(ValueError, match="nsteps=0"):
        g.run(0)


def test_uffd_ram_blocks_are_accepted_as_regions() -> None:
    with (
        uffd.RamBlock("pc.ram", 1024 * KiB) as ram,
        uffd.RamBlock("vga.vram", 256 * KiB, backing="memfd") as vram,
        Guest([ram, vram], nvcpus=2, pattern=Pattern.RANDOM) as g,
    ):
        assert g.regions == ((ram.addr, ram.used_length, 4096), (vram.addr, vram.used_length, 4096))
        g.fill_initial()
        g.run(1_000)
        assert g.verify().ok
