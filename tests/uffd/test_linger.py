"""Threads of a stream wait on the CPU for a while before they sleep: a destination channel's
receiver for its next bytes (Receiver.linger: the main channel's bulk stream always, the
preempt channel only while a thread waits for a page), the source's bulk sender for room in its
full socket (SourcePath.set_bulk_linger). On an idle virtual CPU a sleeping thread is woken
late, and the peer that wakes it pays for the wake-up too. Real userfaultfd, a real thread
faulting, real sockets; each thread's CPU time and yields are read from /proc."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from postcopy import _datapath as dp
from uffd import PAGE_4K, Feature, RamBlock, Userfaultfd
from uffd import memtouch as mt
from uffd._native import lib

from .conftest import Toucher, drain, serving, tcp_pair
from .records import encode, page, read

PAGE = 4096
WINDOW = 0.2    # seconds each phase watches the receiver


def test_each_channel_lingers_as_its_stream_needs_by_default() -> None:
    a, b = socket.socketpair()
    try:
        main = dp.Receiver(None, a, dp.RX_MAIN, 0)
        preempt = dp.Receiver(None, b, dp.RX_PREEMPT, 0)
        assert main.linger == (lib.PC_RX_BULK_LINGER_NS / 1e9, 0.0)
        assert preempt.linger == (0.0, lib.PC_RX_WAITED_LINGER_NS / 1e9)
        assert 0 < lib.PC_RX_BULK_LINGER_NS <= lib.PC_RX_WAITED_LINGER_NS <= 2_000_000     # bounded spins
    finally:
        a.close()
        b.close()


class ThreadClock:
    """CPU seconds and involuntary context switches (its yields, when others wanted the CPU) of
    one thread of this process, by its native id."""

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def read(self) -> tuple[float, int]:
        with open(f"/proc/self/task/{self.tid}/schedstat") as f:
            cpu = int(f.read().split()[0]) / 1e9
        with open(f"/proc/self/task/{self.tid}/status") as f:
            yields = next(int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches"))
        return cpu, yields

    def over(self, seconds: float) -> tuple[float, int]:
        cpu0, yields0 = self.read()
        time.sleep(seconds)
        cpu1, yields1 = self.read()
        return cpu1 - cpu0, yields1 - yields0


def spinning(cpu: float, yields: int) -> bool:
    return cpu > 0.02 or yields >= 3        # asleep: ~0 and 0


def test_a_main_channel_receive_lingers_on_the_cpu_then_sleeps() -> None:
    a, b = socket.socketpair()
    try:
        rx = dp.Receiver(None, a, dp.RX_MAIN, 0)
        tid: list[int] = []

        def receive() -> None:
            tid.append(threading.get_native_id())
            assert rx.input.fill(4) == 4

        for linger, spins in (((10.0, 0.0), True), ((0.0, 0.0), False), ((0.001, 0.0), False)):
            rx.linger = linger
            t = threading.Thread(target=receive, daemon=True)
            t.start()
            while not tid:
                time.sleep(0.001)
            time.sleep(0.01)
            cpu, yields = ThreadClock(tid.pop()).over(WINDOW)
            b.sendall(b"ping")
            t.join(5.0)
            assert not t.is_alive()
            assert rx.input.peek() == b"ping"
            rx.input.consume(4)
            assert spinning(cpu, yields) == spins, (linger, cpu, yields)
    finally:
        a.close()
        b.close()


def test_the_preempt_receiver_lingers_only_while_a_thread_waits_for_a_page(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    block = make_block("pc.ram", 16 * PAGE)
    path = dp.DestinationPath([block])
    uffd = make_uffd(Feature.THREAD_ID, user_mode_only=True)
    ours, theirs = socket.socketpair()
    stream = encode([("pc.ram", 3 * PAGE, page(3))], eos=False)
    rx = dp.Receiver(path, ours, dp.RX_PREEMPT, 0)
    rx.linger = (0.0, 10.0)         # long enough to be seen, whatever the machine's pace
    tid: list[int] = []
    code: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        try:
            code.append(rx.run())
        except dp.DataPathError:    # the test failed and hung up in the middle of the page
            code.append(-1)

    receiver = threading.Thread(target=run, daemon=True)
    try:
        with serving(path, pipes) as (go, rp_far):
            path.listen(uffd.fileno(), go)
            receiver.start()
            while not tid:
                time.sleep(0.001)
            clock = ThreadClock(tid[0])
            time.sleep(0.01)
            assert not spinning(*clock.over(WINDOW))            # nothing asked for: asleep
            toucher = Toucher(mt.read_byte, block, 3 * PAGE)
            assert rp_far.recv(64)                              # the page is requested
            assert toucher.is_blocked()
            theirs.sendall(stream[:PAGE // 2])                  # part of it: the receiver runs again
            time.sleep(0.01)
            assert spinning(*clock.over(WINDOW))                # ... and waits on its CPU for the rest
            theirs.sendall(stream[PAGE // 2:])
            assert toucher.wait() == page(3)[0]                # the thread read the page as sent
            assert read(block, 3 * PAGE, PAGE) == page(3)
            time.sleep(0.01)
            assert not spinning(*clock.over(WINDOW))            # nobody waits: asleep again
            theirs.sendall(encode([], eos=True))
            receiver.join(5.0)
            assert code == [dp.Receiver.EOS]
    finally:
        theirs.shutdown(socket.SHUT_RDWR)       # a receiver still running sees the end and returns
        if receiver.is_alive():
            receiver.join(5.0)
        ours.close()
        theirs.close()


@pytest.mark.parametrize(("linger", "spins"), [(10.0, True), (0.0, False)])
def test_the_bulk_sender_waits_for_room_on_its_cpu_then_sleeps(linger: float, spins: bool) -> None:
    assert 0 < lib.PC_SRC_BULK_LINGER_NS <= 2_000_000
    pages = 1024        # 4 MiB: far more than the small socket holds
    with RamBlock("pc.ram", pages * PAGE, PAGE_4K, "anon") as block:
        for p in range(pages):
            mt.write_byte(block, p * PAGE, 0x5A)
        path = dp.SourcePath([block], 2)
        path.dirty[0].set_range(0, pages)
        path.configure(preempt=False)
        path.set_bulk_linger(linger)
        writer, reader = tcp_pair(small=True)
        tid: list[int] = []
        code: list[int] = []

        def send() -> None:
            tid.append(threading.get_native_id())
            code.append(path.run_bulk())

        sender = threading.Thread(target=send, daemon=True)
        got = [0]
        draining = threading.Thread(target=drain, args=(reader, got), daemon=True)
        try:
            path.set_channel(dp.CHAN_MAIN, writer)
            sender.start()
            while not tid:
                time.sleep(0.001)
            time.sleep(0.05)        # the socket is full: nobody reads yet
            cpu, yields = ThreadClock(tid[0]).over(WINDOW)
            assert spinning(cpu, yields) == spins, (cpu, yields)
            draining.start()
            sender.join(20.0)
            assert code == [dp.SourcePath.DONE]     # every page went, once there was room
        finally:
            path.stop()
            sender.join(5.0)
            writer.shutdown(socket.SHUT_WR)
            if draining.ident is not None:
                draining.join(5.0)
            reader.close()
            writer.close()
        assert got[0] > pages * PAGE                # records: each page and its header
