"""The guest on a userfaultfd destination: real kernel, real missing pages.

A vCPU that touches a missing page blocks in the kernel (its C thread holds no
GIL) until the page is placed; this Python test is the page-fault service and
places the source's content with UFFDIO_COPY, like a postcopy destination.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import pytest

import uffd
from postcopy.guest import Guest, MismatchKind, Pattern

KiB = 1024
MiB = 1024 * KiB
SIZES = (64 * KiB, 1 * MiB, 256 * KiB)
HUGE_2M = 2 * MiB


class Destination:
    """Destination memory registered MISSING, and a fault service copying from the source."""

    def __init__(self, uf: uffd.Userfaultfd, src: list[Any] | None, dst: list[Any]) -> None:
        self.uf, self.src, self.dst = uf, src, dst
        self.fresh: Guest | None = None  # set: serve its initial content (no source)
        self.placed: set[int] = set()  # host page addresses
        self.faults = 0
        for m in dst:
            uf.register(m.addr, m.length, uffd.RegisterMode.MISSING)
        self._poll = select.poll()
        self._poll.register(uf.fileno(), select.POLLIN)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _locate(self, address: int) -> tuple[int, Any, int]:
        for index, d in enumerate(self.dst):
            if d.addr <= address < d.addr + d.length:
                offset = (address - d.addr) & ~(d.page_size - 1)
                return index, d, offset
        raise AssertionError(f"fault at {address:#x} outside every region")

    def place(self, address: int, content: bytes | None = None) -> None:
        """Place the host page holding ``address``: the source's content unless told otherwise."""
        index, d, offset = self._locate(address)
        if d.addr + offset in self.placed:
            return
        if content is None and self.fresh is not None:
            content = self.fresh.initial_content(index, offset, d.page_size)
        try:
            if content is None:
                assert self.src is not None
                self.uf.copy(d.addr + offset, self.src[index].addr + offset, d.page_size)
            elif content == bytes(len(content)) and d.page_size == 4096:  # no huge ZEROPAGE
                self.uf.zeropage(d.addr + offset, d.page_size)
            else:
                self.uf.copy(d.addr + offset, content, d.page_size)
        except uffd.PageAlreadyPresent:
            pass
        self.placed.add(d.addr + offset)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self._poll.poll(timeout_ms))

    def serve_once(self, timeout_ms: int = 10) -> None:
        if not self.poll(timeout_ms):
            return
        for event in self.uf.read_events():
            assert isinstance(event, uffd.PageFault)
            self.faults += 1
            self.place(event.address)

    def start_serving(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.serve_once()

        self._thread = threading.Thread(target=loop, name="fault-service")
        self._thread.start()

    def stop_serving(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def place_all(self) -> None:
        """The background stream's job: everything not yet placed."""
        for d in self.dst:
            for offset in range(0, d.length, d.page_size):
                self.place(d.addr + offset)


def run_source(src: list[Any], config: dict[str, Any]) -> tuple[bytes, tuple[int, ...]]:
    with Guest([m.region() for m in src], **config) as source:
        source.fill_initial()
        source.start()
        time.sleep(0.05)
        source.stop()
        return source.save_state(), source.stats().steps


@pytest.mark.parametrize("nvcpus", [1, 4])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_vcpu_blocks_on_missing_page_and_continues_once_placed(
    memory: Any, wait_until: Any, pattern: Pattern, nvcpus: int
) -> None:
    src = [memory(n) for n in SIZES]
    dst = [memory(n) for n in SIZES]
    config: dict[str, Any] = {
        "nvcpus": nvcpus,
        "pattern": pattern,
        "seed": 0xFA17,
        "write_percent": 50,
    }
    state, src_steps = run_source(src, config)

    with uffd.Userfaultfd(user_mode_only=True) as uf:
        dest_mem = Destination(uf, src, dst)
        with Guest([m.region() for m in dst], **config) as dest:
            dest.load_state(state)
            dest.start()
            # every page is missing: each vCPU faults in its first access (one event
            # per blocked thread) and stays there while nobody places the page
            pending: list[int] = []

            def collect() -> bool:
                if dest_mem.poll(10):
                    for event in uf.read_events():
                        assert isinstance(event, uffd.PageFault)
                        pending.append(event.address)
                return len(pending) == nvcpus

            wait_until(collect, f"{nvcpus} vCPU(s) to fault")
            time.sleep(0.05)
            assert dest.stats().steps == src_steps
            assert dest.running == nvcpus
            dest.request_stop()
            assert not dest.wait(timeout=0.1), "a vCPU blocked in a fault cannot stop"
            assert dest.stats().steps == src_steps
            for address in pending:
                dest_mem.place(address)
            assert dest.wait(timeout=10), "vCPUs did not resume after their pages were placed"
            dest.join()
            # each vCPU finished exactly the access it was blocked in, then stopped
            assert dest.stats().steps == tuple(s + 1 for s in src_steps)
            assert 1 <= len(dest_mem.placed) <= nvcpus
            before = dest.stats().steps

            # now a free-running guest with the fault service on its own thread
            dest_mem.start_serving()
            try:
                dest.start()
                wait_until(
                    lambda: (
                        all(a > b for a, b in zip(dest.stats().steps, before, strict=True))
                        and len(dest_mem.placed) > nvcpus
                    ),
                    "every vCPU to run on pages placed on demand",
                )
                dest.stop()  # safe: faults are still being served
            finally:
                dest_mem.stop_serving()
            assert dest_mem.faults >= len(dest_mem.placed) - len(pending)

            dest_mem.place_all()
            result = dest.verify()
            assert result.ok, result.summary()


@pytest.mark.parametrize(
    ("served", "kind"),
    [("stale", MismatchKind.COUNTER), ("zero", MismatchKind.ZERO)],
)
def test_wrong_page_served_by_the_destination_is_reported(
    memory: Any, served: str, kind: MismatchKind
) -> None:
    src = [memory(n) for n in SIZES]
    dst = [memory(n) for n in SIZES]
    config: dict[str, Any] = {"nvcpus": 2, "pattern": Pattern.SEQ, "seed": 5, "write_percent": 100}
    with Guest([m.region() for m in src], **config) as source:
        source.fill_initial()
        source.run(500)  # writes every page of the 336 at least once
        state = source.save_state()
        r, offset = 1, 17 * 4096
        initial = source.initial_page(r, offset)
        assert any(initial)
    with uffd.Userfaultfd(user_mode_only=True) as uf:
        dest_mem = Destination(uf, src, dst)
        bad = initial if served == "stale" else bytes(4096)
        dest_mem.place(dst[r].addr + offset, bad)
        with Guest([m.region() for m in dst], **config) as dest:
            dest.load_state(state)
            dest_mem.place_all()
            result = dest.verify()
            assert result.pages_mismatched == 1, result.summary()
            ((region_index, off, detail),) = result.first_mismatches
            assert (region_index, off) == (r, offset)
            assert detail.kind is kind


@pytest.mark.hugetlb
@pytest.mark.parametrize("pattern", [Pattern.RANDOM, Pattern.HOT])
def test_guest_on_missing_hugetlb_pages(memory: Any, wait_until: Any, pattern: Pattern) -> None:
    """4 KiB target pages inside 2 MiB host pages: a fault places a whole host page."""
    src = [memory(8 * MiB, HUGE_2M), memory(256 * KiB)]
    dst = [memory(8 * MiB, HUGE_2M), memory(256 * KiB)]
    config: dict[str, Any] = {"nvcpus": 4, "pattern": pattern, "seed": 0x2222}
    state, src_steps = run_source(src, config)
    with uffd.Userfaultfd(user_mode_only=True) as uf:
        dest_mem = Destination(uf, src, dst)
        with Guest([m.region() for m in dst], **config) as dest:
            dest.load_state(state)
            dest_mem.start_serving()
            try:
                dest.start()
                wait_until(
                    lambda: all(a > b for a, b in zip(dest.stats().steps, src_steps, strict=True)),
                    "every vCPU to continue on huge pages placed on demand",
                )
                dest.stop()
            finally:
                dest_mem.stop_serving()
            assert any(
                a < dst[0].addr + dst[0].length and a >= dst[0].addr for a in dest_mem.placed
            )
            dest_mem.place_all()
            result = dest.verify()
            assert result.ok, result.summary()


@pytest.mark.hugetlb
@pytest.mark.parametrize("nvcpus", [1, 4])
def test_fresh_guest_boots_on_missing_memory(memory: Any, wait_until: Any, nvcpus: int) -> None:
    """No source at all: every page arrives on demand with its initial content
    (whole 2 MiB host pages for the hugetlb region, zero pages via ZEROPAGE)."""
    dst = [memory(4 * MiB, HUGE_2M), memory(128 * KiB), memory(1 * MiB)]
    with uffd.Userfaultfd(user_mode_only=True) as uf:
        dest_mem = Destination(uf, None, dst)
        with Guest([m.region() for m in dst], nvcpus=nvcpus, pattern=Pattern.HOT, seed=8) as guest:
            dest_mem.fresh = guest
            dest_mem.start_serving()
            try:
                guest.start()
                wait_until(
                    lambda: min(guest.stats().steps) > 1_000, "every vCPU to run 1000 accesses"
                )
                guest.stop()
            finally:
                dest_mem.stop_serving()
            assert dest_mem.faults > 0
            dest_mem.place_all()
            result = guest.verify()
            assert result.ok, result.summary()
