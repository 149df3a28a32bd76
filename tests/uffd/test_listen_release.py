"""The destination's fault service and preempt receiver wait for LISTEN in C (a go fd:
DestinationPath.serve_faults, Receiver.run_after): a thread released by a Python event would
first need the GIL, which the switch's thread holds up to RUN, and the guest's first faults would
wait for it. Real userfaultfd, real pipes, a real thread faulting; the return path and the
preempt channel are socketpairs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from postcopy import _datapath as dp
from uffd import Feature, RamBlock, RegisterMode, Userfaultfd
from uffd import memtouch as mt

from .conftest import Service, Toucher, serving
from .records import Feed, encode, page, read

PAGE = 4096


def faults_seen(path: dp.DestinationPath) -> int:
    return int(path.counters().faults)


def test_stopped_before_listen_it_returns_without_serving(
        make_block: Callable[..., RamBlock], pipes: Callable[[], tuple[int, int]]) -> None:
    path = dp.DestinationPath([make_block("pc.ram", 16 * PAGE)])
    stop, go = pipes(), pipes()
    s = Service(path, stop[0], go[0])
    assert not s.ended(0.1)         # waiting for LISTEN
    os.write(stop[1], b"x")
    assert s.ended(5.0)
    assert s.rc == 0


def test_a_go_fd_that_is_closed_is_an_error(make_block: Callable[..., RamBlock],
                                            pipes: Callable[[], tuple[int, int]]) -> None:
    path = dp.DestinationPath([make_block("pc.ram", 16 * PAGE)])
    stop = pipes()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    s = Service(path, stop[0], r)
    assert s.ended(5.0)
    assert s.rc is not None
    assert s.rc < 0


def test_a_fault_waits_for_listen_then_is_requested(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    block = make_block("pc.ram", 16 * PAGE)
    path = dp.DestinationPath([block])
    uffd = make_uffd(Feature.THREAD_ID, user_mode_only=True)
    with serving(path, pipes) as (go, rp_far):
        uffd.register(block.addr, block.used_length, RegisterMode.MISSING)
        path.attach_uffd(uffd.fileno())
        toucher = Toucher(mt.read_byte, block, 3 * PAGE)
        assert toucher.is_blocked()
        assert faults_seen(path) == 0       # the fault is pending; the service has not read it
        os.write(go, b"g")                  # LISTEN
        deadline = time.monotonic() + 5.0
        while faults_seen(path) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert faults_seen(path) == 1
        assert rp_far.recv(64)              # a REQ_PAGES went up the return path
        uffd.zeropage(block.addr + 3 * PAGE, PAGE)    # answer it: the thread runs on
        assert toucher.wait() == 0


class PreemptReceiver:
    """Receiver.run_after(go) of a preempt channel on its own thread."""

    def __init__(self, path: dp.DestinationPath, feed: Feed, go_fd: int) -> None:
        self.rx = dp.Receiver(path, feed.ours, dp.RX_PREEMPT, 0)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(go_fd,), daemon=True)
        self.thread.start()

    def _run(self, go_fd: int) -> None:
        self.code = self.rx.run_after(go_fd)

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def test_the_preempt_receiver_places_nothing_before_listen(
        make_block: Callable[..., RamBlock], pipes: Callable[[], tuple[int, int]]) -> None:
    block = make_block("pc.ram", 16 * PAGE)
    path = dp.DestinationPath([block])
    feed = Feed(encode([("pc.ram", 5 * PAGE, page(5))]))    # a page that came early, then EOS
    go = pipes()
    try:
        r = PreemptReceiver(path, feed, go[0])
        assert not r.ended(0.1)
        assert r.rx.counters()[0] == 0              # it waits in the socket
        assert read(block, 5 * PAGE, PAGE) == bytes(PAGE)
        os.write(go[1], b"g")                       # LISTEN
        assert r.ended(5.0)
        assert r.code == dp.Receiver.EOS
        assert read(block, 5 * PAGE, PAGE) == page(5)
    finally:
        feed.close()


def test_a_preempt_channel_that_hangs_up_before_listen_ends_the_wait(
        make_block: Callable[..., RamBlock], pipes: Callable[[], tuple[int, int]]) -> None:
    path = dp.DestinationPath([make_block("pc.ram", 16 * PAGE)])
    feed = Feed(b"", close=True)
    go = pipes()
    try:
        r = PreemptReceiver(path, feed, go[0])
        assert r.ended(5.0)         # no LISTEN needed to notice the peer is gone
        assert r.code == dp.Receiver.EOF
    finally:
        feed.close()


def test_listen_registers_every_block_attaches_and_releases_the_service(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    plain = make_block("pc.ram", 16 * PAGE)
    prefilled = make_block("pc.rom", 16 * PAGE, PAGE, "memfd")
    prefilled.prefill()
    path = dp.DestinationPath([plain, prefilled])
    assert path.minor == (False, True)
    uffd = make_uffd(Feature.THREAD_ID | Feature.MISSING_SHMEM | Feature.MINOR_SHMEM, user_mode_only=True)
    with serving(path, pipes) as (go, rp_far):
        path.listen(uffd.fileno(), go)      # LISTEN: both registered, the service released
        # a prefilled page not placed yet is in the file but not mapped: a MINOR fault, requested
        toucher = Toucher(mt.read_byte, prefilled, 2 * PAGE)
        assert rp_far.recv(64)
        assert toucher.is_blocked()
        uffd.continue_(prefilled.addr + 2 * PAGE, PAGE)
        assert toucher.wait() == 0
        toucher = Toucher(mt.read_byte, plain, 5 * PAGE)     # and a missing one in the other block
        assert rp_far.recv(64)
        uffd.zeropage(plain.addr + 5 * PAGE, PAGE)
        assert toucher.wait() == 0
        assert faults_seen(path) == 2


def test_listen_names_the_block_the_kernel_refused(
        make_block: Callable[..., RamBlock], make_uffd: Callable[..., Userfaultfd],
        pipes: Callable[[], tuple[int, int]]) -> None:
    gone = make_block("pc.rom", 16 * PAGE)
    path = dp.DestinationPath([make_block("pc.ram", 16 * PAGE), gone])
    gone.close()        # its memory is unmapped: the kernel refuses to register it
    uffd = make_uffd(Feature.THREAD_ID, user_mode_only=True)
    go = pipes()
    with pytest.raises(OSError, match=r"registering RAM block 'pc\.rom'"):
        path.listen(uffd.fileno(), go[1])
    os.set_blocking(go[0], False)
    with pytest.raises(BlockingIOError):
        os.read(go[0], 1)       # the fault service was not released
