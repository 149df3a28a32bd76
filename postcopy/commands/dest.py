"""``postcopy dest``: the destination role as its own process."""

from __future__ import annotations

import argparse
import socket
import time

from postcopy.cli import UserError
from postcopy.destination import Destination, DestinationError

from .common import add_guest_arguments, guest_spec, parse_address, percentiles_us, write_hashes, write_json

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:4444", help="HOST:PORT to accept the migration on")
    add_guest_arguments(p)
    p.add_argument("--verify", action="store_true",
                   help="hash every page as placed and check the guest's own invariant at the end")
    p.add_argument("--run-after", type=float, default=0.5, help="seconds the guest runs after the migration")
    p.add_argument("--hashes-out", help="write the placed pages' hashes here (for --verify across processes)")
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report")


def run(args: argparse.Namespace) -> int:
    spec = guest_spec(args)
    host, port = parse_address(args.listen)
    dest = Destination(spec, preempt=args.preempt, verify=args.verify)
    try:
        with socket.create_server((host, port), backlog=2, reuse_port=False) as listener:
            print(f"listening on {host}:{listener.getsockname()[1]}", flush=True)
            try:
                result = dest.serve(listener)
            except DestinationError as exc:
                raise UserError(f"migration failed ({exc.kind}): {exc}") from None
        time.sleep(args.run_after)
        assert dest.guest is not None
        dest.guest.stop()
        steps = dest.guest.stats().total_steps
        report = {
            "role": "destination",
            "status": result.status,
            "pages": {"received": result.pages_received, "total": result.pages_total},
            "remote_faults": result.remote_faults,
            "requests_sent": result.requests_sent,
            "fault_latency_us": percentiles_us(result.latencies_ns),
            "blocktime_ms": result.blocktime_ns / 1e6,
            "source_stopped_ns": result.source_stopped_ns,
            "guest_started_ns": result.guest_started_ns,
            "finished_ns": result.finished_ns,
            "guest_steps": steps,
        }
        if args.verify:
            v = dest.guest.verify()
            report["guest_verify"] = {"ok": v.ok, "pages_checked": v.pages_checked,
                                      "pages_mismatched": v.pages_mismatched, "summary": v.summary()}
            if args.hashes_out:
                write_hashes(args.hashes_out, {b.idstr: dest.path.placed_hashes(i) for i, b in enumerate(dest.memory)})
        write_json(report, args.json)
        return 0 if not args.verify or report["guest_verify"]["ok"] else 1   # type: ignore[index]
    finally:
        dest.close()
