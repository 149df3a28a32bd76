"""``postcopy demo``: a real migration of the built-in guest between two processes.

It starts ``postcopy dest`` and ``postcopy source`` as separate processes on
loopback (real TCP, real userfaultfd, the guest's vCPUs running on both
sides), waits for both, checks what arrived and prints one summary.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from postcopy.cli import UserError
from postcopy.faultproxy import Direction, FaultProxy, Rule, random_cuts
from postcopy.spec import parse_size
from postcopy.wire import DEFAULT_TARGET_PAGE_SIZE as TARGET_PAGE_SIZE

from postcopy.service import Sample

from .common import Progress, add_guest_arguments, add_precopy_arguments, precopy_args, precopy_policy, read_hashes, write_json

__all__ = ["add_arguments", "run"]



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_guest_arguments(p)
    p.add_argument("--bandwidth-cap", default="0", metavar="BYTES_PER_S",
                   help="cap the background stream (e.g. 100M); requested pages are never capped")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds the source guest runs before the switch")
    p.add_argument("--prealloc", action=argparse.BooleanOptionalAction, default=True,
                   help="the destination allocates its guest's memory before the stream (default on)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="the source sends ahead of sequential and strided page-request streams (with preempt; "
                        "default on)")
    p.add_argument("--hot-set", metavar="FILE",
                   help="the source pushes this hot set (from an earlier --record-hot-set) first after the switch")
    p.add_argument("--record-hot-set", metavar="FILE",
                   help="the source records the pages the destination asks for and writes them here as a hot set")
    p.add_argument("--verify", action="store_true",
                   help="compare every page the destination placed with the source's at the switch, "
                        "and check the guest's own invariant")
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report")
    p.add_argument("--inject-link-cuts", type=int, default=0, metavar="N",
                   help="put a fault-injecting proxy between the two and cut the link N times during "
                        "postcopy, at random offsets; the migration pauses and recovers each time")
    p.add_argument("--fault-seed", type=int, default=None, help="seed of the random cuts (default: random, reported)")
    p.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve the destination's metrics on N and the source's on N+1 while it runs")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics endpoints bind (default 127.0.0.1)")
    add_precopy_arguments(p)
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "lines", "none"],
                   help="live progress of the destination: rich on a terminal, lines otherwise (default auto)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _guest_args(args: argparse.Namespace) -> list[str]:
    out = ["--size", args.size, "--page-size", args.page_size, "--vcpus", str(args.vcpus),
           "--pattern", args.pattern, "--write-percent", str(args.write_percent), "--seed", str(args.seed),
           "--guest-rate", str(args.guest_rate), "--preempt" if args.preempt else "--no-preempt"]
    return out


def _compare(src: dict[str, bytes], dst: dict[str, bytes]) -> tuple[int, list[str]]:
    mismatched = 0
    where: list[str] = []
    for idstr, theirs in src.items():
        ours = dst.get(idstr)
        if ours == theirs:
            continue
        if ours is None or len(ours) != len(theirs):
            mismatched += len(theirs) // 8
            where.append(f"{idstr}: block missing or of another size")
            continue
        for i in range(0, len(theirs), 8):      # only reached when something is wrong
            if ours[i:i + 8] != theirs[i:i + 8]:
                mismatched += 1
                if len(where) < 8:
                    where.append(f"{idstr} offset {i // 8 * TARGET_PAGE_SIZE:#x}")
    return mismatched, where


#: How long the demo waits for its destination to end after its source did (completed, or failed).
DEST_AFTER_SOURCE_S = 120.0
DEST_AFTER_FAILED_SOURCE_S = 10.0


def _stop(child: subprocess.Popen[Any]) -> None:
    """End a child the demo started, if it still runs: it must not outlive the demo (and hold its
    output open)."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _follow(stream: Any, progress: Progress) -> None:
    """Turn the destination's JSON-lines samples into our own progress display."""
    for line in stream:
        try:
            d = json.loads(line)
            sample = Sample(t=d["t"], status=d["status"], pages=d["pages"], pages_total=d["pages_total"],
                            bytes=d["bytes"], faults=d["faults"], latency_p50_us=d["p50_us"], rounds=d.get("rounds", 0))
        except (ValueError, KeyError, TypeError):
            continue
        progress.update(sample)


def run(args: argparse.Namespace) -> int:
    if args.metrics_port is not None and not 0 < args.metrics_port < 65535:
        raise UserError(f"--metrics-port {args.metrics_port} must be in 1..65534 (the source uses N+1)")
    if args.inject_link_cuts < 0:
        raise UserError("--inject-link-cuts must be 0 or more")
    precopy_policy(args)        # bad values and a missing dirty tracking fail here, not in the child
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    exe = [sys.executable, "-m", "postcopy"]
    with contextlib.ExitStack() as stack:
        proxy = None
        source_addr = addr
        if args.inject_link_cuts:
            proxy = stack.enter_context(FaultProxy.start_in_thread(
                ("127.0.0.1", port), _cut_plan(args), seed=args.fault_seed))
            source_addr = f"{proxy.address[0]}:{proxy.address[1]}"
        return _run(args, exe, addr, source_addr, proxy)


def _cut_plan(args: argparse.Namespace) -> Sequence[Rule]:
    """Cuts in the main stream after the switch (past the preamble and PACKAGED,
    which are a few KiB) and before its end, each connection at most once."""
    size = parse_size(args.size)
    return random_cuts(args.inject_link_cuts, min_bytes=256 << 10, max_bytes=max(512 << 10, size // 3),
                       direction=Direction.UP)


def _run(args: argparse.Namespace, exe: list[str], addr: str, source_addr: str, proxy: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="postcopy-demo-") as tmp:
        t = Path(tmp)
        dest_cmd = [*exe, "dest", "--listen", addr, *_guest_args(args), "--json", str(t / "dest.json"),
                    "--prealloc" if args.prealloc else "--no-prealloc"]
        src_cmd = [*exe, "source", "--connect", source_addr, *_guest_args(args), "--json", str(t / "source.json"),
                   "--bandwidth-cap", args.bandwidth_cap, "--warmup", str(args.warmup), *precopy_args(args),
                   "--prefetch" if args.prefetch else "--no-prefetch"]
        if args.hot_set:
            src_cmd += ["--hot-set", str(Path(args.hot_set).resolve())]
        if args.record_hot_set:
            src_cmd += ["--record-hot-set", str(Path(args.record_hot_set).resolve())]
        dest_cmd += ["--progress", "jsonl"]
        src_cmd += ["--progress", "none"]
        if args.metrics_port is not None:
            dest_cmd += ["--metrics-port", str(args.metrics_port), "--metrics-addr", args.metrics_addr]
            src_cmd += ["--metrics-port", str(args.metrics_port + 1), "--metrics-addr", args.metrics_addr]
        if args.verify:
            dest_cmd += ["--verify", "--hashes-out", str(t / "dest.hashes")]
            src_cmd += ["--verify", "--hashes-out", str(t / "source.hashes")]
        print(f"demo: {args.size} guest ({args.page_size} pages, {args.vcpus} vCPUs, {args.pattern}), "
              f"preempt {'on' if args.preempt else 'off'}, cap {args.bandwidth_cap}", flush=True)
        started = time.monotonic()
        progress = Progress("demo", args.progress)
        dest = subprocess.Popen(dest_cmd, stdout=subprocess.PIPE, text=True)
        follower = threading.Thread(target=_follow, args=(dest.stdout, progress), daemon=True)
        follower.start()
        src = subprocess.Popen(src_cmd)
        rc_dest: int | None = None
        try:
            rc_src = src.wait()
            # a destination whose source failed waits for the next one (as a service does): not here
            rc_dest = dest.wait(timeout=DEST_AFTER_FAILED_SOURCE_S if rc_src else DEST_AFTER_SOURCE_S)
            follower.join(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            for child in (src, dest):
                _stop(child)
            progress.close()
        elapsed = time.monotonic() - started
        if rc_src or rc_dest or not (t / "source.json").exists() or not (t / "dest.json").exists():
            dest_end = f"exit {rc_dest}" if rc_dest is not None else "stopped by the demo, still waiting"
            raise UserError(f"the migration failed (source exit {rc_src}, destination {dest_end})")
        s: dict[str, Any] = json.loads((t / "source.json").read_text())
        d: dict[str, Any] = json.loads((t / "dest.json").read_text())
        mismatched, where = 0, list[str]()
        if args.verify:
            mismatched, where = _compare(read_hashes(str(t / "source.hashes")), read_hashes(str(t / "dest.hashes")))
    verified = bool(args.verify and mismatched == 0 and d.get("guest_verify", {}).get("ok"))
    report = {
        "status": "completed" if s["status"] == d["status"] == "completed" else "failed",
        "verified": verified,
        "pages_mismatched": mismatched,
        "mismatches": where,
        "total_time_s": round(s["total_time_s"], 4),
        "postcopy_time_s": round(s["postcopy_time_s"], 4),
        "downtime_ms": s["downtime_ms"],
        "bytes_transferred": s["bytes_transferred"],
        "throughput_bytes_per_s": int(s["bytes_transferred"] / max(s["postcopy_time_s"], 1e-9)),
        "remote_faults": d["remote_faults"],
        "fault_latency_us": d["fault_latency_us"],
        "pages": s["pages"],
        "guest_verify": d.get("guest_verify"),
        "recoveries": s.get("recoveries", 0),
        "precopy": s.get("precopy"),
        "prefetch": s.get("prefetch"),
        "hot_set": s.get("hot_set"),
        "discard_ranges": s.get("discard_ranges", 0),
        "paused_seconds": s.get("paused_seconds", 0.0),
        "wall_time_s": round(elapsed, 3),
        "timeline": d.get("timeline", []),
        "latency_histogram": d.get("latency_histogram"),
        "source_timeline": s.get("timeline", []),
        "config": {"size": args.size, "page_size": args.page_size, "vcpus": args.vcpus, "pattern": args.pattern,
                   "preempt": args.preempt, "bandwidth_cap": args.bandwidth_cap,
                   "precopy_seconds": args.precopy_seconds, "switchover": args.switchover,
                   "dirty_tracking": args.dirty_tracking, "prefetch": args.prefetch},
    }
    if proxy is not None:
        cuts = [e for e in proxy.log() if e["event"] == "cut"]
        report["link_cuts"] = {"requested": args.inject_link_cuts, "done": len(cuts), "seed": proxy.seed,
                               "at": [{"conn": e["conn"], "bytes": e.get("trigger_bytes", e.get("bytes"))} for e in cuts]}
        print(f"demo: {len(cuts)} link cuts (seed {proxy.seed}), {report['recoveries']} recoveries, "
              f"{report['paused_seconds']:.3f} s paused")
    pre = report["precopy"]
    if pre:
        print(f"demo: precopy {pre['rounds']} rounds in {pre['seconds']:.2f} s ({pre['tracking']}), "
              f"{pre['bytes'] / 1e6:.1f} MB, last round {pre['dirty_pages_last_round']} dirty pages "
              f"({pre['dirty_rate_pages_per_s']:.0f}/s), {pre['dirty_pages_at_switch']} pages discarded in "
              f"{pre['discard_ranges']} ranges at the switch ({pre['switch_reason']})")
        if pre.get("drain"):
            fallback = ", resend cut late: fell back to discards" if pre.get("drain_fallback") else ""
            print(f"demo: drained before the stop in {pre['drain_seconds'] * 1000:.0f} ms ({pre['drain']}{fallback}), "
                  f"{pre['discard_ranges'] - pre['discard_ranges_before_stop']} discard ranges after it"
                  + (f", throttled up to {pre['throttle_percent']} %" if pre.get("throttle_percent") else ""))
    pf = report["prefetch"]
    if pf:
        print(f"demo: prefetch sent {pf['pages_sent']} pages ahead in {pf['windows']} windows "
              f"({pf['hits']} hits, {pf['misses']} misses), {pf['wasted_estimate']} never passed "
              f"({pf['wasted_fraction']:.1%})")
    hot = report["hot_set"]
    if hot:
        print(f"demo: hot set: {hot['pushed']} of its {hot['pages']} pages pushed first"
              + (f", {hot['recorded']} pages recorded" if args.record_hot_set else "")
              + "".join(f"; {w}" for w in hot["warnings"]))
    lat = report["fault_latency_us"]
    print(f"demo: {report['status']} in {report['total_time_s']:.3f} s: "
          f"{report['bytes_transferred'] / 1e6:.1f} MB at {report['throughput_bytes_per_s'] / 1e9:.2f} GB/s, "
          f"downtime {report['downtime_ms']:.2f} ms, {report['remote_faults']} remote faults "
          f"(p50 {lat['p50']} us, p99 {lat['p99']} us, max {lat['max']} us)")
    if args.verify:
        print(f"demo: verify {'OK' if verified else 'FAILED'}: {mismatched} pages differ; "
              f"guest invariant: {(report['guest_verify'] or {}).get('summary')}")
        for w in where:
            print(f"  mismatch: {w}")
    write_json(report, args.json)
    return 0 if report["status"] == "completed" and (verified or not args.verify) else 1
