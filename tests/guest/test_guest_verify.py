"""Verification finds exactly the pages a broken migration would get wrong."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from postcopy.guest import TARGET_PAGE_SIZE, Guest, MismatchKind, Pattern

KiB = 1024
PAGE = TARGET_PAGE_SIZE
SIZES = (64 * KiB, 512 * KiB, 128 * KiB)


@pytest.fixture(params=[1, 4], ids=["1vcpu", "4vcpu"])
def ran(request: pytest.FixtureRequest, memory: Any) -> Iterator[tuple[Guest, list[Any]]]:
    """A guest that has run long enough to have written many pages, stopped."""
    mems = [memory(n) for n in SIZES]
    with Guest(
        [m.region() for m in mems], nvcpus=request.param, pattern=Pattern.RANDOM, seed=99
    ) as g:
        g.fill_initial()
        g.run(4_000)
        assert g.verify().ok
        yield g, mems


def page(mem: Any, offset: int) -> bytes:
    return bytes(mem.map[offset : offset + PAGE])


def touched_pages(g: Guest, mems: list[Any]) -> list[tuple[int, int]]:
    """(region, offset) of pages whose content differs from their initial content."""
    return [
        (r, off)
        for r, m in enumerate(mems)
        for off in range(0, m.length, PAGE)
        if page(m, off) != g.initial_page(r, off)
    ]


def data_pages(g: Guest, mems: list[Any]) -> list[tuple[int, int]]:
    return [
        (r, off)
        for r, m in enumerate(mems)
        for off in range(0, m.length, PAGE)
        if any(page(m, off))
    ]


def only_mismatch(g: Guest) -> Any:
    result = g.verify()
    assert not result.ok
    assert result.pages_mismatched == 1, result.summary()
    assert len(result.first_mismatches) == 1
    assert result.read_hash_ok
    assert result.state_ok
    return result.first_mismatches[0]


def test_flipped_byte_in_a_touched_page(ran: Any) -> None:
    g, mems = ran
    r, off = touched_pages(g, mems)[-1]
    mems[r].map[off + 100] ^= 0x40
    region_index, offset, detail = only_mismatch(g)
    assert (region_index, offset) == (r, off)
    assert detail.kind is MismatchKind.CONTENT
    assert detail.byte_offset == 96
    assert detail.expected ^ detail.actual == 0x40 << 32
    assert f"+{96:#x}" in str(detail)


def test_zero_page_where_data_was_expected(ran: Any) -> None:
    g, mems = ran
    r, off = data_pages(g, mems)[7]
    mems[r].map[off : off + PAGE] = bytes(PAGE)
    region_index, offset, detail = only_mismatch(g)
    assert (region_index, offset) == (r, off)
    assert detail.kind is MismatchKind.ZERO
    assert detail.actual == 0
    assert detail.expected != 0
    assert "all zero" in str(detail)


def test_two_swapped_pages_name_each_other(ran: Any) -> None:
    g, mems = ran
    pages = [p for p in data_pages(g, mems) if any(g.initial_page(*p))]
    (ra, oa), (rb, ob) = pages[2], pages[-3]
    assert ra != rb
    a, b = page(mems[ra], oa), page(mems[rb], ob)
    mems[ra].map[oa : oa + PAGE] = b
    mems[rb].map[ob : ob + PAGE] = a
    result = g.verify()
    assert result.pages_mismatched == 2
    found = {(m.region_index, m.offset): m.detail for m in result.first_mismatches}
    assert set(found) == {(ra, oa), (rb, ob)}
    assert found[(ra, oa)].kind is MismatchKind.FOREIGN
    assert found[(ra, oa)].origin == (rb, ob)
    assert found[(rb, ob)].origin == (ra, oa)
    assert f"region {rb} offset {ob:#x}" in str(found[(ra, oa)])


def test_page_placed_at_the_wrong_offset(ran: Any) -> None:
    g, mems = ran
    pages = [p for p in data_pages(g, mems) if any(g.initial_page(*p))]
    (rs, os_), (rd, od) = pages[0], pages[1]
    mems[rd].map[od : od + PAGE] = page(mems[rs], os_)
    region_index, offset, detail = only_mismatch(g)
    assert (region_index, offset) == (rd, od)
    assert detail.kind is MismatchKind.FOREIGN
    assert detail.origin == (rs, os_)


def test_page_rolled_back_to_an_older_copy(ran: Any) -> None:
    g, mems = ran
    before = [bytes(m.map) for m in mems]
    g.run(2_000)
    changed = [
        (r, off)
        for r, m in enumerate(mems)
        for off in range(0, m.length, PAGE)
        if page(m, off) != before[r][off : off + PAGE]
    ]
    assert changed
    r, off = changed[len(changed) // 2]
    mems[r].map[off : off + PAGE] = before[r][off : off + PAGE]  # a stale copy
    region_index, offset, detail = only_mismatch(g)
    assert (region_index, offset) == (r, off)
    assert detail.kind is MismatchKind.COUNTER
    assert detail.byte_offset == 64 * detail.vcpu
    assert "behind" in str(detail)


def test_lost_update_names_the_vcpu(memory: Any) -> None:
    mem = memory(64 * KiB)
    with Guest([mem.region()], nvcpus=4, pattern=Pattern.SEQ, seed=3, write_percent=100) as g:
        g.fill_initial()
        g.run(100)  # every vCPU wrote every page of its share several times
        off = 9 * PAGE  # in vCPU 2's share (pages 8..11)
        (slot,) = struct.unpack_from("<Q", mem.map, off + 64 * 2)
        struct.pack_into("<Q", mem.map, off + 64 * 2, slot - 3)
        region_index, offset, detail = only_mismatch(g)
        assert (region_index, offset) == (0, off)
        assert detail.kind is MismatchKind.COUNTER
        assert detail.vcpu == 2
        assert "3 update(s) behind" in str(detail)


def test_mismatch_list_is_capped_and_in_address_order(ran: Any) -> None:
    g, mems = ran
    corrupted = data_pages(g, mems)[:20]
    for r, off in corrupted:
        mems[r].map[off + 1000] ^= 0xFF
    result = g.verify(max_mismatches=5)
    assert result.pages_mismatched == 20
    assert [(m.region_index, m.offset) for m in result.first_mismatches] == corrupted[:5]
    assert "20 of" in result.summary()
    assert g.verify(max_mismatches=0).first_mismatches == []


def test_wrong_content_read_while_running_breaks_the_read_hash(memory: Any) -> None:
    """Memory that was wrong only while the guest read it is caught by the read hash,
    even after the page is repaired."""
    mems = [memory(n) for n in SIZES]
    with Guest(
        [m.region() for m in mems], nvcpus=2, pattern=Pattern.SEQ, seed=4, write_percent=0
    ) as g:
        g.fill_initial()
        good = [bytes(m.map) for m in mems]
        for m in mems:  # spoil vCPU 0's read-only pattern word in every page
            for off in range(0, m.length, PAGE):
                m.map[off + 8] ^= 1
        g.run(1_000)  # all reads
        for m, content in zip(mems, good, strict=True):
            m.map[:] = content
        result = g.verify()
        assert result.pages_mismatched == 0
        assert not result.read_hash_ok
        assert not result.ok
        assert result.bad_read_hash_vcpus == (0,)
        assert "read hash differs for vCPU(s) [0]" in result.summary()
