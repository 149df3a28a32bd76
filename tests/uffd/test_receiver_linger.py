"""A channel's receiver waits for its next bytes on the CPU for a while before it sleeps
(Receiver.linger): the main channel's bulk stream always, the preempt channel only while a
thread waits for a page. On an idle virtual CPU a sleeping receiver is woken late, and its
sender pays for the wake-up too. Real userfaultfd, a real thread faulting, socketpairs; the
receiver's CPU time and yields are read from /proc per thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from postcopy import _datapath as dp
from uffd import Feature, RamBlock, Userfaultfd
from uffd import memtouch as mt
from uffd._native import lib

from .conftest import Toucher, serving
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
