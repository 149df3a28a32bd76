"""Prefetch that follows the guest, in whole migrations over loopback TCP and userfaultfd:
a sequential guest needs far fewer remote faults with it, nothing is sent twice, and a
random guest gets (almost) nothing sent ahead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import harness
import pytest
from harness import Outcome, check, migrate

from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root

SIZE = 128 << 20
SPEC = GuestSpec.simple(SIZE, PAGE_4K, vcpus=2, pattern="seq")
PAGES = sum(b.size for b in SPEC.blocks) // 4096      # the main block and the small ones next to it


def sent_pages(o: Outcome) -> int:
    c = o.source.counters
    return c["main_pages_normal"] + c["main_pages_zero"] + c["preempt_pages_normal"] + c["preempt_pages_zero"]


def test_sequential_guest_needs_far_fewer_remote_faults() -> None:
    spec = SPEC
    # the background stream capped: the guest walks ahead of it whatever the machine's speed (uncapped,
    # the bulk stream now keeps ahead of a sequential guest on its own and there is little to compare)
    cap = 32 << 20
    off = migrate(spec, preempt=True, cap=cap, source_options={"prefetch": False})
    check(off, spec)
    assert off.source.prefetch is None
    on = migrate(spec, preempt=True, cap=cap)
    check(on, spec)
    pf = on.source.prefetch
    assert pf is not None
    assert pf.hits > 0, pf
    assert pf.pages_sent > PAGES // 10, pf
    assert pf.wasted_estimate < pf.pages_sent // 2, pf
    assert off.dest.remote_faults > 100, "the guest did not run ahead of the stream: nothing to compare"
    assert on.dest.remote_faults * 3 < off.dest.remote_faults, (on.dest.remote_faults, off.dest.remote_faults)
    # send-once is off (a built-in destination): only requested pages may go twice, never a page sent ahead
    assert sent_pages(on) - on.source.counters["resent_target_pages"] == PAGES


class _SendOnceSource(Source):
    """A source that sends every page once, as it does to QEMU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path.set_send_once(True)


def test_prefetch_never_sends_a_page_twice_in_send_once_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "Source", _SendOnceSource)
    spec = SPEC
    o = migrate(spec, preempt=True)
    check(o, spec)
    assert o.source.prefetch is not None
    assert o.source.prefetch.pages_sent > 0
    assert o.source.counters["resent_target_pages"] == 0
    assert sent_pages(o) == PAGES
    assert o.dest.duplicate_host_pages == 0


def test_random_guest_gets_next_to_nothing_sent_ahead() -> None:
    spec = GuestSpec.simple(SIZE, PAGE_4K, vcpus=2, pattern="random")
    o = migrate(spec, preempt=True)
    check(o, spec)
    pf = o.source.prefetch
    assert pf is not None
    assert o.dest.remote_faults > 100
    assert pf.pages_sent < PAGES // 100, pf


def test_no_prefetch_without_preempt() -> None:
    spec = GuestSpec.simple(32 << 20, PAGE_4K, vcpus=2, pattern="seq")
    o = migrate(spec, preempt=False)
    check(o, spec)
    assert o.source.prefetch is None
    assert o.source.counters["prefetch_pages_sent"] == 0


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_demo_reports_prefetch(tmp_path: Path, prefetch: bool) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "postcopy", "demo", "--size", "64M", "--progress", "none", "--json", str(out),
         "--prefetch" if prefetch else "--no-prefetch"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    assert report["status"] == "completed"
    assert report["config"]["prefetch"] is prefetch
    if not prefetch:
        assert report["prefetch"] is None
        return
    pf = report["prefetch"]
    assert set(pf) == {"pages_sent", "pages_used", "windows", "hits", "misses", "wasted_estimate", "wasted_fraction"}
    assert pf["pages_sent"] > 0
    assert pf["wasted_estimate"] == pf["pages_sent"] - pf["pages_used"]
    assert "prefetch sent" in proc.stdout
