"""A control message's time is when it came in, not when the source's return-path thread got to
read it, nor when what came in behind it did: that thread sends requested pages itself, and
PONG 3 (the downtime's end) often comes while it is sending the started guest's first huge
pages, with the guest's next requests right behind it. Real TCP over loopback; C threads."""

from __future__ import annotations

import socket
import struct
import threading
import time

from postcopy._datapath import CHAN_PREEMPT, SourcePath
from postcopy.wire import RpMessage
from uffd import PAGE_4K, RamBlock
from uffd.memtouch import write_byte

from .conftest import drain, tcp_pair, wait_until

PAGES = 1024        # 4 MiB asked at once: far more than the preempt channel's small buffers hold


def test_a_pong_that_came_while_pages_were_sent_counts_from_its_arrival() -> None:
    with RamBlock("pc.ram", PAGES * 4096, PAGE_4K, "anon") as block:
        for p in range(PAGES):
            write_byte(block, p * 4096, 0x5A)       # data, not zero pages: 4 MiB to send
        path = SourcePath([block], 2)
        path.dirty[0].set_range(0, PAGES)
        path.configure(preempt=True)
        pre_w, pre_r = tcp_pair(small=True)
        rp_dst, rp_src = tcp_pair()
        path.set_channel(CHAN_PREEMPT, pre_w)
        path.set_return_path(rp_src)
        codes: list[int] = []
        rp = threading.Thread(target=lambda: codes.append(path.serve_return_path()), daemon=True)
        read_preempt = threading.Event()
        got = [0]
        reader = threading.Thread(target=drain, args=(pre_r, got, read_preempt), daemon=True)
        reader.start()
        rp.start()
        try:
            idstr = b"pc.ram"
            body = struct.pack(">QIB", 0, PAGES * 4096, len(idstr)) + idstr
            rp_dst.sendall(struct.pack(">HH", RpMessage.REQ_PAGES_ID, len(body)) + body)
            wait_until(lambda: path.counters()["requests"] == 1, "the request to be taken")
            sent_at = time.monotonic_ns()
            rp_dst.sendall(struct.pack(">HHI", RpMessage.PONG, 4, 3))
            time.sleep(0.05)    # the return-path thread is still blocked sending the pages
            # a request behind it, before the thread reads either: the PONG keeps its own arrival
            later_at = time.monotonic_ns()
            rp_dst.sendall(struct.pack(">HHQI", RpMessage.REQ_PAGES, 12, 0, 4096))
            time.sleep(0.05)
            assert not codes, "the pages cannot all have gone: nobody reads the preempt channel"
            released_at = time.monotonic_ns()
            read_preempt.set()
            rp.join(10)
            assert codes == [SourcePath.RP_CONTROL]
            assert path.counters()["host_pages_sent"] == PAGES     # the request was served whole first
            assert sent_at <= path.rp_control_ns < later_at, (
                f"PONG stamped {(path.rp_control_ns - sent_at) / 1e6:.1f} ms after it was sent; the request "
                f"behind it came {(later_at - sent_at) / 1e6:.1f} ms, the pages were let through "
                f"{(released_at - sent_at) / 1e6:.1f} ms after it")
        finally:
            path.stop()
            rp_dst.close()
            rp.join(10)
            pre_w.shutdown(socket.SHUT_WR)
            read_preempt.set()
            reader.join(10)
            for s in (pre_w, pre_r, rp_src):
                s.close()
