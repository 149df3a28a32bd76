"""The source's prefetch and hot set series, scraped after a real loopback migration that
pushed a hot set and recorded the next one, against its JSON report and the recorded file."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest

from postcopy.hotset import HotBlock, HotSet

from .conftest import free_port, postcopy, promtool_check, read_json, samples, scrape, stop, value, wait_for

pytestmark = pytest.mark.root

GUEST = ["--size", "64M", "--vcpus", "2", "--pattern", "seq", "--guest-rate", "20000"]


def test_prefetch_and_hot_set_series_match_the_report(tmp_path: Path) -> None:
    # the last 2048 pages of pc.ram: the capped bulk stream gets there last, so they are pushed
    hot = HotSet((HotBlock("pc.ram", 64 << 20, 4096),), array("Q", [0, 16384 - 2048, 2048]))
    hot.save(tmp_path / "in.hot")
    listen, dport, sport = free_port(), free_port(), free_port()
    djson, sjson = tmp_path / "dest.json", tmp_path / "source.json"
    dest = postcopy("dest", "--listen", f"127.0.0.1:{listen}", *GUEST, "--json", str(djson),
                    "--metrics-port", str(dport), "--linger", "20", log=tmp_path / "dest.log")
    src = postcopy("source", "--connect", f"127.0.0.1:{listen}", *GUEST, "--metrics-port", str(sport),
                   "--bandwidth-cap", "24M", "--warmup", "0.1", "--json", str(sjson), "--linger", "20",
                   "--hot-set", str(tmp_path / "in.hot"), "--record-hot-set", str(tmp_path / "out.hot"),
                   log=tmp_path / "source.log")
    try:
        wait_for(lambda: djson.exists() and sjson.exists(), 90, "both JSON reports")
        s = read_json(sjson)
        assert s["status"] == "completed"
        text = scrape(sport)
        promtool_check(text)
        m = samples(text)
        pf, hs, c = s["prefetch"], s["hot_set"], s["counters"]
        # a sequential guest: the prefetch follows it
        assert pf["pages_sent"] > 0
        assert value(m, "postcopy_prefetch_pages_sent_total") == pf["pages_sent"]
        assert value(m, "postcopy_prefetch_pages_used_total") == pf["pages_used"]
        assert value(m, "postcopy_prefetch_windows_total") == pf["windows"]
        assert value(m, "postcopy_prefetch_requests_total", result="hit") == pf["hits"]
        assert value(m, "postcopy_prefetch_requests_total", result="miss") == pf["misses"]
        assert value(m, "postcopy_prefetch_wasted_pages") == pf["wasted_estimate"]
        # the hot set: all of it fits, most of it pushed, on both channels' counts as reported
        assert hs["pages"] == 2048
        assert hs["warnings"] == []
        assert value(m, "postcopy_hot_set_pages") == 2048
        assert hs["pushed"] > 1024
        assert value(m, "postcopy_hot_set_pages_pushed_total", channel="preempt") == c["hot_pages_preempt"] > 0
        assert value(m, "postcopy_hot_set_pages_pushed_total", channel="main") == hs["pushed"] - c["hot_pages_preempt"]
        # the background stream stood aside for the requested pages as many times as it reported
        assert value(m, "postcopy_bulk_pauses_total") == c["bulk_pauses"]
        assert value(m, "postcopy_bulk_pause_seconds_total") == pytest.approx(c["bulk_pause_ns"] / 1e9)
        # what it recorded (the pushed pages too) is in the file it wrote
        out = HotSet.load(tmp_path / "out.hot")
        assert out.pages == hs["recorded"] == value(m, "postcopy_hot_set_pages_recorded_total")
        assert out.pages >= hs["pushed"]
    finally:
        stop(dest, src)
