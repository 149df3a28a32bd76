"""The source's discards at the switch after precopy (C, on a real socket, decoded with the
codec): those sent with the guest running are remembered, those after the stop cover only
what is new, and too many runs are widened to aligned chunks that go again."""

from __future__ import annotations

import socket

from postcopy import wire
from postcopy._datapath import CHAN_MAIN, SourcePath
from uffd import PAGE_4K, RamBlock

PAGES = 4096
LAYOUT = wire.RamLayout(blocks=(wire.RamBlockLayout(idstr="pc.ram", used_length=PAGES * 4096),))


def _ranges(rx: socket.socket) -> list[tuple[int, int]]:
    rx.settimeout(1.0)
    data = b""
    try:
        while chunk := rx.recv(1 << 20):
            data += chunk
            if len(chunk) < (1 << 20):
                break
    except TimeoutError:
        pass
    dec = wire.MainStreamDecoder(recovery=True, layout=LAYOUT)
    dec.receive_data(data)
    out: list[tuple[int, int]] = []
    while not isinstance(ev := dec.next_event(), wire.NeedData):
        assert isinstance(ev, wire.PostcopyRamDiscard), ev
        out += [(start // 4096, length // 4096) for start, length in ev.ranges]
    return out


def test_discards_before_and_after_the_stop_and_widened() -> None:
    a, b = socket.socketpair()
    with RamBlock("pc.ram", PAGES * 4096, PAGE_4K, "anon") as block:
        path = SourcePath([block], 2)
        path.set_channel(CHAN_MAIN, a)
        dirty = path.dirty[0]
        for p in (10, 11, 12, 100, 2000):
            dirty.set(p)
        # guest running: everything dirty now is dropped on the destination, and remembered
        assert path.send_discards(before_stop=True) == 3
        assert _ranges(b) == [(10, 3), (100, 1), (2000, 1)]
        # the guest wrote more; guest stopped: only what is new (11 was discarded already)
        for p in (11, 13, 500):
            dirty.set(p)
        assert path.coarsen_discards(10) == 1          # few runs: as they are
        assert path.send_discards() == 2
        assert _ranges(b) == [(13, 1), (500, 1)]
        assert all(dirty.test(p) for p in (10, 11, 12, 13, 100, 500, 2000))    # all still to send
        # the next switch remembers nothing from this one; 40 pages in pairs, at most 24 ranges
        assert path.send_discards(before_stop=True) == 4        # 10-13, 100, 500, 2000
        _ranges(b)
        new = [q for base in range(1000, 3000, 100) for q in (base, base + 2)]
        for p in new:
            dirty.set(p)
        chunk = path.coarsen_discards(24)
        assert chunk == 2       # each pair is one aligned run of 2 chunks
        got = _ranges(b) if path.send_discards() else []
        assert 0 < len(got) <= 24
        # every new page is inside a discarded range, ranges are chunk-aligned, and all of it goes again
        for p in new:
            if p != 2000:       # dropped before the stop already
                assert any(s <= p < s + n for s, n in got), p
        for s, n in got:
            assert s % chunk == 0
            assert n % chunk == 0
            assert all(dirty.test(q) for q in range(s, s + n))
        # scattered pages are widened no further than twice what they are (a random writer's
        # would otherwise cover most of the memory): more ranges than the bound instead
        path.send_discards(before_stop=True)
        _ranges(b)
        scattered = list(range(3001, 4001, 25))
        for p in scattered:
            dirty.set(p)
        assert path.coarsen_discards(8) == 2
        got = _ranges(b) if path.send_discards() else []
        assert len(got) == len(scattered)
        assert sum(n for _, n in got) <= 2 * len(scattered)
        path.set_channel(CHAN_MAIN, None)
    a.close()
    b.close()
