"""A requested page the bulk stream already took goes again on the preempt channel (once): the
destination asks only for pages it has not placed, so that copy is still on its way, however
long ago the destination's TCP acknowledged it (its receiver may be starved behind megabytes).
Against a QEMU destination (send-once) it is skipped. Real TCP over loopback; C threads."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from postcopy._datapath import CHAN_MAIN, CHAN_PREEMPT, SourcePath
from postcopy.wire import RpMessage
from uffd import PAGE_4K, RamBlock
from uffd.memtouch import write_byte

from .conftest import drain, tcp_pair, wait_until

PAGES = 64
ASKED = 5


def _request(rp: socket.socket, page: int) -> None:
    idstr = b"pc.ram"
    body = struct.pack(">QIB", page * 4096, 4096, len(idstr)) + idstr
    rp.sendall(struct.pack(">HH", RpMessage.REQ_PAGES_ID, len(body)) + body)


@pytest.mark.parametrize("send_once", [False, True])
def test_a_page_the_bulk_stream_took_long_ago_is_sent_again_once(send_once: bool) -> None:
    with RamBlock("pc.ram", PAGES * 4096, PAGE_4K, "anon") as block:
        for p in range(PAGES):
            write_byte(block, p * 4096, 0x5A)
        path = SourcePath([block], 2)
        path.dirty[0].set_range(0, PAGES)
        path.configure(preempt=True)
        path.set_send_once(send_once)
        main_w, main_r = tcp_pair()
        pre_w, pre_r = tcp_pair()
        rp_src, rp_dst = socket.socketpair()
        path.set_channel(CHAN_MAIN, main_w)
        path.set_channel(CHAN_PREEMPT, pre_w)
        path.set_return_path(rp_src)
        main_got, pre_got = [0], [0]
        readers = [threading.Thread(target=drain, args=(main_r, main_got), daemon=True),
                   threading.Thread(target=drain, args=(pre_r, pre_got), daemon=True)]
        for t in readers:
            t.start()
        rp_codes: list[int] = []
        rp = threading.Thread(target=lambda: rp_codes.append(path.serve_return_path()), daemon=True)
        try:
            assert path.run_bulk() == SourcePath.DONE      # every page went on main, and was read
            wait_until(lambda: main_got[0] >= PAGES * 4096, "the main channel to be read")
            time.sleep(0.05)        # acknowledged long ago (a 20 ms window used to skip it now)
            rp.start()
            _request(rp_dst, ASKED)
            _request(rp_dst, ASKED)         # asked again: not sent a third time
            wait_until(lambda: path.counters()["requests"] == 2, "both requests to be served")
            c = path.counters()
            if send_once:
                assert c["request_pages_skipped"] == 2
                assert c["resent_target_pages"] == 0
                assert c["preempt_pages_normal"] == 0
            else:
                assert c["resent_target_pages"] == 1
                assert c["request_pages_skipped"] == 1
                wait_until(lambda: pre_got[0] >= 4096, "the page on the preempt channel")
        finally:
            path.stop()
            rp_dst.close()
            if rp.ident is not None:
                rp.join(10)
            for s in (main_w, pre_w):
                s.shutdown(socket.SHUT_WR)
            for t in readers:
                t.join(10)
            for s in (main_w, main_r, pre_w, pre_r, rp_src):
                s.close()
