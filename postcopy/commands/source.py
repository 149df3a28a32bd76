"""``postcopy source``: the source role as its own process."""

from __future__ import annotations

import argparse
import time

from postcopy.cli import UserError
from postcopy.guest import Guest, Pattern
from postcopy.source import Source, SourceError
from postcopy.spec import parse_size

from .common import add_guest_arguments, guest_spec, parse_address, write_hashes, write_json

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="127.0.0.1:4444", help="HOST:PORT of the destination")
    add_guest_arguments(p)
    p.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs before the switch")
    p.add_argument("--bandwidth-cap", default="0", help="bytes per second for the background stream (0 = none)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the destination")
    p.add_argument("--verify", action="store_true", help="hash every page at the switch (compare with the destination's)")
    p.add_argument("--hashes-out", help="write the pages' hashes at the switch here")
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report")


def run(args: argparse.Namespace) -> int:
    spec = guest_spec(args)
    address = parse_address(args.connect)
    memory = spec.build_memory()
    w = spec.workload()
    guest = Guest([(b.addr, b.used_length, b.page_size) for b in memory], nvcpus=spec.vcpus,
                  pattern=Pattern[spec.pattern.upper()], seed=spec.seed, write_percent=spec.write_percent,
                  rate_limit=int(w["rate_limit"]))
    try:
        guest.fill_initial()
        guest.start()
        time.sleep(args.warmup)
        source = Source(spec, memory, guest, preempt=args.preempt, bandwidth_cap=parse_size(args.bandwidth_cap),
                        verify=args.verify)
        try:
            result = source.migrate(address, connect_timeout=args.connect_timeout)
        except SourceError as exc:
            raise UserError(f"migration failed ({exc.kind}): {exc}") from None
        except ConnectionRefusedError:
            raise UserError(f"no destination answers at {args.connect}") from None
        c = result.counters
        report = {
            "role": "source",
            "status": result.status,
            "downtime_ms": round(result.downtime_ns / 1e6, 3),
            "stopped_ns": result.stopped_ns,
            "total_time_s": (result.finished_ns - result.started_ns) / 1e9,
            "postcopy_time_s": (result.finished_ns - result.stopped_ns) / 1e9,
            "bytes_transferred": c["main_bytes"] + c["preempt_bytes"],
            "pages": {"normal": c["main_pages_normal"] + c["preempt_pages_normal"],
                      "zero": c["main_pages_zero"] + c["preempt_pages_zero"],
                      "requested": c["request_pages_sent"]},
            "requests_received": c["requests"],
            "bad_requests": result.bad_requests,
            "counters": c,
        }
        if args.hashes_out and result.hashes:
            write_hashes(args.hashes_out, result.hashes)
        write_json(report, args.json)
        return 0
    finally:
        guest.close()
        memory.close()
