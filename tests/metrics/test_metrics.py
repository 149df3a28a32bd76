"""Metrics: names, labels, hot-path updates, scrape-time values and exposition."""

from __future__ import annotations

import platform
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import postcopy

import metrics
from metrics import (
    CHANNELS,
    PAGE_KINDS,
    PROTOCOL_ERROR_KINDS,
    DestinationMetrics,
    MigrationSnapshot,
    MigrationStatus,
    SourceMetrics,
    make_metrics,
    serve_metrics,
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def families(registry: CollectorRegistry) -> dict[str, object]:
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_destination_series_exist_at_zero(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    assert isinstance(m, DestinationMetrics)
    value = registry.get_sample_value
    for channel in CHANNELS:
        for kind in PAGE_KINDS:
            assert value("postcopy_pages_received_total", {"channel": channel, "kind": kind}) == 0
        assert value("postcopy_received_bytes_total", {"channel": channel}) == 0
    for kind in PROTOCOL_ERROR_KINDS:
        assert value("postcopy_protocol_errors_total", {"kind": kind}) == 0
    for name in (
        "postcopy_page_faults_total",
        "postcopy_page_requests_sent_total",
        "postcopy_page_requests_resent_total",
        "postcopy_discard_ranges_received_total",
        "postcopy_recoveries_total",
        "postcopy_paused_seconds_total",
        "postcopy_blocktime_seconds_total",
    ):
        assert value(name) == 0, name
    assert value("postcopy_fault_latency_seconds_count") == 0
    assert value("postcopy_migration_state", {"postcopy_migration_state": "none"}) == 1
    # the source's names are absent: the role decides the direction
    assert value("postcopy_pages_sent_total", {"channel": "main", "kind": "normal"}) is None
    info = value(
        "postcopy_build_info",
        {"role": "destination", "version": "0.1.0", "python": platform.python_version(),
         "sans_io_core": "compiled" if postcopy.CORE_BUILD.compiled else "interpreted"},
    )
    assert info == 1


def test_source_series_and_direction(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "source")
    assert isinstance(m, SourceMetrics)
    m.preempt.normal_pages.inc(5)
    m.preempt.bytes.inc(5 * 4096 + 40)
    m.main.zero_pages.inc()
    m.page_requests.inc()
    m.request_service_latency.observe(30e-6)
    value = registry.get_sample_value
    assert value("postcopy_pages_sent_total", {"channel": "preempt", "kind": "normal"}) == 5
    assert value("postcopy_pages_sent_total", {"channel": "main", "kind": "zero"}) == 1
    assert value("postcopy_pages_sent_total", {"channel": "main", "kind": "normal"}) == 0
    assert value("postcopy_sent_bytes_total", {"channel": "preempt"}) == 5 * 4096 + 40
    assert value("postcopy_page_requests_received_total") == 1
    assert value("postcopy_page_request_service_seconds_bucket", {"le": "5e-05"}) == 1
    assert value("postcopy_page_request_service_seconds_bucket", {"le": "2.5e-05"}) == 0
    assert value("postcopy_page_faults_total") is None
    assert value("postcopy_blocktime_seconds_total") is None


def test_latency_histograms_span_5us_to_1s(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    for seconds in (3e-6, 20e-6, 0.0004, 0.7, 4.0):
        m.fault_latency.observe(seconds)
    m.fault_request_delay.observe(2e-6)
    m.page_request_latency.observe(18e-6)
    value = registry.get_sample_value
    assert value("postcopy_fault_latency_seconds_bucket", {"le": "5e-06"}) == 1
    assert value("postcopy_fault_latency_seconds_bucket", {"le": "0.0005"}) == 3
    assert value("postcopy_fault_latency_seconds_bucket", {"le": "1.0"}) == 4
    assert value("postcopy_fault_latency_seconds_bucket", {"le": "+Inf"}) == 5
    assert value("postcopy_fault_latency_seconds_count") == 5
    assert value("postcopy_fault_latency_seconds_sum") == pytest.approx(
        3e-6 + 20e-6 + 0.0004 + 0.7 + 4.0
    )
    assert value("postcopy_fault_request_delay_seconds_count") == 1
    assert value("postcopy_page_request_latency_seconds_bucket", {"le": "2.5e-05"}) == 1
    assert metrics.LATENCY_BUCKETS_SECONDS[0] == 5e-6
    assert metrics.LATENCY_BUCKETS_SECONDS[-1] == 1.0


def test_protocol_error_kinds_are_closed(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    m.protocol_error("bad_magic")
    m.protocol_error("offset_out_of_block")
    m.protocol_error("offset_out_of_block")
    m.protocol_error("never heard of it")
    value = registry.get_sample_value
    assert value("postcopy_protocol_errors_total", {"kind": "bad_magic"}) == 1
    assert value("postcopy_protocol_errors_total", {"kind": "offset_out_of_block"}) == 2
    assert value("postcopy_protocol_errors_total", {"kind": "other"}) == 1
    assert value("postcopy_protocol_errors_total", {"kind": "never heard of it"}) is None
    family = families(registry)["postcopy_protocol_errors"]
    assert {s.labels["kind"] for s in family.samples if s.name.endswith("_total")} == set(
        PROTOCOL_ERROR_KINDS
    )


def test_channel_lookup(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    assert m.channel("main") is m.main
    assert m.channel("preempt") is m.preempt
    with pytest.raises(ValueError, match="unknown channel 'return-path'"):
        m.channel("return-path")


def test_bad_role_and_reuse_are_refused(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="unknown role 'both'"):
        make_metrics(registry, "both")  # type: ignore[call-overload]
    make_metrics(registry, "source")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        make_metrics(registry, "source")


def test_metrics_are_frozen(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    with pytest.raises(AttributeError):
        m.page_faults = m.page_requests  # type: ignore[misc]


def test_snapshot_values_at_scrape_time(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    state = {"snap": MigrationSnapshot()}
    m.collector.bind(lambda: state["snap"], vcpu_count=3)
    value = registry.get_sample_value
    assert value("postcopy_vcpu_blocktime_seconds_total", {"vcpu": "2"}) == 0
    state["snap"] = MigrationSnapshot(
        status=MigrationStatus.POSTCOPY_PAUSED,
        pending_requests=7,
        ram_total_bytes=64 << 20,
        ram_remaining_bytes=48 << 20,
        setup_seconds=0.004,
        total_seconds=3.2,
        downtime_seconds=0.002,
        paused_seconds=1.5,
        blocktime_seconds=0.219,
        vcpu_blocktime_seconds=(0.219, 0.1, 0.05, 9.0),  # one more than the guest has: dropped
    )
    assert value("postcopy_migration_state", {"postcopy_migration_state": "postcopy-paused"}) == 1
    assert value("postcopy_migration_state", {"postcopy_migration_state": "none"}) == 0
    assert value("postcopy_page_requests_pending") == 7
    assert value("postcopy_ram_total_bytes") == 64 << 20
    assert value("postcopy_ram_remaining_bytes") == 48 << 20
    assert value("postcopy_setup_time_seconds") == pytest.approx(0.004)
    assert value("postcopy_total_time_seconds") == pytest.approx(3.2)
    assert value("postcopy_downtime_seconds") == pytest.approx(0.002)
    assert value("postcopy_paused_seconds_total") == pytest.approx(1.5)
    assert value("postcopy_blocktime_seconds_total") == pytest.approx(0.219)
    assert value("postcopy_vcpu_blocktime_seconds_total", {"vcpu": "0"}) == pytest.approx(0.219)
    assert value("postcopy_vcpu_blocktime_seconds_total", {"vcpu": "2"}) == pytest.approx(0.05)
    assert value("postcopy_vcpu_blocktime_seconds_total", {"vcpu": "3"}) is None
    states = [s for s in families(registry)["postcopy_migration_state"].samples]
    assert sorted(s.labels["postcopy_migration_state"] for s in states) == sorted(
        s.value for s in MigrationStatus
    )
    assert sum(s.value for s in states) == 1
    m.collector.unbind()
    assert value("postcopy_migration_state", {"postcopy_migration_state": "none"}) == 1
    assert value("postcopy_downtime_seconds") is None  # unknown until a migration reports it


def test_failing_provider_keeps_scrape_alive(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    m = make_metrics(registry, "destination")

    def broken() -> MigrationSnapshot:
        raise RuntimeError("role state torn down")

    m.collector.bind(broken)
    value = registry.get_sample_value
    assert value("postcopy_snapshot_errors_total") == 1
    assert value("postcopy_migration_state", {"postcopy_migration_state": "none"}) is None
    assert value("postcopy_pages_received_total", {"channel": "main", "kind": "normal"}) == 0
    assert "snapshot provider failed" in caplog.text
    before = value("postcopy_snapshot_errors_total")
    m.collector.bind(lambda: "active")  # type: ignore[arg-type,return-value]
    assert value("postcopy_snapshot_errors_total") == before + 1
    assert "not a MigrationSnapshot" in caplog.text


def test_vcpu_labels_are_bounded(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    with pytest.raises(ValueError, match="vcpu_count 5000 out of range"):
        m.collector.bind(MigrationSnapshot, vcpu_count=5000)
    src = make_metrics(CollectorRegistry(), "source")
    with pytest.raises(ValueError, match="destination metric"):
        src.collector.bind(MigrationSnapshot, vcpu_count=1)


def test_names_follow_conventions(registry: CollectorRegistry) -> None:
    make_metrics(registry, "destination")
    make_metrics(reg2 := CollectorRegistry(), "source")
    for reg in (registry, reg2):
        for family in families(reg).values():
            if family.name.endswith("_created"):  # client_python's creation timestamps
                continue
            assert family.name.startswith("postcopy_"), family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples), (
                    family.name
                )
            if "latency" in family.name or "time" in family.name or "delay" in family.name:
                assert family.name.endswith("_seconds"), family.name


@pytest.mark.parametrize("role", ["source", "destination"])
def test_promtool_accepts_exposition(role: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (tests/run.sh does it)"
    registry = CollectorRegistry()
    m = make_metrics(registry, role)  # type: ignore[call-overload]
    m.main.normal_pages.inc()
    m.protocol_error("truncated")
    if role == "destination":
        m.fault_latency.observe(1e-4)
        m.collector.bind(
            lambda: MigrationSnapshot(status=MigrationStatus.COMPLETED, downtime_seconds=0.01),
            vcpu_count=2,
        )
    text = generate_latest(registry)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_http_exposition_over_loopback(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "destination")
    m.page_faults.inc(3)
    threads_before = threading.active_count()
    with serve_metrics(registry, 0) as server:
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
    scraped = {f.name: f for f in text_string_to_metric_families(body)}
    faults = scraped["postcopy_page_faults"]
    assert [s.value for s in faults.samples if s.name == "postcopy_page_faults_total"] == [3]
    # closed: the port refuses connections and the thread is gone
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert threading.active_count() == threads_before
    server.close()  # idempotent


def test_serve_metrics_reports_busy_port(registry: CollectorRegistry) -> None:
    with (
        serve_metrics(registry, 0) as first,
        pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{first.port}"),
    ):
        serve_metrics(registry, first.port)
    with pytest.raises(ValueError, match="port 70000 out of range"):
        serve_metrics(registry, 70000)


def test_source_prefetch_and_hot_set_series(registry: CollectorRegistry) -> None:
    m = make_metrics(registry, "source")
    value = registry.get_sample_value
    names = ["postcopy_prefetch_pages_sent_total", "postcopy_prefetch_pages_used_total",
             "postcopy_prefetch_windows_total", "postcopy_prefetch_wasted_pages", "postcopy_hot_set_pages",
             "postcopy_hot_set_pages_recorded_total", "postcopy_bulk_pauses_total", "postcopy_bulk_pause_seconds_total",
             "postcopy_page_requests_preempt_total"]
    assert [value(n) for n in names] == [0] * len(names)           # there from the start, at 0
    for result in ("hit", "miss"):
        assert value("postcopy_prefetch_requests_total", {"result": result}) == 0
    for channel in ("main", "preempt"):
        assert value("postcopy_hot_set_pages_pushed_total", {"channel": channel}) == 0
    m.prefetch_pages_sent.inc(96)
    m.prefetch_pages_used.inc(90)
    m.prefetch_windows.inc(5)
    m.prefetch_requests["hit"].inc(7)
    m.prefetch_requests["miss"].inc(2)
    m.prefetch_wasted_pages.set(6)
    m.hot_set_pages.set(2048)
    m.hot_set_pages_pushed["preempt"].inc(1500)
    m.hot_set_pages_pushed["main"].inc(500)
    m.hot_set_pages_recorded.inc(2100)
    m.bulk_pauses.inc(12)
    m.bulk_pause_seconds.inc(0.25)
    m.page_requests_preempt.inc(40)
    assert [value(n) for n in names] == [96, 90, 5, 6, 2048, 2100, 12, 0.25, 40]
    assert value("postcopy_prefetch_requests_total", {"result": "hit"}) == 7
    assert value("postcopy_prefetch_requests_total", {"result": "miss"}) == 2
    assert value("postcopy_hot_set_pages_pushed_total", {"channel": "preempt"}) == 1500
    assert value("postcopy_hot_set_pages_pushed_total", {"channel": "main"}) == 500
    # a destination has none of them
    make_metrics(reg := CollectorRegistry(), "destination")
    assert reg.get_sample_value("postcopy_prefetch_pages_sent_total") is None
    assert reg.get_sample_value("postcopy_hot_set_pages") is None
    assert reg.get_sample_value("postcopy_bulk_pauses_total") is None
    assert reg.get_sample_value("postcopy_page_requests_preempt_total") is None
