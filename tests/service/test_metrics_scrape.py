"""/metrics of both roles, scraped during a real loopback migration and after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import (
    GUEST,
    free_port,
    postcopy,
    promtool_check,
    read_json,
    samples,
    scrape,
    state,
    stop,
    total,
    value,
    wait_for,
)

pytestmark = pytest.mark.root


def test_scrape_during_and_after_matches_the_reports(tmp_path: Path) -> None:
    listen, dport, sport = free_port(), free_port(), free_port()
    djson, sjson = tmp_path / "dest.json", tmp_path / "source.json"
    dest = postcopy("dest", "--listen", f"127.0.0.1:{listen}", *GUEST, "--guest-rate", "20000", "--metrics-port", str(dport),
                    "--json", str(djson), "--linger", "20", "--run-after", "0.1", log=tmp_path / "dest.log")
    # a 24 MB/s cap stretches the 64 MiB postcopy phase to ~3 s, so there is a "during"
    src = postcopy("source", "--connect", f"127.0.0.1:{listen}", *GUEST, "--metrics-port", str(sport),
                   "--bandwidth-cap", "24M", "--warmup", "0.1", "--guest-rate", "20000", "--json", str(sjson), "--linger", "20",
                   log=tmp_path / "source.log")
    try:
        def running() -> dict | None:
            parsed = samples(scrape(dport))
            received = total(parsed, "postcopy_pages_received_total")
            if state(parsed) == "postcopy-active" and 0 < received < 16480:
                return parsed
            return None

        during = wait_for(running, 60, "the destination in postcopy-active with pages still missing")
        assert isinstance(during, dict)
        text_during = scrape(dport)
        promtool_check(text_during)
        promtool_check(scrape(sport))
        assert value(during, "postcopy_ram_total_bytes") == 16480 * 4096
        assert 0 < value(during, "postcopy_ram_remaining_bytes") < 16480 * 4096

        wait_for(lambda: djson.exists() and sjson.exists(), 60, "both JSON reports")
        d, s = read_json(djson), read_json(sjson)
        after = samples(scrape(dport))
        safter = samples(scrape(sport))
        promtool_check(scrape(dport))
        promtool_check(scrape(sport))

        assert d["status"] == s["status"] == "completed"
        assert state(after) == state(safter) == "completed"
        # destination: pages, bytes, faults against its report
        # the channels received every page once, plus requested pages that the source sent
        # again on preempt because they were still queued behind the bulk stream (4 KiB guest)
        assert d["pages"]["received"] == 16480
        assert total(after, "postcopy_pages_received_total") == 16480 + d["duplicate_host_pages"]
        assert value(after, "postcopy_page_faults_total") == d["remote_faults"] > 0
        assert value(after, "postcopy_page_requests_sent_total") == d["requests_sent"]
        assert total(after, "postcopy_received_bytes_total") == d["timeline"][-1]["bytes"]
        assert value(after, "postcopy_fault_latency_seconds_count") == d["fault_latency_us"]["count"]
        # its parts: every request written is timed; a reply is timed when the requested page lands
        assert value(after, "postcopy_fault_request_delay_seconds_count") == d["requests_sent"]
        assert 0 < value(after, "postcopy_page_request_latency_seconds_count") <= d["requests_sent"]
        assert value(after, "postcopy_fault_latency_seconds_bucket", le="+Inf") == d["latency_histogram"]["count"]
        assert value(after, "postcopy_ram_remaining_bytes") == 0
        assert value(after, "postcopy_vcpu_blocktime_seconds_total", vcpu="1") >= 0
        # source: the same pages and bytes went out (plus requested pages sent again on preempt)
        resent = s["counters"]["resent_target_pages"]
        assert total(safter, "postcopy_pages_sent_total") == s["pages"]["normal"] + s["pages"]["zero"] == 16480 + resent
        assert value(safter, "postcopy_pages_sent_total", channel="main", kind="normal") == s["counters"]["main_pages_normal"]
        assert total(safter, "postcopy_sent_bytes_total") == s["bytes_transferred"]
        # the background stream stood aside for requested pages, as often and as long as it reported
        assert value(safter, "postcopy_bulk_pauses_total") == s["counters"]["bulk_pauses"] > 0
        assert value(safter, "postcopy_bulk_pause_seconds_total") == pytest.approx(s["counters"]["bulk_pause_ns"] / 1e9)
        assert total(after, "postcopy_received_bytes_total") <= s["bytes_transferred"]
        assert value(safter, "postcopy_page_requests_received_total") == s["requests_received"]
        # our destination sent its (4 KiB) requests on the preempt channel's way back
        assert value(safter, "postcopy_page_requests_preempt_total") == s["counters"]["requests_preempt"] > 0
        assert value(safter, "postcopy_downtime_seconds") == pytest.approx(s["downtime_ms"] / 1e3, abs=1e-3)
        # the series that stay at zero until they happen are there
        assert value(after, "postcopy_recoveries_total") == 0
        assert value(after, "postcopy_paused_seconds_total") == 0
        assert value(after, "postcopy_protocol_errors_total", kind="truncated") == 0
        # counters never went backwards between the two scrapes
        assert total(after, "postcopy_pages_received_total") >= total(during, "postcopy_pages_received_total")
        assert d["timeline"][-1]["pages"] == 16480
        assert len(d["timeline"]) >= 5            # sampled every 100 ms over a ~1-3 s migration
        for a, b in zip(d["timeline"], d["timeline"][1:], strict=False):
            assert b["t"] > a["t"]
            assert b["pages"] >= a["pages"]
            assert b["faults"] >= a["faults"]
    finally:
        stop(dest, src)
