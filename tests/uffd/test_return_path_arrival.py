"""A control message's time is when it came in, not when the source's return-path thread got to
read it, nor when what came in behind it did: that thread sends requested pages itself, and
PONG 3 (the downtime's end) often comes while it is sending the started guest's first huge
pages, with the guest's next requests right behind it. Real TCP over loopback; C threads."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

from postcopy._datapath import CHAN_PREEMPT, SourcePath
from postcopy.wire import RpMessage
from uffd import PAGE_4K, RamBlock
from uffd.memtouch import write_byte

from .conftest import drain, tcp_pair, wait_until

PAGES = 1024        # 4 MiB asked at once: far more than the preempt channel's small buffers hold

SO_TIMESTAMPNS = 35     # <asm-generic/socket.h>; Python's socket module does not name it


def _wait_for_kernel_stamps() -> tuple[socket.socket, socket.socket]:
    """Linux stamps received packets only once some socket asked for it, and it turns that on in
    deferred work: a segment that comes in first carries no stamp (a fresh machine, where nothing
    else asked yet). Wait until a probe segment is stamped; the probe keeps it on until closed."""
    writer, reader = tcp_pair()
    reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        writer.sendall(b"x")
        _, ancillary, _, _ = reader.recvmsg(1, socket.CMSG_SPACE(16))
        if ancillary:
            return writer, reader
        time.sleep(0.01)
    raise AssertionError("the kernel did not stamp received segments within 10 s")


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
        probe = _wait_for_kernel_stamps()
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
            for s in (pre_w, pre_r, rp_src, *probe):
                s.close()


def _queued(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue, not yet read."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_while_pong_3_is_awaited_a_receive_reads_only_what_is_asked_for() -> None:
    # TCP stamps a receive with the last segment it read: a PONG read together with the request
    # behind it would take the request's time. So while PONG 3 is awaited, the return path reads
    # message by message; the segments it reads in parts keep one arrival each.
    with RamBlock("pc.ram", 16 * 4096, PAGE_4K, "anon") as block:
        path = SourcePath([block], 2)
        rp_dst, rp_src = tcp_pair()
        path.set_return_path(rp_src)
        probe = _wait_for_kernel_stamps()
        try:
            rp_dst.sendall(struct.pack(">HHI", RpMessage.PONG, 4, 3) + struct.pack(">HHQI", RpMessage.REQ_PAGES, 12, 0, 4096))
            wait_until(lambda: _queued(rp_src) == 24, "the two messages to come in")
            path.rp.small_reads_for(10)
            assert path.rp.fill(4) == 4       # the PONG's header only
            assert path.rp.fill(8) == 8       # and its body
            assert _queued(rp_src) == 16      # the request is still in the socket
            receives = int(path._s.rp.nreceives)
            assert receives == 1, "one segment read in two parts is one arrival"
            path.rp.small_reads_for(0)
            assert path.rp.fill(9) == 24      # the window over: a receive takes what is there
            assert _queued(rp_src) == 0
        finally:
            path.stop()
            for s in (rp_dst, rp_src, *probe):
                s.close()
