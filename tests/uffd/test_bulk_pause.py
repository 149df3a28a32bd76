"""The source's bulk stream stands aside for requested pages (preempt): while the return-path
thread is sending requested pages on the preempt channel, the bulk sender pauses between its
batches, each pause bounded (it is never starved: it runs at least as long as it pauses), and once the urgent pages are taken in it
runs on without pausing. Real TCP sockets over loopback; C threads with the GIL released."""

from __future__ import annotations

import socket
import struct
import threading

from postcopy._datapath import CHAN_MAIN, CHAN_PREEMPT, SourcePath
from postcopy.wire import RpMessage
from uffd import PAGE_4K, RamBlock
from uffd.memtouch import write_byte

from .conftest import drain, tcp_pair, wait_until

PAGES = 16384                   # 64 MiB of 4 KiB pages: the bulk stream cannot finish during the test
REQ_FIRST = PAGES - 2048        # the requested 8 MiB: the last pages, which the bulk stream reaches last


def test_bulk_pauses_for_urgent_pages_bounded_and_resumes() -> None:
    with RamBlock("pc.ram", PAGES * 4096, PAGE_4K, "anon") as block:
        for p in range(0, PAGES, 7):        # some non-zero pages: bodies go on the wire
            write_byte(block, p * 4096, 0x5A)
        path = SourcePath([block], 2)
        path.dirty[0].set_range(0, PAGES)
        path.configure(preempt=True)
        main_w, main_r = tcp_pair()
        pre_w, pre_r = tcp_pair(small=True)
        rp_src, rp_dst = socket.socketpair()
        path.set_channel(CHAN_MAIN, main_w)
        path.set_channel(CHAN_PREEMPT, pre_w)
        path.set_return_path(rp_src)
        main_got, pre_got = [0], [0]
        preempt_open = threading.Event()
        readers = [threading.Thread(target=drain, args=(main_r, main_got), daemon=True),
                   threading.Thread(target=drain, args=(pre_r, pre_got, preempt_open), daemon=True)]
        for t in readers:
            t.start()
        rp_codes: list[int] = []
        rp = threading.Thread(target=lambda: rp_codes.append(path.serve_return_path()), daemon=True)
        rp.start()
        # The bulk stream only once the request is being served (so it is never done before it).
        idstr = b"pc.ram"
        body = struct.pack(">QIB", REQ_FIRST * 4096, 2048 * 4096, len(idstr)) + idstr
        rp_dst.sendall(struct.pack(">HH", RpMessage.REQ_PAGES_ID, len(body)) + body)
        wait_until(path.urgent_pending, "the request to be served")
        bulk_rc: list[int] = []
        bulk = threading.Thread(target=lambda: bulk_rc.append(path.run_bulk()), daemon=True)
        bulk.start()
        try:
            # The preempt reader does not read: the return-path thread is stuck in the middle
            # of the 8 MiB it was asked for. The bulk stream pauses, but never for good.
            wait_until(lambda: path.counters()["bulk_pauses_capped"] >= 3, "bounded pauses")
            assert path.urgent_pending()
            c = path.counters()
            assert c["bulk_pauses"] >= c["bulk_pauses_capped"] >= 3
            assert c["bulk_pause_ns"] >= SourcePath.PAUSE_MAX_NS      # the first one: as long as it may
            moved = c["main_bytes"]
            wait_until(lambda: path.counters()["main_bytes"] > moved, "bulk progress between bounded pauses")
            assert not bulk_rc, "the bulk stream finished while it should have been pausing"
            # The destination reads again: the requested pages go, the urgent work ends, and
            # from then on the bulk stream never pauses.
            preempt_open.set()
            wait_until(lambda: not path.urgent_pending(), "the urgent pages to be taken in")
            pauses = path.counters()["bulk_pauses"]
            bulk.join(30)
            assert bulk_rc == [SourcePath.DONE]
            c = path.counters()
            assert c["bulk_pauses"] == pauses
            assert c["requests"] == 1
            assert c["request_pages_sent"] == 2048
            # every page went once: the requested ones on preempt, the rest on main
            assert c["preempt_pages_normal"] + c["preempt_pages_zero"] == 2048
            assert c["main_pages_normal"] + c["main_pages_zero"] == PAGES - 2048
        finally:
            path.stop()
            rp_dst.close()
            rp.join(10)
            bulk.join(10)
            for s in (main_w, pre_w):
                s.shutdown(socket.SHUT_WR)
            preempt_open.set()
            for t in readers:
                t.join(10)
            for s in (main_w, main_r, pre_w, pre_r, rp_src):
                s.close()


def test_no_pause_without_preempt_or_requests() -> None:
    with RamBlock("pc.ram", 1024 * 4096, PAGE_4K, "anon") as block:
        path = SourcePath([block], 2)
        path.dirty[0].set_range(0, 1024)
        path.configure(preempt=True)
        main_w, main_r = tcp_pair()
        got = [0]
        t = threading.Thread(target=drain, args=(main_r, got), daemon=True)
        t.start()
        path.set_channel(CHAN_MAIN, main_w)
        assert not path.urgent_pending()
        assert path.run_bulk() == SourcePath.DONE
        assert path.counters()["bulk_pauses"] == 0
        main_w.shutdown(socket.SHUT_WR)
        t.join(10)
        main_w.close()
        main_r.close()
