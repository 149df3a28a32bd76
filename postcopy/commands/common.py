"""Options and reports shared by the role commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from postcopy.cli import UserError
from postcopy.service import Sample, ServiceOptions
from postcopy.session import SwitchoverPolicy, ThrottlePolicy
from postcopy.session._precopy import THROTTLE_PRESETS, WRITER_NICE
from uffd._dirty import available_method
from postcopy.spec import GuestSpec, SpecError, parse_page_size, parse_size

__all__ = [
    "Progress",
    "add_guest_arguments",
    "add_precopy_arguments",
    "add_service_arguments",
    "failure_report",
    "guest_spec",
    "parse_address",
    "percentiles_us",
    "precopy_args",
    "precopy_policy",
    "service_options",
    "write_json",
]


def add_guest_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest (both sides must be started with the same values)")
    g.add_argument("--size", default="1G", help="size of the main RAM block (default 1G)")
    g.add_argument("--page-size", default="4K", choices=["4K", "2M", "1G"], help="host page size of the main block")
    g.add_argument("--vcpus", type=int, default=2, help="guest vCPU threads (default 2)")
    g.add_argument("--pattern", default="seq", choices=["seq", "random", "hot"], help="guest workload")
    g.add_argument("--write-percent", type=int, default=50, help="share of guest accesses that write")
    g.add_argument("--seed", type=int, default=1, help="workload seed")
    g.add_argument("--guest-rate", type=int, default=0, help="accesses per second per vCPU (0 = as fast as it goes)")
    p.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=True,
                   help="send requested pages on a separate preempt channel (default on)")


def add_precopy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precopy before postcopy (the source's guest keeps running meanwhile)")
    g.add_argument("--precopy-seconds", type=float, default=0.0, metavar="S",
                   help="copy memory in rounds for up to S seconds before the switch (0 = postcopy at once)")
    g.add_argument("--switchover", default="time", choices=["time", "auto"],
                   help="time: switch after --precopy-seconds; auto: as soon as the dirty rate stops shrinking or "
                        "what is left fits in --max-downtime (--precopy-seconds stays the limit, default 30)")
    g.add_argument("--precopy-rounds", type=int, default=0, metavar="N", help="switch after N rounds at the latest")
    g.add_argument("--max-downtime", type=float, default=300.0, metavar="MS",
                   help="auto: the downtime bound of a pure precopy finish (default 300 ms, as QEMU)")
    g.add_argument("--dirty-tracking", default="auto", choices=["auto", "wp-async", "soft-dirty"],
                   help="kernel dirty tracking: userfaultfd WP-async + PAGEMAP_SCAN (Linux 6.7+) or soft-dirty")
    g.add_argument("--precopy-drain", type=float, default=1000.0, metavar="MS",
                   help="at the switch, wait up to MS for the destination to take what was sent (PING/PONG) "
                        "before the guest stops, so the downtime does not read a socket backlog (0 = stop at once; "
                        "default 1000)")
    g.add_argument("--precopy-drain-mode", default="resend", choices=["resend", "discard"],
                   help="what the drain does with what the guest wrote during the last round: resend it in a last "
                        "pass (default) or discard it on the destination (it is fetched after RUN)")
    g.add_argument("--max-discard-ranges", type=int, default=512, metavar="N",
                   help="after the guest stopped, at most N discard ranges: more runs are widened to aligned "
                        "chunks that are sent again (each range costs the destination time in the downtime; "
                        "0 = no bound; default 512)")
    g.add_argument("--precopy-guest-nice", type=int, default=WRITER_NICE, metavar="N",
                   help="during precopy the guest's vCPUs (another process: its threads) run at nice N, so the "
                        "migration's threads take the CPUs first; restored at the switch (0 = unchanged; "
                        f"default {WRITER_NICE})")
    g.add_argument("--precopy-throttle", nargs="?", const="qemu", default=None, choices=sorted(THROTTLE_PRESETS),
                   help="auto-converge: while the guest dirties more than half of what a period sends, throttle its "
                        "vCPUs (built-in guest: they sleep; another process: SIGSTOP duty cycles). qemu (the default "
                        "of the bare option): QEMU's 20 %% first, +10 %%, after two high 1 s periods; fast: 95 %% "
                        "first after one high 0.25 s period (then 99 %%), for a precopy of a few seconds")
    g.add_argument("--throttle-initial", type=int, default=None, metavar="PCT",
                   help="first throttle (default: the preset's; QEMU's cpu-throttle-initial is 20 %%)")
    g.add_argument("--throttle-increment", type=int, default=None, metavar="PCT",
                   help="added each time the dirty rate is still high (default: the preset's)")
    g.add_argument("--throttle-max", type=int, default=None, metavar="PCT", help="at most (default 99 %%)")
    g.add_argument("--throttle-period", type=float, default=None, metavar="MS",
                   help="the dirty rate is measured at least this often: a longer pass is cut and scanned "
                        "(default: the preset's)")
    g.add_argument("--throttle-high-periods", type=int, default=None, metavar="N",
                   help="throttle (more) after N periods with a high dirty rate (default: the preset's)")


def precopy_args(args: argparse.Namespace) -> list[str]:
    """The precopy options again, for a child ``postcopy source``."""
    return ["--precopy-seconds", str(args.precopy_seconds), "--switchover", args.switchover,
            "--precopy-rounds", str(args.precopy_rounds), "--max-downtime", str(args.max_downtime),
            "--dirty-tracking", args.dirty_tracking, "--precopy-drain", str(args.precopy_drain),
            "--precopy-drain-mode", args.precopy_drain_mode,
            "--max-discard-ranges", str(args.max_discard_ranges), "--precopy-guest-nice", str(args.precopy_guest_nice),
            *(["--precopy-throttle", args.precopy_throttle] if args.precopy_throttle else []),
            *[arg for name, value in (("--throttle-initial", args.throttle_initial),
                                      ("--throttle-increment", args.throttle_increment),
                                      ("--throttle-max", args.throttle_max), ("--throttle-period", args.throttle_period),
                                      ("--throttle-high-periods", args.throttle_high_periods))
              if value is not None for arg in (name, str(value))]]


def precopy_policy(args: argparse.Namespace) -> SwitchoverPolicy | None:
    """None: postcopy at once. Checks that the dirty tracking works here."""
    if args.precopy_seconds < 0 or args.precopy_rounds < 0 or args.max_downtime < 0 or args.precopy_drain < 0 \
            or args.max_discard_ranges < 0:
        raise UserError("--precopy-seconds, --precopy-rounds, --max-downtime and --precopy-drain must not be negative")
    auto = args.switchover == "auto"
    if not auto and args.precopy_seconds == 0 and args.precopy_rounds == 0:
        return None
    try:
        available_method(args.dirty_tracking)
    except OSError as exc:
        raise UserError(str(exc)) from None
    if not 0 <= args.precopy_guest_nice <= 19:
        raise UserError(f"--precopy-guest-nice {args.precopy_guest_nice}: must be within 0..19 (0 = unchanged)")
    throttle = None
    if args.precopy_throttle:
        base = ThrottlePolicy.preset(args.precopy_throttle)
        period = args.throttle_period
        try:
            throttle = dataclasses.replace(
                base, **{k: v for k, v in (("initial", args.throttle_initial), ("increment", args.throttle_increment),
                                           ("maximum", args.throttle_max), ("high_periods", args.throttle_high_periods),
                                           ("sync_seconds", None if period is None else period / 1000))
                         if v is not None})
        except ValueError as exc:
            raise UserError(f"--precopy-throttle: {exc}") from None
    seconds = args.precopy_seconds or (30.0 if auto or not args.precopy_rounds else 0.0)
    return SwitchoverPolicy(mode="auto" if auto else "time", max_seconds=seconds, max_rounds=args.precopy_rounds,
                            max_downtime=args.max_downtime / 1000, drain_seconds=args.precopy_drain / 1000,
                            drain_mode=args.precopy_drain_mode,
                            max_discard_ranges=args.max_discard_ranges,
                            throttle=throttle, writer_nice=args.precopy_guest_nice)


def guest_spec(args: argparse.Namespace) -> GuestSpec:
    try:
        return GuestSpec.simple(
            parse_size(args.size), parse_page_size(args.page_size), vcpus=args.vcpus, pattern=args.pattern,
            seed=args.seed, write_percent=args.write_percent, rate_limit=args.guest_rate,
        )
    except SpecError as exc:
        raise UserError(str(exc)) from None


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"address {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "count": 0}
    s = sorted(samples_ns)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] / 1000, 1)

    return {"p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": round(s[-1] / 1000, 1), "count": len(s)}


def write_json(report: dict[str, Any], where: str | None) -> None:
    if where is None:
        return
    text = json.dumps(report, indent=2, sort_keys=True)
    if where == "-":
        print(text)
    else:
        _write_whole(Path(where), text + "\n")


def _write_whole(path: Path, text: str) -> None:
    """Written beside it and renamed over it: whoever watches for the file (an orchestrator,
    the other role) never reads half of it."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)


def write_hashes(path: str, hashes: dict[str, bytes]) -> None:
    """Per-page hashes of every block, for --verify across processes."""
    _write_whole(Path(path), json.dumps({k: v.hex() for k, v in hashes.items()}))


def read_hashes(path: str) -> dict[str, bytes]:
    return {k: bytes.fromhex(v) for k, v in json.loads(Path(path).read_text()).items()}


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operations")
    g.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port (0 = any free one)")
    g.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics endpoint binds (default 127.0.0.1)")
    g.add_argument("--qmp", metavar="PATH|HOST:PORT",
                   help="QMP control socket (unix PATH or TCP HOST:PORT); the migration then waits for QMP commands")
    g.add_argument("--linger", type=float, metavar="SECONDS",
                   help="keep serving metrics and QMP this long after the migration ends "
                        "(default: until QMP quit with --qmp, else 0)")
    g.add_argument("--progress", default="auto", choices=["auto", "rich", "lines", "none", "jsonl"],
                   help="live progress: rich on a terminal, one line a second otherwise (default auto)")


def service_options(args: argparse.Namespace, progress: Progress | None) -> ServiceOptions:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port {args.metrics_port} is out of range 0..65535")
    if args.linger is not None and args.linger < 0:
        raise UserError(f"--linger {args.linger} must not be negative")

    def ready(service: Any) -> None:
        if service.metrics_address is not None:
            host, port = service.metrics_address
            _say(args, f"metrics on http://{host}:{port}/metrics")
        if service.qmp_address is not None:
            _say(args, f"QMP control socket on {service.qmp_address}")

    return ServiceOptions(metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, qmp=args.qmp,
                          linger=args.linger, on_sample=progress, on_ready=ready)


def _say(args: argparse.Namespace, line: str) -> None:
    """Status lines go to stdout, or to stderr when stdout carries the JSON report or samples."""
    to_stderr = getattr(args, "json", None) == "-" or getattr(args, "progress", None) == "jsonl"
    print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)


class Progress:
    """Live progress of one role: rich on a terminal, quiet lines otherwise, or JSON lines for a parent."""

    LINE_INTERVAL = 1.0

    def __init__(self, label: str, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "rich" if self.stream.isatty() else "lines"
        self.mode = mode
        self.label = label
        self._last_line = 0.0
        self._last_status = ""
        self._prev: tuple[float, int] | None = None
        self._rate = 0.0
        self._rich: Any = None
        self._task: Any = None
        # what Sample.faults counts on this side
        self._events = "requests" if label == "source" else "faults"

    def __call__(self, sample: Sample) -> None:
        self.update(sample)

    def _throughput(self, sample: Sample) -> float:
        if self._prev is not None and sample.t > self._prev[0]:
            rate = (sample.bytes - self._prev[1]) / (sample.t - self._prev[0])
            self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
        self._prev = (sample.t, sample.bytes)
        return self._rate

    def update(self, sample: Sample) -> None:
        if self.mode == "none":
            return
        if self.mode == "jsonl":
            print(json.dumps({"t": sample.t, "status": sample.status, "pages": sample.pages,
                              "pages_total": sample.pages_total, "bytes": sample.bytes, "faults": sample.faults,
                              "p50_us": sample.latency_p50_us, "rounds": sample.rounds}), file=self.stream, flush=True)
            return
        rate = self._throughput(sample)
        p50 = f"{sample.latency_p50_us:.0f} us" if sample.latency_p50_us is not None else "-"
        if self.mode == "rich":
            self._rich_update(sample, rate, p50)
            return
        now = time.monotonic()
        final = sample.status in ("completed", "failed")
        if now - self._last_line < self.LINE_INTERVAL and sample.status == self._last_status and not final:
            return
        if final and self._last_status == sample.status:
            return
        self._last_line, self._last_status = now, sample.status
        share = 100 * sample.pages / sample.pages_total if sample.pages_total else 0.0
        rounds = f" precopy round {sample.rounds}," if sample.rounds else ""
        print(f"{self.label}: {sample.status}{rounds} {sample.pages}/{sample.pages_total} pages ({share:.1f}%), "
              f"{rate / 1e6:.1f} MB/s, {sample.faults} {self._events}, p50 {p50}", file=self.stream, flush=True)

    def _rich_update(self, sample: Sample, rate: float, p50: str) -> None:
        if self._rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("pages  {task.fields[rate]}  {task.fields[faults]} " + self._events + "  p50 {task.fields[p50]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=sample.pages_total or None, rate="-", faults=0, p50="-")
        self._rich.update(self._task, completed=sample.pages, total=sample.pages_total or None,
                          description=f"{self.label} {sample.status}"
                                      + (f" (round {sample.rounds})" if sample.rounds else ""),
                          rate=f"{rate / 1e6:.0f} MB/s",
                          faults=sample.faults, p50=p50)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None



def failure_report(role: str, error: BaseException, timeline: list[dict[str, object]]) -> dict[str, Any]:
    """The JSON report of a migration that failed: its status, the error and its kind."""
    return {"role": role, "status": "failed", "error": str(error),
            "error_kind": getattr(error, "kind", type(error).__name__), "timeline": timeline}
